"""Egress from inside real sandboxes: only through the proxy, only where the policy says.

Targets are our own HTTP servers on the host's loopback; the policies allow
127.0.0.0/8 explicitly (loopback is refused otherwise) and name one port."""

from __future__ import annotations

import http.server
import threading
import uuid
from collections.abc import Iterator

import pytest

pytestmark = pytest.mark.docker


class Target:
    def __init__(self) -> None:
        self.hits: list[str] = []
        hits = self.hits

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                hits.append(self.path)
                body = b"hello from target\n"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a: object) -> None:
                pass

        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.srv.server_address[1]
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()


@pytest.fixture
def targets() -> Iterator[tuple[Target, Target]]:
    a, b = Target(), Target()
    yield a, b
    a.close()
    b.close()


def egress_policy(port: int) -> dict:
    # A host name, resolved by the proxy itself: an allow_cidrs entry would admit an IP
    # literal in its range on ANY port, so ports are tested through a named host.
    return {"name": f"egress-{port}", "egress": {"rules": [{"host": "localhost", "ports": [port]}],
                                                 "allow_cidrs": ["127.0.0.0/8"]},
            "unsafe": {"egress.allow_cidrs.127.0.0.0/8": "test targets listen on loopback"}}


def curl(sb, url: str, *extra: str):
    # --noproxy '' overrides NO_PROXY (which names 127.0.0.1): every request goes to the proxy.
    return sb.exec(["curl", "-sS", "--noproxy", "", "-D", "-", "-m", "10", *extra, url], timeout=30)


def test_allowed_host_and_port_works_over_http_and_connect(make_sandbox, targets) -> None:
    allowed, _ = targets
    sb = make_sandbox(egress_policy(allowed.port))
    r = curl(sb, f"http://localhost:{allowed.port}/plain")
    assert r.exit_code == 0 and b"hello from target" in r.stdout, r
    r = curl(sb, f"http://localhost:{allowed.port}/tunnel", "-p")  # CONNECT tunnel
    assert r.exit_code == 0 and b"hello from target" in r.stdout, r
    assert allowed.hits == ["/plain", "/tunnel"]


def test_disallowed_port_gets_403_naming_why_and_target_sees_nothing(make_sandbox, targets) -> None:
    allowed, other = targets
    sb = make_sandbox(egress_policy(allowed.port))
    r = curl(sb, f"http://localhost:{other.port}/nope")
    assert b" 403 " in r.stdout.split(b"\r\n")[0], r
    assert b"x-sandbox-egress-denied" in r.stdout.lower()
    r = curl(sb, f"http://localhost:{other.port}/nope", "-p")
    assert r.exit_code != 0
    assert other.hits == []


def test_direct_connection_bypassing_the_proxy_fails(make_sandbox, targets) -> None:
    allowed, _ = targets
    sb = make_sandbox(egress_policy(allowed.port))
    r = sb.exec(["python3", "-c", f"""
import socket
for addr in (('127.0.0.1', {allowed.port}), ('172.17.0.1', {allowed.port})):
    s = socket.socket(); s.settimeout(3)
    try:
        s.connect(addr); print('CONNECTED', addr)
    except OSError as e:
        print('failed', e.errno)
print(open('/proc/net/route').read().count('\\n'))
"""])
    assert b"CONNECTED" not in r.stdout, r
    assert r.stdout.strip().endswith(b"1")  # only the header line: no route at all
    assert allowed.hits == []


def test_one_sessions_rules_do_not_apply_to_another(make_sandbox, targets) -> None:
    a, b = targets
    sa = make_sandbox(egress_policy(a.port), session_id=f"eg_a_{uuid.uuid4().hex[:6]}")
    sb_ = make_sandbox(egress_policy(b.port), session_id=f"eg_b_{uuid.uuid4().hex[:6]}")
    none = make_sandbox("default")
    assert b" 403 " in curl(sa, f"http://localhost:{b.port}/x").stdout
    assert b" 403 " in curl(sb_, f"http://localhost:{a.port}/x").stdout
    assert b"hello" in curl(sa, f"http://localhost:{a.port}/a").stdout
    r = curl(none, f"http://localhost:{a.port}/x")  # no rules: no proxy, nothing listens on 3128
    assert r.exit_code != 0 and b"hello" not in r.stdout
    assert a.hits == ["/a"] and b.hits == []


def test_loopback_target_is_refused_without_an_explicit_cidr(make_sandbox, targets) -> None:
    a, _ = targets
    sb = make_sandbox({"name": "no-cidr", "egress": {"rules": [{"host": "localhost", "ports": [a.port]}]}})
    r = curl(sb, f"http://localhost:{a.port}/x")
    assert b" 403 " in r.stdout.split(b"\r\n")[0], r
    assert a.hits == []


def test_ip_literal_in_allowed_cidr_is_admitted_on_any_port_as_documented(make_sandbox, targets) -> None:
    a, b = targets
    sb = make_sandbox({"name": "cidr", "egress": {"rules": [{"host": "localhost", "ports": [a.port]}],
                                                  "allow_cidrs": ["127.0.0.1/32"]},
                       "unsafe": {"egress.allow_cidrs.127.0.0.1/32": "test targets listen on loopback"}})
    assert b"hello" in curl(sb, f"http://127.0.0.1:{b.port}/cidr").stdout
    assert b" 403 " in curl(sb, f"http://127.0.0.2:{b.port}/outside").stdout.split(b"\r\n")[0]
    assert b.hits == ["/cidr"]


def test_every_decision_is_in_the_audit_log(make_sandbox, targets, runtime) -> None:
    a, b = targets
    sid = f"eg_log_{uuid.uuid4().hex[:6]}"
    sb = make_sandbox(egress_policy(a.port), session_id=sid)
    curl(sb, f"http://localhost:{a.port}/ok?token=SECRETQUERY")
    curl(sb, f"http://localhost:{b.port}/denied")
    recs = runtime.egress.records(session=sid)
    decisions = [(r.get("port"), r.get("decision")) for r in recs]
    assert (a.port, "allow") in decisions and (b.port, "deny") in decisions, recs
    assert "SECRETQUERY" not in repr(recs)


def test_gc_prunes_proxy_sessions_of_vanished_sandboxes(runtime, targets) -> None:
    from sandbox.policy import policy_from_dict

    a, _ = targets
    sid = f"eg_gc_{uuid.uuid4().hex[:6]}"
    sb = runtime.create(policy_from_dict(egress_policy(a.port)), session_id=sid)
    assert sid in runtime.egress.sessions()
    runtime.engine.kill(sb.id)  # the sandbox vanishes behind the runtime's back
    runtime.gc()
    assert sid not in runtime.egress.sessions()
    sb.destroy()
