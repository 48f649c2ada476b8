"""SNI pinning of tunnels the proxy does not terminate: on a rule's TLS ports the tunnel must
start with a ClientHello naming the CONNECT host. Real TLS clients (python ssl) against our
own TLS server (test CA) on loopback; the ClientHello parser on its own as well."""

from __future__ import annotations

import random
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.egress import tls
from tests.egress.egress_helpers import ALLOWED_ADDR, Harness, connect_tunnel, parse_response, recv_all, wait_until
from tests.egress.tls_helpers import TestCA, TlsTarget, make_hello, real_client_hello, split_records

pytestmark = pytest.mark.timeout(30)


# ------------------------------------------------------------ the parser


@pytest.mark.parametrize("sni", ["allowed.test", None])
def test_every_prefix_of_a_real_client_hello_asks_for_more(sni: str | None) -> None:
    hello = real_client_hello(sni)
    assert tls.read_hello(hello).sni == sni
    for n in range(len(hello)):
        with pytest.raises(tls.NeedMore):
            tls.read_hello(hello[:n])


def test_a_hello_fragmented_into_many_records_is_reassembled() -> None:
    hello = real_client_hello("allowed.test")
    for size in (1, 7, 100, 200):
        assert tls.read_hello(split_records(hello, size)).sni == "allowed.test"


def test_mutated_hellos_raise_only_parser_errors() -> None:
    rng = random.Random(1234)
    base = real_client_hello("allowed.test")
    for _ in range(3000):
        b = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        try:
            tls.read_hello(bytes(b))
        except (tls.NeedMore, tls.NotTLS, tls.BadHello):
            pass


@pytest.mark.parametrize(
    ("data", "exc"),
    [
        (b"GET / HTTP/1.1\r\n", tls.NotTLS),
        (b"SSH-2.0-OpenSSH_9.2\r\n", tls.NotTLS),
        (b"\x16\x03\x01\x00\x05garbage", tls.BadHello),
        (make_hello("a.test", [(0, b"\x00\x03\x00\x00\x00")]), tls.BadHello),  # server_name extension twice
        (make_hello("a.test", sni_type=1), tls.BadHello),  # no host_name entry
        (make_hello("bad name.test"), tls.BadHello),
    ],
)
def test_non_tls_and_malformed_hellos_are_told_apart(data: bytes, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        tls.read_hello(data)


def test_ech_is_detected() -> None:
    h = tls.read_hello(make_hello("public.example", [(tls.EXT_ECH, b"\x00" * 20)]))
    assert h.ech and h.sni == "public.example"


# ------------------------------------------------------------ the proxy


@pytest.fixture
def ca() -> TestCA:
    return TestCA()


@pytest.fixture
def tls_target(ca: TestCA, tmp_path: Path) -> Iterator[TlsTarget]:
    t = TlsTarget(ALLOWED_ADDR, ca, ["allowed.test", "other.test"], tmp_path).start()
    yield t
    t.close()


def pinned(t: TlsTarget, **rule: object) -> dict[str, object]:
    return {"rules": [{"host": "allowed.test", "ports": [t.port], "tls_ports": [t.port], **rule}], "allow_cidrs": [f"{t.addr}/32"]}


def tls_get(sock: socket.socket, ca: TestCA, server_hostname: str | None, path: str = "/x") -> bytes:
    ctx = ssl.create_default_context(cadata=ca.pem.decode())
    if server_hostname is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    with ctx.wrap_socket(sock, server_hostname=server_hostname) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: allowed.test\r\n\r\n".encode())
        return recv_all(s)


def test_tls_tunnel_naming_the_connect_host_passes(harness: Harness, tls_target: TlsTarget, ca: TestCA) -> None:
    sock = harness.add_session("s1", pinned(tls_target))
    s, resp = connect_tunnel(sock, f"allowed.test:{tls_target.port}")
    assert resp.status == 200
    assert parse_response(tls_get(s, ca, "allowed.test")).body == b"ok:/x"
    assert wait_until(lambda: harness.records("s1"))
    rec = harness.records("s1")[-1]
    assert rec["decision"] == "allow" and rec["tls"] == "tunnel" and rec["sni"] == "allowed.test"


def test_sni_naming_another_host_is_refused_and_upstream_sees_nothing(harness: Harness, tls_target: TlsTarget, ca: TestCA) -> None:
    # Domain fronting: CONNECT to the allowed name, then ask the same address for another name.
    sock = harness.add_session("s1", pinned(tls_target))
    s, resp = connect_tunnel(sock, f"allowed.test:{tls_target.port}")
    assert resp.status == 200
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME|unrecognized name"):
        tls_get(s, ca, "other.test")
    assert wait_until(lambda: harness.records("s1"))
    rec = harness.records("s1")[-1]
    assert rec["decision"] == "deny" and rec["code"] == "sni-mismatch" and rec["sni"] == "other.test"
    time.sleep(0.3)
    assert tls_target.received_any == []  # the hello is checked before connecting: no connection upstream at all
    assert tls_target.requests == []


def test_missing_sni_is_refused_unless_the_rule_allows_it(harness: Harness, tls_target: TlsTarget, ca: TestCA) -> None:
    sock = harness.add_session("s1", pinned(tls_target))
    s, _ = connect_tunnel(sock, f"allowed.test:{tls_target.port}")
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        tls_get(s, ca, None)
    assert wait_until(lambda: harness.records("s1") and harness.records("s1")[-1]["code"] == "sni-missing")
    sock2 = harness.add_session("s2", pinned(tls_target, sni="allow-missing"))
    s, _ = connect_tunnel(sock2, f"allowed.test:{tls_target.port}")
    assert parse_response(tls_get(s, ca, None)).status == 200


def test_non_tls_bytes_on_a_tls_port_are_refused(harness: Harness, tls_target: TlsTarget) -> None:
    sock = harness.add_session("s1", pinned(tls_target))
    s, resp = connect_tunnel(sock, f"allowed.test:{tls_target.port}")
    with s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: other.test\r\n\r\n")
        inner = parse_response(recv_all(s))
    assert inner.status == 403 and inner.headers["x-sandbox-egress-denied"].startswith("not-tls")
    time.sleep(0.3)
    assert tls_target.received_any == []  # refused before any connection upstream
    assert harness.records("s1")[-1]["code"] == "not-tls"


def test_ech_is_refused_unless_the_rule_allows_it(harness: Harness, tls_target: TlsTarget) -> None:
    sock = harness.add_session("s1", pinned(tls_target))
    s, _ = connect_tunnel(sock, f"allowed.test:{tls_target.port}")
    with s:
        s.sendall(make_hello("allowed.test", [(tls.EXT_ECH, b"\x00" * 32)]))
        assert recv_all(s) == tls.alert(tls.ALERT_ACCESS_DENIED)
    assert wait_until(lambda: harness.records("s1") and harness.records("s1")[-1]["code"] == "ech-refused")
    time.sleep(0.3)
    assert tls_target.received_any == []  # refused before any connection upstream


def test_hello_sent_with_the_connect_in_one_write_is_checked(harness: Harness, tls_target: TlsTarget) -> None:
    from sandbox.egress.unixsock import connect_unix

    sock = harness.add_session("s1", pinned(tls_target))
    with connect_unix(sock, timeout=5) as s:
        s.sendall(f"CONNECT allowed.test:{tls_target.port} HTTP/1.1\r\n\r\n".encode() + real_client_hello("other.test"))
        out = recv_all(s)
    assert out.startswith(b"HTTP/1.1 200") and out.endswith(tls.alert(tls.ALERT_UNRECOGNIZED_NAME))


def test_ports_that_are_not_tls_ports_are_not_pinned(harness: Harness, tls_target: TlsTarget) -> None:
    # No tls_ports and not 443: an SSH-like protocol on the port keeps working.
    sock = harness.add_session("s1", {"rules": [{"host": "allowed.test", "ports": [tls_target.port]}], "allow_cidrs": [f"{tls_target.addr}/32"]})
    s, resp = connect_tunnel(sock, f"allowed.test:{tls_target.port}")
    with s:
        s.sendall(b"not tls at all\r\n\r\n")
    assert wait_until(lambda: tls_target.received_any == [True])
