"""The real proxy on real sockets: per-session Unix sockets, loopback target servers we
own, fake names through a test resolver. Each test names the attack it tries; denied
requests must leave the target server without a single connection."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from sandbox.egress.proxy import DENIED_HEADER
from sandbox.egress.unixsock import connect_unix
from tests.egress.egress_helpers import (
    ALLOWED_ADDR,
    OTHER_ADDR,
    Harness,
    Target,
    connect_tunnel,
    get,
    parse_response,
    recv_all,
    request,
    wait_until,
)

pytestmark = pytest.mark.timeout(30)


def allow(t: Target, host: str = "allowed.test", **extra: object) -> dict[str, object]:
    """Rules for `host` on t's port; the loopback target must be named in allow_cidrs
    (it is non-public), which is exactly the operator opt-in the ACL demands."""
    return {"rules": [{"host": host, "ports": [t.port]}], "allow_cidrs": [f"{t.addr}/32"], **extra}


def assert_denied(resp, code: str | None = None) -> None:
    assert resp.status == 403, resp.raw[:300]
    assert DENIED_HEADER.lower() in resp.headers, resp.raw[:300]
    if code:
        assert resp.headers[DENIED_HEADER.lower()].startswith(code), resp.headers[DENIED_HEADER.lower()]
    assert b"refused" in resp.body


# ------------------------------------------------------------ the allowed paths


def test_allowed_host_over_plain_http(harness: Harness, targets: dict[str, Target]) -> None:
    t = targets["allowed"]
    sock = harness.add_session("s1", allow(t))
    resp = get(sock, f"http://allowed.test:{t.port}/hello?q=1")
    assert resp.status == 200 and resp.body == b"ok:/hello?q=1"
    assert resp.headers["connection"] == "close"
    seen = t.requests[0]
    assert seen.startswith(b"GET /hello?q=1 HTTP/1.1\r\n")  # origin-form upstream
    assert b"connection: close" in seen.lower()
    assert [r["decision"] for r in harness.records("s1")] == ["allow"]


def test_allowed_host_over_connect_tunnel(harness: Harness, targets: dict[str, Target]) -> None:
    t = targets["allowed"]
    sock = harness.add_session("s1", allow(t))
    s, resp = connect_tunnel(sock, f"allowed.test:{t.port}")
    with s:
        assert resp.status == 200
        s.sendall(b"GET /in-tunnel HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
        inner = parse_response(recv_all(s))
    assert inner.status == 200 and inner.body == b"ok:/in-tunnel"
    assert wait_until(lambda: harness.records("s1"))  # written when the tunnel ends
    rec = harness.records("s1")[-1]
    assert rec["decision"] == "allow" and rec["method"] == "CONNECT" and rec["addr"] == ALLOWED_ADDR
    assert rec["bytes_up"] > 0 and rec["bytes_down"] > 0


def test_tunnel_data_sent_before_the_200_is_relayed(harness: Harness, targets: dict[str, Target]) -> None:
    # Clients may pipeline the TLS ClientHello right after CONNECT.
    t = targets["allowed"]
    sock = harness.add_session("s1", allow(t))
    with connect_unix(sock, timeout=5) as s:
        s.sendall(f"CONNECT allowed.test:{t.port} HTTP/1.1\r\n\r\nGET /early HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        raw = recv_all(s)
    assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"ok:/early")


def test_request_bodies_are_forwarded_exactly(harness: Harness, targets: dict[str, Target]) -> None:
    t = targets["allowed"]
    sock = harness.add_session("s1", allow(t))
    r1 = request(sock, f"POST http://allowed.test:{t.port}/cl HTTP/1.1\r\nHost: allowed.test:{t.port}\r\nContent-Length: 5\r\n\r\nhello".encode())
    r2 = request(
        sock,
        f"POST http://allowed.test:{t.port}/ch HTTP/1.1\r\nHost: allowed.test:{t.port}\r\nTransfer-Encoding: chunked\r\n\r\n"
        "3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n".encode(),
    )
    assert r1.status == 200 and r2.status == 200
    assert t.requests[0].endswith(b"\r\n\r\nhello")
    assert t.requests[1].endswith(b"\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")  # re-framed, trailer dropped


# ------------------------------------------------------------ denials


def test_denied_host_gets_403_and_target_sees_no_connection(harness: Harness, targets: dict[str, Target]) -> None:
    t, other = targets["allowed"], targets["other"]
    sock = harness.add_session("s1", allow(t))
    assert_denied(get(sock, f"http://evil.test:{other.port}/"), "no-matching-rule")
    s, resp = connect_tunnel(sock, f"evil.test:{other.port}")
    s.close()
    assert_denied(resp, "no-matching-rule")
    assert other.connections == [] and harness.connect_attempts == []
    assert "evil.test" not in harness.resolver.queries  # never resolved: no DNS exfiltration


def test_allowed_host_on_disallowed_port_is_denied(harness: Harness, targets: dict[str, Target]) -> None:
    t, third = targets["allowed"], targets["third"]
    sock = harness.add_session("s1", {**allow(t), "allow_cidrs": [f"{t.addr}/32", f"{third.addr}/32"]})
    # the same name on another port that a server of ours does listen on
    resp = get(sock, f"http://allowed.test:{third.port}/")
    assert_denied(resp, "port-not-allowed")
    s, resp = connect_tunnel(sock, "allowed.test:22")
    s.close()
    assert_denied(resp, "port-not-allowed")
    assert third.connections == [] and harness.connect_attempts == []


@pytest.mark.parametrize("name", ["rebind.test", "mapped.test", "v6loop.test", "private.test", "metadata.test", "aws6.test", "alibaba.test", "mixed.test"])
def test_dns_rebinding_to_non_public_address_is_denied(harness: Harness, targets: dict[str, Target], name: str) -> None:
    other = targets["other"]
    policy = {"rules": [{"host": name, "ports": [other.port]}], "allow_cidrs": [f"{ALLOWED_ADDR}/32"]}
    sock = harness.add_session("s1", policy)
    assert_denied(get(sock, f"http://{name}:{other.port}/"), "non-public-address")
    s, resp = connect_tunnel(sock, f"{name}:{other.port}")
    s.close()
    assert_denied(resp, "non-public-address")
    assert other.connections == [] and harness.connect_attempts == []


def test_rebinding_target_allowed_once_allow_cidrs_names_it(harness: Harness, targets: dict[str, Target]) -> None:
    other = targets["other"]
    sock = harness.add_session("s1", {"rules": [{"host": "rebind.test", "ports": [other.port]}], "allow_cidrs": [f"{OTHER_ADDR}/32"]})
    assert get(sock, f"http://rebind.test:{other.port}/").status == 200


def test_a_name_rebinding_after_an_allowed_answer_is_refused_on_the_next_request(harness: Harness, targets: dict[str, Target]) -> None:
    """The proxy memoises ACL results per session: the memo is keyed by the answer, and the
    name is resolved again for every request, so a name that answered an allowed address once
    and then rebinds to a private or metadata address is refused at once."""
    t = targets["allowed"]
    sock = harness.add_session("s1", allow(t, host="rebind.test"))
    harness.resolver.mapping["rebind.test"] = [ALLOWED_ADDR]
    assert get(sock, f"http://rebind.test:{t.port}/").status == 200
    for private in (["10.1.2.3"], ["169.254.169.254"], [ALLOWED_ADDR, "169.254.169.254"]):
        harness.resolver.mapping["rebind.test"] = private
        assert_denied(get(sock, f"http://rebind.test:{t.port}/"), "non-public-address")
        s, resp = connect_tunnel(sock, f"rebind.test:{t.port}")
        s.close()
        assert_denied(resp, "non-public-address")
    assert len(t.connections) == 1 and harness.resolver.queries.count("rebind.test") == 7


def test_a_replaced_policy_applies_to_the_next_request_not_a_remembered_decision(harness: Harness, targets: dict[str, Target]) -> None:
    t = targets["allowed"]
    sock = harness.add_session("s1", allow(t))
    assert get(sock, f"http://allowed.test:{t.port}/").status == 200
    assert harness.add_session("s1", allow(t, host="other.test")) == sock  # same socket, new rules
    assert_denied(get(sock, f"http://allowed.test:{t.port}/"), "no-matching-rule")
    s, resp = connect_tunnel(sock, f"allowed.test:{t.port}")
    s.close()
    assert_denied(resp, "no-matching-rule")
    harness.add_session("s1", allow(t))
    assert get(sock, f"http://allowed.test:{t.port}/").status == 200
    assert len(t.connections) == 2


@pytest.mark.parametrize(
    "host",
    [
        OTHER_ADDR,
        "2130706435",  # 127.0.0.3 in decimal
        "0x7f.0.0.3",
        "0177.0.0.3",
        "127.3",  # short form of 127.0.0.3
        "[::1]",
        "[::ffff:127.0.0.3]",
        "[::ffff:7f00:3]",
        "[::127.0.0.3]",
        "[64:ff9b::7f00:3]",
        "localhost",
        "169.254.169.254",
        "[fd00:ec2::254]",
    ],
)
def test_ip_literals_and_mapped_forms_are_denied(harness: Harness, targets: dict[str, Target], host: str) -> None:
    t, other = targets["allowed"], targets["other"]
    sock = harness.add_session("s1", allow(t))
    assert get(sock, f"http://{host}:{other.port}/").status == 403
    s, resp = connect_tunnel(sock, f"{host}:{other.port}")
    s.close()
    assert resp.status == 403
    assert other.connections == [] and harness.connect_attempts == []


def test_mapped_form_of_an_allowed_cidr_connects_as_ipv4(harness: Harness, targets: dict[str, Target]) -> None:
    t = targets["allowed"]
    sock = harness.add_session("s1", {"allow_cidrs": [f"{t.addr}/32"]})
    s, resp = connect_tunnel(sock, f"[::ffff:{t.addr}]:{t.port}")
    s.close()
    assert resp.status == 200 and harness.connect_attempts == [(t.addr,)]


@pytest.mark.parametrize(
    "url,host_header",
    [
        ("http://EVIL.test:{p}/", None),  # case
        ("http://evil.test.:{p}/", None),  # trailing dot
        ("http://evil%2etest:{p}/", "evil.test:{p}"),  # percent-encoding
        ("http://allowed.test@evil.test:{p}/", "evil.test:{p}"),  # userinfo: the host is after '@'
        ("http://allowed.test:{p}@evil.test:{p}/", "evil.test:{p}"),  # embedded port in userinfo
        ("http://allowed.test%00.evil.test:{p}/", "allowed.test:{p}"),  # NUL
        ("http://allowed.test%2f@evil.test:{p}/", "allowed.test:{p}"),
        ("http://allowed.test\\@evil.test:{p}/", "allowed.test:{p}"),  # backslash
        ("http://allowed.test.evil.test:{p}/", None),  # suffix
        ("http://xn--allowed-uu7c.test:{p}/", None),  # punycode of a lookalike
        ("http://allowed.test:{p}/", "evil.test:{p}"),  # Host header disagrees with the target
        ("http://allowed.test:{p}/", "allowed.test:{p}@evil.test"),
        ("http://allowed.test:{p}/", "allowed.test:1{p}"),
    ],
)
def test_hostname_normalisation_tricks_are_denied(harness: Harness, targets: dict[str, Target], url: str, host_header: str | None) -> None:
    t, other = targets["allowed"], targets["other"]
    sock = harness.add_session("s1", {**allow(t), "allow_cidrs": [f"{t.addr}/32", f"{other.addr}/32"]})
    p = t.port
    resp = get(sock, url.format(p=p), host_header.format(p=p) if host_header else None)
    assert resp.status in (400, 403), resp.raw[:200]
    assert DENIED_HEADER.lower() in resp.headers
    assert t.connections == [] and other.connections == []


@pytest.mark.parametrize(
    "target",
    ["allowed.test@evil.test:{p}", "EVIL.TEST:{p}", "evil.test.:{p}", "evil%2etest:{p}", "allowed.test:{p}:{p}", "allowed.test%3a{p}:{p}", "[allowed.test]:{p}"],
)
def test_connect_normalisation_tricks_are_denied(harness: Harness, targets: dict[str, Target], target: str) -> None:
    t, other = targets["allowed"], targets["other"]
    sock = harness.add_session("s1", {**allow(t), "allow_cidrs": [f"{t.addr}/32", f"{other.addr}/32"]})
    s, resp = connect_tunnel(sock, target.format(p=t.port))
    s.close()
    assert resp.status in (400, 403) and DENIED_HEADER.lower() in resp.headers
    assert t.connections == [] and other.connections == []


@pytest.mark.parametrize(
    "url",
    ["http://ALLOWED.TEST:{p}/", "http://allowed.test.:{p}/", "http://allowed%2Etest:{p}/", "http://user:pw@allowed.test:{p}/", "http://b%C3%BCcher.test:{p}/"],
)
def test_allowed_spellings_of_an_allowed_host_work(harness: Harness, targets: dict[str, Target], url: str) -> None:
    t = targets["allowed"]
    pol = allow(t)
    pol["rules"].append({"host": "bücher.test", "ports": [t.port]})  # type: ignore[attr-defined]
    sock = harness.add_session("s1", pol)
    u = url.format(p=t.port)
    authority = u.split("://")[1].split("/")[0].rpartition("@")[2]
    assert get(sock, u, authority).status == 200


def test_wildcard_rule_covers_subdomains_only(harness: Harness, targets: dict[str, Target]) -> None:
    t = targets["allowed"]
    sock = harness.add_session("s1", {"rules": [{"host": "*.wild.test", "ports": [t.port]}], "allow_cidrs": [f"{t.addr}/32"]})
    assert get(sock, f"http://sub.wild.test:{t.port}/").status == 200
    assert get(sock, f"http://deep.sub.wild.test:{t.port}/").status == 200
    assert get(sock, f"http://wild.test:{t.port}/").status == 403


def test_https_absolute_uri_and_origin_form_are_refused(harness: Harness, targets: dict[str, Target]) -> None:
    t = targets["allowed"]
    sock = harness.add_session("s1", allow(t))
    assert get(sock, f"https://allowed.test:{t.port}/").status == 400
    assert request(sock, b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n").status == 400
    assert t.connections == []


@pytest.mark.parametrize(
    "raw",
    [
        "POST http://allowed.test:{p}/ HTTP/1.1\r\nHost: allowed.test:{p}\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST http://allowed.test:{p}/ HTTP/1.1\r\nHost: allowed.test:{p}\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        "POST http://allowed.test:{p}/ HTTP/1.1\r\nHost: allowed.test:{p}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        "GET http://allowed.test:{p}/ HTTP/1.1\r\nHost: allowed.test:{p}\r\n X-Folded: 1\r\n\r\n",
        "GET http://allowed.test:{p}/ HTTP/1.1\r\nHost : allowed.test:{p}\r\n\r\n",
        "GET http://allowed.test:{p}/ HTTP/1.1\nHost: allowed.test:{p}\r\n\r\n",
        "GET http://allowed.test:{p}/ HTTP/1.1\r\nHost: allowed.test:{p}\r\nHost: evil.test\r\n\r\n",
        "GET http://allowed.test:{p}/ HTTP/2.0\r\nHost: allowed.test:{p}\r\n\r\n",
    ],
)
def test_request_smuggling_framing_is_refused(harness: Harness, targets: dict[str, Target], raw: str) -> None:
    t = targets["allowed"]
    sock = harness.add_session("s1", allow(t))
    resp = request(sock, raw.format(p=t.port).encode())
    assert resp.status in (400, 501) and t.connections == []


@pytest.mark.parametrize("named", ["content-length", "Content-Length", "keep-alive, content-length", "transfer-encoding", "host"])
def test_connection_header_naming_a_framing_header_is_refused(harness: Harness, targets: dict[str, Target], named: str) -> None:
    # Dropping Content-Length because Connection names it, while still forwarding the body, makes the
    # upstream parse the body as a second request: smuggling towards an allowed host.
    t = targets["allowed"]
    sock = harness.add_session("s1", allow(t))
    smuggled = f"GET /admin HTTP/1.1\r\nHost: allowed.test:{t.port}\r\n\r\n"
    body = smuggled.encode()
    resp = request(sock, f"POST http://allowed.test:{t.port}/ HTTP/1.1\r\nHost: allowed.test:{t.port}\r\n"
                         f"Connection: {named}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    assert resp.status == 400 and b"framing header" in resp.body, resp.raw[:300]
    assert t.connections == [] and t.requests == []
    assert harness.records("s1")[-1]["code"] == "bad-request"


def test_pipelined_second_request_is_not_forwarded(harness: Harness, targets: dict[str, Target]) -> None:
    t, other = targets["allowed"], targets["other"]
    sock = harness.add_session("s1", allow(t))
    smuggled = f"GET http://evil.test:{other.port}/ HTTP/1.1\r\nHost: evil.test:{other.port}\r\n\r\n"
    resp = request(sock, f"POST http://allowed.test:{t.port}/ HTTP/1.1\r\nHost: allowed.test:{t.port}\r\nContent-Length: 5\r\n\r\nhello{smuggled}".encode())
    assert resp.status == 200
    time.sleep(0.3)
    assert len(t.requests) == 1 and t.requests[0].endswith(b"hello") and t.extra == []
    assert other.connections == []


def test_hop_by_hop_and_proxy_credentials_are_not_forwarded(harness: Harness, targets: dict[str, Target]) -> None:
    t = targets["allowed"]
    sock = harness.add_session("s1", allow(t))
    get(sock, f"http://allowed.test:{t.port}/", extra="Proxy-Authorization: Basic c2VjcmV0\r\nConnection: keep-alive, X-Drop\r\nX-Drop: 1\r\nKeep-Alive: 5\r\nX-Keep: 1\r\n")
    seen = t.requests[0].lower()
    assert b"proxy-authorization" not in seen and b"x-drop" not in seen and b"keep-alive" not in seen
    assert b"x-keep: 1" in seen


# ------------------------------------------------------------ sessions are separate


def test_one_sessions_rules_do_not_apply_to_another_sessions_socket(harness: Harness, targets: dict[str, Target]) -> None:
    a, b = targets["allowed"], targets["other"]
    sock_a = harness.add_session("a", allow(a))
    sock_b = harness.add_session("b", allow(b, host="other.test"))
    assert get(sock_a, f"http://allowed.test:{a.port}/").status == 200
    assert get(sock_b, f"http://other.test:{b.port}/").status == 200
    assert get(sock_a, f"http://other.test:{b.port}/").status == 403
    assert get(sock_b, f"http://allowed.test:{a.port}/").status == 403
    assert len(a.connections) == 1 and len(b.connections) == 1
    assert {r["session"] for r in harness.records("a")} == {"a"}
    assert [r["decision"] for r in harness.records("b")] == ["allow", "deny"]


def test_removed_session_socket_is_gone_and_its_tunnels_closed(harness: Harness, targets: dict[str, Target]) -> None:
    t = targets["allowed"]
    sock = harness.add_session("s1", allow(t))
    s, resp = connect_tunnel(sock, f"allowed.test:{t.port}")
    assert resp.status == 200
    harness.call(harness.proxy.remove_session("s1"))
    assert recv_all(s, 2) == b""
    s.close()
    assert not sock.exists() and not sock.parent.exists()


def test_socket_is_world_connectable_in_a_private_dir(harness: Harness, targets: dict[str, Target]) -> None:
    sock = harness.add_session("s1", allow(targets["allowed"]))
    assert sock.stat().st_mode & 0o777 == 0o666
    assert sock.parent.stat().st_mode & 0o777 == 0o711


# ------------------------------------------------------------ bounded resources


def test_oversized_headers_are_cut_off_without_affecting_another_session(harness: Harness, targets: dict[str, Target]) -> None:
    a, b = targets["allowed"], targets["other"]
    sock_a = harness.add_session("a", allow(a, max_header_bytes=4096))
    sock_b = harness.add_session("b", allow(b, host="other.test"))
    with connect_unix(sock_a, timeout=5) as s:
        s.sendall(f"GET http://allowed.test:{a.port}/ HTTP/1.1\r\nHost: allowed.test\r\n".encode())
        try:
            for _ in range(100):
                s.sendall(b"X-Fill: " + b"a" * 1000 + b"\r\n")
        except OSError:
            pass  # the proxy may close on us mid-flood
        resp = parse_response(recv_all(s))
    assert resp.status == 431 and a.connections == []
    assert get(sock_b, f"http://other.test:{b.port}/").status == 200


def test_slowloris_client_is_cut_off_without_stalling_another_session(harness: Harness, targets: dict[str, Target]) -> None:
    a, b = targets["allowed"], targets["other"]
    sock_a = harness.add_session("a", allow(a, header_timeout_s=1.0, idle_timeout_s=30))
    sock_b = harness.add_session("b", allow(b, host="other.test"))
    closed_after: list[float] = []

    def trickle() -> None:
        start = time.monotonic()
        with connect_unix(sock_a, timeout=10) as s:
            try:
                for ch in f"GET http://allowed.test:{a.port}/ HTTP/1.1\r\nHost: allowed.test\r\nX-Slow: {'z' * 200}".encode():
                    s.sendall(bytes([ch]))
                    time.sleep(0.05)
            except OSError:
                pass
            recv_all(s, 5)
        closed_after.append(time.monotonic() - start)

    threads = [threading.Thread(target=trickle) for _ in range(5)]
    for th in threads:
        th.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    for _ in range(5):
        assert get(sock_b, f"http://other.test:{b.port}/").status == 200
    other_session_latency = (time.monotonic() - t0) / 5
    for th in threads:
        th.join(10)
    assert len(closed_after) == 5 and max(closed_after) < 3.0, closed_after
    assert other_session_latency < 0.3
    assert a.connections == []
    assert {r["code"] for r in harness.records("a")} == {"header-timeout"}


def test_connection_flood_is_capped_per_session(harness: Harness, targets: dict[str, Target]) -> None:
    a, b = targets["allowed"], targets["other"]
    sock_a = harness.add_session("a", allow(a, max_connections=3))
    sock_b = harness.add_session("b", allow(b, host="other.test"))
    held = [connect_unix(sock_a, timeout=5) for _ in range(3)]
    time.sleep(0.2)
    try:
        with connect_unix(sock_a, timeout=5) as s:
            resp = parse_response(recv_all(s))
        assert resp.status == 429 and resp.headers[DENIED_HEADER.lower()].startswith("too-many-connections")
        assert get(sock_b, f"http://other.test:{b.port}/").status == 200
    finally:
        for s in held:
            s.close()
    assert wait_until(lambda: get(sock_a, f"http://allowed.test:{a.port}/").status == 200, 3)


def test_idle_tunnel_is_closed(harness: Harness, targets: dict[str, Target]) -> None:
    t = targets["allowed"]
    sock = harness.add_session("s1", allow(t, idle_timeout_s=0.5))
    s, resp = connect_tunnel(sock, f"allowed.test:{t.port}")
    assert resp.status == 200
    start = time.monotonic()
    assert recv_all(s, 5) == b""
    s.close()
    assert time.monotonic() - start < 2.5
    assert wait_until(lambda: harness.records("s1") and harness.records("s1")[-1]["code"] == "idle-timeout")


def test_total_timeout_ends_a_busy_tunnel(harness: Harness, targets: dict[str, Target]) -> None:
    t = targets["allowed"]
    sock = harness.add_session("s1", allow(t, total_timeout_s=1.0))
    s, resp = connect_tunnel(sock, f"allowed.test:{t.port}")
    assert resp.status == 200
    start = time.monotonic()
    try:
        while time.monotonic() - start < 4:
            s.sendall(b"X")  # keeps it from ever being idle
            time.sleep(0.05)
    except OSError:
        pass
    s.close()
    assert time.monotonic() - start < 3


def test_byte_budget_closes_the_download_and_refuses_new_connections(harness: Harness, targets: dict[str, Target]) -> None:
    t = targets["allowed"]
    t.body_size = 200_000
    sock = harness.add_session("s1", allow(t, byte_budget=50_000))
    resp = get(sock, f"http://allowed.test:{t.port}/big")
    assert resp.status == 200 and len(resp.body) < 50_000  # cut off mid-body
    again = get(sock, f"http://allowed.test:{t.port}/big")
    assert_denied(again, "budget-exhausted")
    s, resp2 = connect_tunnel(sock, f"allowed.test:{t.port}")
    s.close()
    assert_denied(resp2, "budget-exhausted")
    assert len(t.connections) == 1
    info = harness.call(asyncio_info(harness, "s1"))
    assert info["bytes_used"] == 50_000 and info["budget_left"] == 0


async def asyncio_info(harness: Harness, sid: str) -> dict[str, object]:
    return harness.proxy.session_info(sid)


def test_spent_budget_closes_other_open_tunnels(harness: Harness, targets: dict[str, Target]) -> None:
    t = targets["allowed"]
    t.body_size = 100_000
    sock = harness.add_session("s1", allow(t, byte_budget=20_000))
    idle, resp = connect_tunnel(sock, f"allowed.test:{t.port}")
    assert resp.status == 200
    get(sock, f"http://allowed.test:{t.port}/big")
    assert recv_all(idle, 3) == b""  # closed by the proxy, not by a timeout
    idle.close()


# ------------------------------------------------------------ audit


def test_every_decision_is_audited_without_credentials(harness: Harness, targets: dict[str, Target]) -> None:
    t, other = targets["allowed"], targets["other"]
    sock = harness.add_session("s1", allow(t))
    get(sock, f"http://user:hunter2@allowed.test:{t.port}/path?token=s3cr3t", host=f"allowed.test:{t.port}", extra="Proxy-Authorization: Basic QWxhZGRpbjpvcGVu\r\nCookie: session=c00kie\r\n")
    get(sock, f"http://user:hunter2@evil.test:{other.port}/x?token=s3cr3t", host=f"evil.test:{other.port}")
    s, _ = connect_tunnel(sock, f"user:hunter2@allowed.test:{t.port}")
    s.close()
    s, _ = connect_tunnel(sock, f"allowed.test:{t.port}")
    s.close()
    request(sock, b"GARBAGE\r\n\r\n")
    assert wait_until(lambda: len(harness.records("s1")) == 5)
    recs = harness.records("s1")
    # tunnels are recorded when they end, so compare as a multiset
    assert sorted(r["decision"] for r in recs) == ["allow", "allow", "deny", "deny", "deny"]
    assert recs[0]["path"] == "/path" and recs[0]["host"] == "allowed.test" and recs[0]["addr"] == ALLOWED_ADDR
    for r in recs:
        assert set(r) >= {"ts", "session", "method", "host", "port", "addr", "decision", "rule", "reason", "bytes_up", "bytes_down", "duration_ms"}
    text = harness.audit_text()
    assert '"session":"s1"' in text  # the files are really there
    for secret in ("hunter2", "s3cr3t", "QWxhZGRpbjpvcGVu", "c00kie", "token", "user:"):
        assert secret not in text


def test_search_domains_can_never_rewrite_a_name(tmp_path) -> None:
    """DNS is asked only for the absolute name; hosts-file names resolve from the file;
    a name missing from both fails rather than being retried with search domains.
    (A DNS server of our own on loopback: this test sends no query anywhere else.)"""
    import asyncio

    from sandbox.egress.resolve import DnsResolver
    from tests.egress.dns_server import DnsServer

    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n127.0.0.9 pinned.example Pinned2.example # comment\n")
    srv = DnsServer({"a.example": ["127.0.0.8"], "missing.example.corp.internal": ["10.0.0.1"]})
    try:
        res = DnsResolver(["127.0.0.1"], srv.port, hosts_file=str(hosts), lifetime_s=3)
        assert asyncio.run(res("a.example", 443)) == ["127.0.0.8"]
        assert sorted(srv.names()) == ["a.example.", "a.example."]  # A and AAAA, absolute
        del srv.queries[:]
        assert asyncio.run(res("pinned2.example", 443)) == ["127.0.0.9"] and srv.names() == []
        assert asyncio.run(res("localhost", 80)) == ["127.0.0.1"] and srv.names() == []
        with pytest.raises(socket.gaierror):
            asyncio.run(res("missing.example", 443))
        assert set(srv.names()) == {"missing.example."}
        with pytest.raises(socket.gaierror):
            asyncio.run(res("intranet", 443))  # single label, not in the file: no DNS at all
        assert set(srv.names()) == {"missing.example."}
    finally:
        srv.close()
