"""End to end with a real sandbox: an unmodified `curl` inside reaches an allowed target
only through the forwarder and the host proxy; going around the proxy fails.

The target listens on this machine's docker bridge address (host-local, and reachable by
a sandbox only if it had a network, which it must not)."""

from __future__ import annotations

import pytest

from tests.egress.egress_helpers import Target, wait_until

pytestmark = [pytest.mark.docker, pytest.mark.timeout(180)]


@pytest.fixture
def bridge_target() -> Target:
    import docker

    net = docker.from_env().networks.get("bridge").attrs["IPAM"]["Config"][0]
    t = Target(net.get("Gateway") or "172.17.0.1").start()
    yield t
    t.close()


def test_curl_in_sandbox_goes_through_proxy_and_bypass_fails(make_sandbox, runtime, bridge_target: Target) -> None:
    t = bridge_target
    url = f"http://{t.addr}:{t.port}"
    sb = make_sandbox({"name": "egress-e2e", "egress": {"allow_cidrs": [f"{t.addr}/32"]},
                       "unsafe": {f"egress.allow_cidrs.{t.addr}/32": "the test target is the docker bridge gateway"}})

    ok = sb.exec(["curl", "-sS", "-m", "20", f"{url}/via-proxy"], timeout=60)
    assert ok.exit_code == 0 and ok.stdout == b"ok:/via-proxy", (ok.stdout, ok.stderr)

    tunnel = sb.exec(["curl", "-sS", "-m", "20", "-p", f"{url}/via-tunnel"], timeout=60)
    assert tunnel.exit_code == 0 and tunnel.stdout == b"ok:/via-tunnel", (tunnel.stdout, tunnel.stderr)

    denied = sb.exec(["curl", "-sS", "-i", "-m", "20", f"http://evil.test:{t.port}/"], timeout=60)
    out = denied.stdout.decode()
    assert " 403 " in out.splitlines()[0] and "X-Sandbox-Egress-Denied: no-matching-rule" in out, out

    # Around the proxy: no interface, no route, so the same address is unreachable.
    bypass = sb.exec(["curl", "-sS", "--noproxy", "*", "-m", "10", f"{url}/direct"], timeout=60)
    assert bypass.exit_code != 0

    paths = sorted(r.split(b" ")[1] for r in t.requests)
    assert paths == [b"/via-proxy", b"/via-tunnel"]

    def recorded() -> list[dict]:
        return runtime.egress.records(session=sb.session_id)

    assert wait_until(lambda: len(recorded()) >= 3, 10)
    assert sorted(r["decision"] for r in recorded()) == ["allow", "allow", "deny"]


def test_sandbox_without_egress_rules_has_no_proxy_socket(make_sandbox) -> None:
    sb = make_sandbox()
    res = sb.exec(["sh", "-c", "ls -la /run/sandbox-egress 2>&1; env | grep -i _proxy; true"], timeout=60)
    assert b"proxy.sock" not in res.stdout and b"127.0.0.1:3128" not in res.stdout
