"""Credential injection from inside real sandboxes: code in the sandbox calls an HTTPS API with
no token, the proxy (the real daemon) terminates TLS with the session CA the sandbox trusts
through its CA variables, and the upstream (ours, on the host's loopback, with its own test
CA that the rule names) receives the credential. The secret must be nowhere in the sandbox."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.egress.tls_helpers import TestCA, TlsTarget

pytestmark = [pytest.mark.docker, pytest.mark.timeout(180)]

SECRET = f"ghp_SANDBOXSECRET{uuid.uuid4().hex}"
NO_BYPASS = {"NO_PROXY": "", "no_proxy": ""}  # the runtime exempts localhost; our upstream is on it


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[tuple[TlsTarget, Path]]:
    ca = TestCA()
    t = TlsTarget("127.0.0.1", ca, ["localhost"], tmp_path).start()
    yield t, ca.write(tmp_path / "upstream-ca.pem")
    t.close()


def cred_policy(t: TlsTarget, ca_file: Path) -> dict:
    return {
        "name": f"cred-{t.port}",
        "egress": {
            "rules": [{"host": "localhost", "ports": [t.port], "tls_ports": [t.port], "upstream_ca": str(ca_file),
                       "credential": {"name": "gh", "format": "Bearer {secret}"}, "max_body_bytes": 4096,
                       "http": [{"methods": ["GET", "HEAD"], "paths": ["/**"]}, {"methods": ["POST"], "paths": ["/repos/acme/**"]}]}],
            "allow_cidrs": ["127.0.0.0/8"],
            "credentials": {"gh": {"env": "SANDBOX_TEST_GH_TOKEN"}},
        },
        "unsafe": {"egress.allow_cidrs.127.0.0.0/8": "test upstream listens on loopback",
                   "egress.upstream_ca.localhost": "the test upstream has a test CA"},
    }


@pytest.fixture
def sb(make_sandbox, upstream, monkeypatch: pytest.MonkeyPatch):
    t, ca_file = upstream
    monkeypatch.setenv("SANDBOX_TEST_GH_TOKEN", SECRET)  # the owner's environment, not the sandbox's
    return make_sandbox(cred_policy(t, ca_file))


def curl(sb, url: str, *extra: str):
    return sb.exec(["curl", "-sS", "--noproxy", "", "-D", "-", "-m", "20", *extra, url], timeout=60)


def status(r) -> int:
    """The API's status (curl -D - also prints the proxy's "200 Connection Established")."""
    lines = [ln for ln in r.stdout.split(b"\r\n") if ln.startswith(b"HTTP/1.1 ") and b"Connection Established" not in ln]
    return int(lines[-1].split(b" ")[1]) if lines else 0


def test_curl_and_urllib_reach_the_api_with_no_token_and_the_upstream_gets_the_credential(sb, upstream) -> None:
    t, _ = upstream
    r = curl(sb, f"https://localhost:{t.port}/user")
    assert r.exit_code == 0 and b"ok:/user" in r.stdout, r
    code = (f"import urllib.request; print(urllib.request.urlopen('https://localhost:{t.port}/py', timeout=20).read().decode())")
    r = sb.exec(["python3", "-c", code], env=NO_BYPASS, timeout=60)
    assert r.exit_code == 0 and b"ok:/py" in r.stdout, r
    assert [s.request_line.split(" ")[1] for s in t.requests] == ["/user", "/py"]
    assert all(s.header("authorization") == [f"Bearer {SECRET}"] for s in t.requests)


def test_git_gets_the_credential_too(sb, upstream) -> None:
    t, _ = upstream
    # Our upstream is no git server: what matters is what git's libcurl-gnutls sent and that it trusted the CA.
    r = sb.exec(["git", "ls-remote", f"https://localhost:{t.port}/acme/repo.git"], env=NO_BYPASS, timeout=60)
    assert b"certificate" not in r.stderr.lower() and b"ssl" not in r.stderr.lower(), r
    assert t.requests and t.requests[0].request_line.startswith("GET /acme/repo.git/info/refs")
    assert t.requests[0].header("authorization") == [f"Bearer {SECRET}"]


def test_a_sandbox_sent_authorization_is_replaced(sb, upstream) -> None:
    t, _ = upstream
    r = curl(sb, f"https://localhost:{t.port}/user", "-H", "Authorization: Bearer sandbox-own-token")
    assert r.exit_code == 0, r
    assert t.requests[0].header("authorization") == [f"Bearer {SECRET}"]
    assert b"sandbox-own-token" not in t.requests[0].head


def test_method_path_and_body_rules_are_enforced(sb, upstream) -> None:
    t, _ = upstream
    ok = curl(sb, f"https://localhost:{t.port}/repos/acme/x/issues", "-X", "POST", "--data-binary", "{}")
    denied = curl(sb, f"https://localhost:{t.port}/repos/evil/x/issues", "-X", "POST", "--data-binary", "{}")
    big = curl(sb, f"https://localhost:{t.port}/repos/acme/x/issues", "-X", "POST", "--data-binary", "x" * 5000)
    assert status(ok) == 200, ok
    assert status(denied) == 403 and b"path-denied" in denied.stdout, denied
    assert status(big) == 413, big
    assert [s.request_line.split(" ")[1] for s in t.requests] == ["/repos/acme/x/issues"]
    for r in (ok, denied, big):
        assert SECRET.encode() not in r.stdout + r.stderr


def test_the_secret_is_nowhere_in_the_sandbox(sb, upstream, runtime) -> None:
    t, _ = upstream
    assert curl(sb, f"https://localhost:{t.port}/warm").exit_code == 0  # the credential has been used
    needle = SECRET[8:]  # a fragment is enough to find any copy
    script = f"""
import os
needle = {needle[::-1]!r}[::-1].encode()  # reversed: this script's own cmdline must not hold it
hits = []
for pid in [p for p in os.listdir('/proc') if p.isdigit()] + ['self']:
    for name in ('environ', 'cmdline'):
        try:
            if needle in open(f'/proc/{{pid}}/{{name}}', 'rb').read():
                hits.append(f'/proc/{{pid}}/{{name}}')
        except OSError:
            pass
for top in ('/etc', '/run', '/tmp', '/home', '/root', '/workspace', '/opt', '/var', '/usr/local'):
    for root, dirs, files in os.walk(top):
        for f in files:
            p = os.path.join(root, f)
            try:
                if os.path.isfile(p) and os.path.getsize(p) < 4 << 20 and needle in open(p, 'rb').read():
                    hits.append(p)
            except OSError:
                pass
print('HITS', hits)
print('CA', os.environ.get('SSL_CERT_FILE'), [n for n in ('ca-bundle.pem', 'ca.pem', 'proxy.sock') if os.path.exists('/run/sandbox-egress/' + n)])
"""
    r = sb.exec(["python3", "-c", script], timeout=120)
    assert r.exit_code == 0, r
    assert b"HITS []" in r.stdout, r.stdout
    assert b"CA /run/sandbox-egress/ca-bundle.pem ['ca-bundle.pem', 'ca.pem', 'proxy.sock']" in r.stdout, r.stdout
    recs = runtime.egress.records(session=sb.session_id)
    assert any(rec.get("credential") == "gh" and rec.get("path") == "/warm" for rec in recs), recs
    assert SECRET not in repr(recs)
    # Nor in anything the daemon wrote on the host (its log, audit files, the session dirs).
    state = runtime.egress.state_dir
    files = [p for p in state.rglob("*") if p.is_file() and not p.is_socket()]
    assert any(p.name == "daemon.log" for p in files)
    for p in files:
        assert SECRET.encode() not in p.read_bytes(), p


def test_a_tunnel_refuses_a_foreign_sni_and_plaintext_from_inside_a_sandbox(make_sandbox, upstream) -> None:
    """Not terminated: an end-to-end tunnel whose ClientHello must name the CONNECT host."""
    t, _ = upstream
    sb = make_sandbox({"name": f"sni-{t.port}", "egress": {"rules": [{"host": "localhost", "ports": [t.port], "tls_ports": [t.port]}],
                                                         "allow_cidrs": ["127.0.0.0/8"]},
                       "unsafe": {"egress.allow_cidrs.127.0.0.0/8": "test upstream listens on loopback"}})
    script = f"""
import socket, ssl
def tunnel():
    s = socket.create_connection(('127.0.0.1', 3128), timeout=10)
    s.sendall(b'CONNECT localhost:{t.port} HTTP/1.1\\r\\n\\r\\n')
    head = b''
    while not head.endswith(b'\\r\\n\\r\\n'):
        head += s.recv(1)
    assert head.startswith(b'HTTP/1.1 200'), head
    return s
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
for name in ('localhost', 'fronted.example'):
    try:
        with ctx.wrap_socket(tunnel(), server_hostname=name) as tls:
            print(name, 'HANDSHAKE-OK')
    except ssl.SSLError as e:
        print(name, 'REFUSED', e.reason)
s = tunnel(); s.sendall(b'GET / HTTP/1.1\\r\\nHost: localhost\\r\\n\\r\\n')
print('PLAIN', s.recv(200).split(b'\\r\\n')[0])
"""
    r = sb.exec(["python3", "-c", script], timeout=60)
    assert r.exit_code == 0, r
    out = r.stdout.decode()
    assert "localhost HANDSHAKE-OK" in out and "fronted.example REFUSED" in out and "PLAIN b'HTTP/1.1 403 Forbidden'" in out, out
