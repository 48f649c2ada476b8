"""TLS termination and credential injection on the real proxy: an HTTPS upstream of ours on
loopback (its own test CA, named by the rule's upstream_ca) records what it receives; the
client is python ssl trusting only the session CA the proxy wrote. The secret must reach
the upstream and nothing else: not the client, not a refusal, not the audit."""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any

import pytest

from sandbox.egress import credentials
from sandbox.egress.rules import EgressPolicy
from tests.egress.egress_helpers import Harness, Response, connect_tunnel, get, parse_response, recv_all, wait_until
from tests.egress.tls_helpers import TestCA, TlsTarget

pytestmark = pytest.mark.timeout(30)

SECRET = "ghp_TESTSECRET0123456789abcdefXYZ"
ENV = {"EGRESS_TEST_TOKEN": SECRET}


def policy(t: TlsTarget, ca_file: Path | None, **rule: Any) -> EgressPolicy:
    r: dict[str, Any] = {"host": "allowed.test", "ports": [t.port], "tls_ports": [t.port], "credential": {"name": "gh"}}
    if ca_file is not None:
        r["upstream_ca"] = str(ca_file)
    r.update(rule)
    return EgressPolicy.model_validate({"rules": [r], "allow_cidrs": [f"{t.addr}/32"],
                                        "credentials": {"gh": {"env": "EGRESS_TEST_TOKEN"}}})


@pytest.fixture
def session(harness: Harness, upstream: TlsTarget, up_ca: TestCA, tmp_path: Path):
    def make(sid: str = "s1", **rule: Any) -> Path:
        pol = policy(upstream, up_ca.write(tmp_path / "upstream-ca.pem"), **rule)
        return harness.add_session(sid, pol, credentials.resolve(pol, ENV))
    return make


def https(sock_path: Path, raw: bytes, port: int, server_hostname: str = "allowed.test") -> Response:
    """One request through a CONNECT tunnel, trusting only the session CA the proxy wrote."""
    s, resp = connect_tunnel(sock_path, f"allowed.test:{port}")
    assert resp.status == 200
    ctx = ssl.create_default_context(cafile=str(sock_path.parent / "ca.pem"))
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT  # what Python 3.13 does by default: the leaf needs its AKI
    with ctx.wrap_socket(s, server_hostname=server_hostname) as t:
        t.sendall(raw)
        return parse_response(recv_all(t))


def req(method: str, path: str, port: int, extra: str = "", body: bytes = b"", host: str | None = None) -> bytes:
    h = host or f"allowed.test:{port}"
    cl = f"Content-Length: {len(body)}\r\n" if body else ""
    return f"{method} {path} HTTP/1.1\r\nHost: {h}\r\n{cl}{extra}\r\n".encode() + body


def no_secret_anywhere(harness: Harness, *responses: Response) -> None:
    for r in responses:
        assert SECRET.encode() not in r.raw
    assert SECRET not in harness.audit_text()


def test_the_upstream_receives_the_injected_credential_and_the_client_never_sees_it(harness: Harness, session, upstream: TlsTarget) -> None:
    sock = session()
    r = https(sock, req("GET", "/user?x=1", upstream.port), upstream.port)
    assert r.status == 200 and r.body == b"ok:/user?x=1"
    seen = upstream.requests[0]
    assert seen.request_line == "GET /user?x=1 HTTP/1.1"
    assert seen.header("authorization") == [f"Bearer {SECRET}"]
    assert seen.header("host") == [f"allowed.test:{upstream.port}"] and seen.header("connection") == ["close"]
    assert wait_until(lambda: harness.records("s1"))
    rec = harness.records("s1")[-1]
    assert (rec["tls"], rec["method"], rec["path"], rec["status"], rec["credential"], rec["decision"]) == (
        "terminated", "GET", "/user", 200, "gh", "allow")
    no_secret_anywhere(harness, r)


def test_a_sandbox_sent_authorization_is_replaced_never_passed_through(harness: Harness, session, upstream: TlsTarget) -> None:
    sock = session()
    extra = ("Authorization: Bearer attacker-token\r\nauthorization: token second\r\n"
             "Cookie: s=1\r\nProxy-Authorization: Basic eDp5\r\nConnection: authorization\r\n")
    r = https(sock, req("GET", "/user", upstream.port, extra), upstream.port)
    assert r.status == 200
    seen = upstream.requests[0]
    assert seen.header("authorization") == [f"Bearer {SECRET}"]  # exactly one: ours, added last
    head = seen.head.decode().lower()
    for leftover in ("attacker-token", "second", "cookie", "proxy-authorization"):
        assert leftover not in head


def test_a_custom_credential_header_is_replaced_in_every_spelling(harness: Harness, session, upstream: TlsTarget) -> None:
    # CGI-style servers read X_Api_Key, x-api-key and X.Api.Key as one variable.
    sock = session(credential={"name": "gh", "header": "X-Api-Key", "format": "{secret}"})
    extra = "X_Api_Key: mine1\r\nx-api-key: mine2\r\nX.Api.Key: mine3\r\nAuthorization: Bearer mine4\r\n"
    assert https(sock, req("GET", "/k", upstream.port, extra), upstream.port).status == 200
    seen = upstream.requests[0]
    assert seen.header("x-api-key") == [SECRET] and "mine" not in seen.head.decode()


def test_basic_credential_and_path_prefix(harness: Harness, session, upstream: TlsTarget) -> None:
    import base64

    sock = session(credential={"name": "gh", "basic_user": "x-access-token", "path_prefix": "/acme/"})
    https(sock, req("GET", "/acme/repo.git/info/refs", upstream.port), upstream.port)
    https(sock, req("GET", "/other/repo.git/info/refs", upstream.port), upstream.port)
    inside, outside = upstream.requests
    assert inside.header("authorization") == ["Basic " + base64.b64encode(f"x-access-token:{SECRET}".encode()).decode()]
    assert outside.header("authorization") == []  # outside the prefix: nothing injected, and nothing of the sandbox's either


def test_method_and_path_rules_deny_with_a_403_naming_the_rule(harness: Harness, session, upstream: TlsTarget) -> None:
    sock = session(http=[{"methods": ["GET"], "paths": ["/**"]}, {"methods": ["POST"], "paths": ["/repos/acme/**"]}])
    ok = https(sock, req("POST", "/repos/acme/x/issues", upstream.port, body=b"{}"), upstream.port)
    denied = https(sock, req("POST", "/repos/evil/x/issues", upstream.port, body=b"{}"), upstream.port)
    assert ok.status == 200 and len(upstream.requests) == 1
    assert denied.status == 403
    why = denied.headers["x-sandbox-egress-denied"]
    assert why.startswith("path-denied") and f"allowed.test:{upstream.port}" in why and "POST /repos/evil/x/issues" in why
    for path in ("/repos/acme/../evil/issues", "/repos/acme/%2e%2e/evil", "/repos/acme%2fevil", "//repos/acme/x"):
        r = https(sock, req("POST", path, upstream.port, body=b"{}"), upstream.port)
        assert r.status == 400 and r.headers["x-sandbox-egress-denied"].startswith("ambiguous-path"), path
    assert len(upstream.requests) == 1
    no_secret_anywhere(harness, ok, denied)


def test_trace_host_mismatch_and_upgrades_are_refused(harness: Harness, session, upstream: TlsTarget) -> None:
    sock = session()
    assert https(sock, req("TRACE", "/", upstream.port), upstream.port).status == 405
    assert https(sock, req("GET", "/", upstream.port, host="other.test"), upstream.port).status == 421
    assert https(sock, req("GET", f"https://other.test:{upstream.port}/", upstream.port), upstream.port).status == 421
    assert https(sock, req("GET", "/", upstream.port, "Upgrade: websocket\r\nConnection: upgrade\r\n"), upstream.port).status == 501
    assert upstream.requests == []


def test_body_cap_refuses_large_bodies(harness: Harness, session, upstream: TlsTarget) -> None:
    sock = session(max_body_bytes=1000)
    assert https(sock, req("POST", "/up", upstream.port, body=b"a" * 1000), upstream.port).status == 200
    big = https(sock, req("POST", "/up", upstream.port, body=b"a" * 1001), upstream.port)
    assert big.status == 413 and big.headers["x-sandbox-egress-denied"].startswith("body-too-large")
    chunked = b"POST /up HTTP/1.1\r\nHost: allowed.test:%d\r\nTransfer-Encoding: chunked\r\n\r\n" % upstream.port
    chunked += b"200\r\n" + b"b" * 512 + b"\r\n" + b"200\r\n" + b"b" * 512 + b"\r\n0\r\n\r\n"
    r = https(sock, chunked, upstream.port)
    assert r.status == 413
    # The capped Content-Length body never left; the chunked one was cut before its last chunk, so
    # the upstream never got a complete request (a streamed body is not buffered to be counted).
    assert upstream.requests[0].body == b"a" * 1000
    assert all(not s.body.endswith(b"0\r\n\r\n") for s in upstream.requests[1:])


def test_an_upstream_the_host_does_not_trust_gets_no_credential(harness: Harness, upstream: TlsTarget) -> None:
    pol = policy(upstream, None)  # no upstream_ca: the test CA is not in the host's trust store
    sock = harness.add_session("s1", pol, credentials.resolve(pol, ENV))
    r = https(sock, req("GET", "/user", upstream.port), upstream.port)
    assert r.status == 502 and r.headers["x-sandbox-egress-error"].startswith("upstream-cert")
    assert upstream.requests == [] and wait_until(lambda: upstream.handshake_errors)
    no_secret_anywhere(harness, r)


def test_plain_http_to_a_credential_host_is_refused(harness: Harness, session, upstream: TlsTarget) -> None:
    pol = policy(upstream, None)
    pol = EgressPolicy.model_validate({**pol.model_dump(), "rules": [{**pol.rules[0].model_dump(), "ports": [upstream.port, 80]}]})
    sock = harness.add_session("s1", pol, credentials.resolve(pol, ENV))
    r = get(sock, f"http://allowed.test:{upstream.port}/user")
    assert r.status == 403 and r.headers["x-sandbox-egress-denied"].startswith("plaintext-terminated-host")
    assert upstream.received_any == []


def test_an_upstream_echoing_the_credential_is_cut_off(harness: Harness, session, upstream: TlsTarget) -> None:
    upstream.body = b"your token is Bearer " + SECRET.encode() + b" ok"
    sock = session()
    r = https(sock, req("GET", "/echo", upstream.port), upstream.port)
    assert SECRET.encode() not in r.raw
    assert wait_until(lambda: harness.records("s1") and harness.records("s1")[-1]["code"] == "leak-blocked")


def test_the_client_must_trust_the_session_ca_and_its_key_is_not_on_disk(harness: Harness, session, upstream: TlsTarget, tmp_path: Path) -> None:
    sock = session()
    s, _ = connect_tunnel(sock, f"allowed.test:{upstream.port}")
    with pytest.raises(ssl.SSLCertVerificationError):
        ssl.create_default_context().wrap_socket(s, server_hostname="allowed.test")  # the system store only
    s.close()
    assert wait_until(lambda: harness.records("s1") and harness.records("s1")[-1]["code"] == "client-rejected-leaf")
    files = {p.name: p for p in sock.parent.iterdir()}
    assert {"ca.pem", "ca-bundle.pem", "proxy.sock"} <= set(files)
    assert oct(files["ca.pem"].stat().st_mode & 0o777) == "0o644"
    for p in tmp_path.rglob("*"):
        if p.is_file() and p.suffix != ".key":  # the upstream test server's own key files end in .key
            assert b"PRIVATE KEY" not in p.read_bytes(), p
    bundle = files["ca-bundle.pem"].read_text()
    assert files["ca.pem"].read_text() in bundle and bundle.count("BEGIN CERTIFICATE") > 10  # host roots kept


def test_the_session_ca_is_name_constrained_to_the_terminated_hosts(harness: Harness, session) -> None:
    from cryptography import x509

    sock = session()
    ca = x509.load_pem_x509_certificate((sock.parent / "ca.pem").read_bytes())
    nc = ca.extensions.get_extension_for_class(x509.NameConstraints)
    assert nc.critical and [g.value for g in nc.value.permitted_subtrees] == ["allowed.test"]
    assert "s1" not in ca.subject.rfc4514_string()


# ------------------------------------------------------------ credential sources


def _pol(src: dict[str, Any]) -> EgressPolicy:
    return EgressPolicy.model_validate({"rules": [{"host": "api.example.com", "ports": [443], "credential": {"name": "c"}}],
                                        "credentials": {"c": src}})


def test_credential_from_a_private_file_and_refused_from_a_readable_one(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text(SECRET + "\n")
    os.chmod(f, 0o600)
    assert credentials.resolve(_pol({"file": str(f)})).secrets == {"c": SECRET}
    os.chmod(f, 0o644)
    with pytest.raises(credentials.CredentialError, match="group or others") as e:
        credentials.resolve(_pol({"file": str(f)}))
    assert SECRET not in str(e.value)
    link = tmp_path / "link"
    link.symlink_to(f)
    with pytest.raises(credentials.CredentialError, match="symlinks"):
        credentials.resolve(_pol({"file": str(link)}))


def test_credential_from_a_command_and_its_failures_never_show_the_output(tmp_path: Path) -> None:
    assert credentials.resolve(_pol({"command": ["printf", "%s\\n", SECRET]})).secrets == {"c": SECRET}
    with pytest.raises(credentials.CredentialError, match="status 3") as e:
        credentials.resolve(_pol({"command": ["sh", "-c", f"echo {SECRET}; exit 3"]}))
    assert SECRET not in str(e.value)
    with pytest.raises(credentials.CredentialError, match="within"):
        credentials.resolve(_pol({"command": ["sleep", "5"], "timeout_s": 0.3}))


@pytest.mark.parametrize("bad", ["two\r\nlines", "nul\x00", "x" * 9000, " leading-space", "ünïcode"])
def test_credentials_that_could_inject_headers_are_refused(bad: str) -> None:
    with pytest.raises(credentials.CredentialError) as e:
        credentials.resolve(_pol({"env": "T"}), {"T": bad})
    assert bad not in str(e.value)


def test_a_missing_variable_names_the_variable_not_a_value() -> None:
    with pytest.raises(credentials.CredentialError, match="'c' \\(env T\\).*not set"):
        credentials.resolve(_pol({"env": "T"}), {})


def test_the_session_material_never_prints_its_values() -> None:
    m = credentials.SessionMaterial({"c": SECRET})
    assert SECRET not in repr(m) and SECRET not in str(m)


def test_a_proxy_session_without_the_credential_value_is_refused(harness: Harness, upstream: TlsTarget) -> None:
    with pytest.raises(ValueError, match="no value given for credential"):
        harness.add_session("s1", policy(upstream, None))


def test_a_client_hello_sent_with_the_connect_in_one_write_still_terminates(harness: Harness, session, upstream: TlsTarget) -> None:
    # The asyncio-streams pitfall: bytes already read behind the CONNECT head must reach the TLS layer.
    from sandbox.egress.unixsock import connect_unix

    sock = session()
    ctx = ssl.create_default_context(cafile=str(sock.parent / "ca.pem"))
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname="allowed.test")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    with connect_unix(sock, timeout=5) as s:
        s.sendall(f"CONNECT allowed.test:{upstream.port} HTTP/1.1\r\n\r\n".encode() + out.read())
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += s.recv(1)
        assert buf.startswith(b"HTTP/1.1 200")
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                if out.pending:
                    s.sendall(out.read())
                inc.write(s.recv(65536))
        s.sendall(out.read())
        obj.write(req("GET", "/early", upstream.port))
        s.sendall(out.read())
        data = b""
        while True:
            try:
                piece = obj.read(65536)
                if not piece:
                    break
                data += piece
            except ssl.SSLWantReadError:
                chunk = s.recv(65536)
                if not chunk:
                    break
                inc.write(chunk)
            except ssl.SSLZeroReturnError:
                break
    assert parse_response(data).body == b"ok:/early"
    assert upstream.requests[0].header("authorization") == [f"Bearer {SECRET}"]


def test_an_http2_client_is_refused_not_misparsed(harness: Harness, session, upstream: TlsTarget) -> None:
    sock = session()
    s, _ = connect_tunnel(sock, f"allowed.test:{upstream.port}")
    ctx = ssl.create_default_context(cafile=str(sock.parent / "ca.pem"))
    ctx.set_alpn_protocols(["h2"])
    with ctx.wrap_socket(s, server_hostname="allowed.test") as t:
        assert t.selected_alpn_protocol() is None  # we offer http/1.1 only
        t.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        r = parse_response(recv_all(t))
    assert r.status == 505 and upstream.requests == []
    assert wait_until(lambda: harness.records("s1") and harness.records("s1")[-1]["code"] == "h2-refused")
