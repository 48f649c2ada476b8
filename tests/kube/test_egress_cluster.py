"""The egress proxy in cluster mode on real loopback sockets: one TCP listener, "pods" told apart by
their source address (127.0.0.5 and 127.0.0.6 stand for two pod IPs), registrations over the
token-authenticated admin endpoint, the same ACL and audit as on a host. Loopback only: the
targets are our own servers on 127.0.0.2/3, and a guard fails the test before the proxy could
connect anywhere else."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.egress.acl import Decision
from sandbox.egress.audit import SessionAuditLogs
from sandbox.egress.cluster import AdminServer, ClusterEgressClient, ClusterEgressError, ClusterEgressProxy, read_token
from sandbox.egress.proxy import DENIED_HEADER, EgressProxy, StaticResolver
from sandbox.egress.rules import EgressPolicy
from tests.egress.egress_helpers import ALLOWED_ADDR, NAMES, OTHER_ADDR, Target
from tests.kube.pod_client import get_from_pod

pytestmark = pytest.mark.timeout(60)

POD_A, POD_B, STRANGER = "127.0.0.5", "127.0.0.6", "127.0.0.7"
TOKEN = "t0ken-" + "9f" * 20


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.audit_path = tmp / "audit.jsonl"
        self.audit = SessionAuditLogs(self.audit_path)

        async def start() -> tuple[ClusterEgressProxy, AdminServer, int, int]:
            proxy = ClusterEgressProxy(resolver=StaticResolver(NAMES), audit=self.audit)
            _, port = proxy.listen_tcp("127.0.0.1", 0)
            admin = AdminServer(proxy, TOKEN, self.audit_path)
            _, aport = await admin.start("127.0.0.1", 0)
            return proxy, admin, port, aport

        self.proxy, self.admin, self.port, self.admin_port = self.call(start())
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.client = ClusterEgressClient(self.admin_url, TOKEN)

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(15)

    def get(self, src: str, url: str) -> Any:
        """A request through the proxy from source address ``src`` (a "pod")."""
        return get_from_pod(self.port, src, url, timeout=5)

    def close(self) -> None:
        self.call(self.admin.close())
        self.call(self.proxy.close())
        self.audit.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def targets() -> Iterator[dict[str, Target]]:
    ts = {"allowed": Target(ALLOWED_ADDR).start(), "other": Target(OTHER_ADDR).start()}
    yield ts
    for t in ts.values():
        t.close()


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    original = EgressProxy._connect

    async def guarded(self: EgressProxy, decision: Decision, port: int, timeout: float) -> socket.socket:
        for a in decision.addrs or ((decision.addr,) if decision.addr else ()):
            assert ipaddress.ip_address(a).is_loopback, f"proxy tried to connect to non-loopback {a}"
        return await original(self, decision, port, timeout)

    monkeypatch.setattr(EgressProxy, "_connect", guarded)
    c = Cluster(tmp_path)
    yield c
    c.close()


def _policy(t: Target, host: str) -> EgressPolicy:
    return EgressPolicy.model_validate({"rules": [{"host": host, "ports": [t.port]}], "allow_cidrs": [f"{t.addr}/32"]})


def test_each_pod_address_gets_its_own_sessions_acl_and_every_decision_is_audited(
        cluster: Cluster, targets: dict[str, Target]) -> None:
    a, o = targets["allowed"], targets["other"]
    bundle = cluster.client.register("sess_a", POD_A, _policy(a, "allowed.test"), ttl_s=600)
    cluster.client.register("sess_b", POD_B, _policy(o, "other.test"), ttl_s=600)
    assert bundle.startswith(b"-----BEGIN CERTIFICATE-----") or bundle == b""  # the host's roots (no CA: nothing terminated)
    ok = cluster.get(POD_A, f"http://allowed.test:{a.port}/x")
    assert ok.status == 200 and ok.body == b"ok:/x"
    denied = cluster.get(POD_A, f"http://other.test:{o.port}/y")
    assert denied.status == 403 and DENIED_HEADER.lower() in denied.headers
    assert cluster.get(POD_B, f"http://other.test:{o.port}/z").status == 200
    assert cluster.get(POD_B, f"http://allowed.test:{a.port}/w").status == 403
    assert len(a.connections) == 1 and len(o.connections) == 1, "a denied request never reaches its target"
    # One record per decision, in each session's own log, read back through the admin endpoint.
    ra, rb = cluster.client.records("sess_a"), cluster.client.records("sess_b")
    assert [(r["decision"], r["host"]) for r in ra] == [("allow", "allowed.test"), ("deny", "other.test")]
    assert [(r["decision"], r["host"]) for r in rb] == [("allow", "other.test"), ("deny", "allowed.test")]
    assert {r["session"] for r in ra} == {"sess_a"} and {r["session"] for r in rb} == {"sess_b"}


def test_an_unregistered_source_gets_nothing_and_an_unregistered_pod_is_cut_off(
        cluster: Cluster, targets: dict[str, Target]) -> None:
    a = targets["allowed"]
    cluster.client.register("sess_a", POD_A, _policy(a, "allowed.test"), ttl_s=600)
    stranger = cluster.get(STRANGER, f"http://allowed.test:{a.port}/")
    assert stranger.raw == b"", "not one byte for an address nobody registered"
    assert cluster.proxy.unregistered == 1 and not a.connections
    # A connection the pod holds open when its session is unregistered is closed; new ones get nothing.
    with socket.socket() as s:
        s.bind((POD_A, 0))
        s.settimeout(5)
        s.connect(("127.0.0.1", cluster.port))
        s.sendall(b"GET http://allowed.test/ HTTP/1.1\r\n")  # a head still coming
        end = time.monotonic() + 5
        while not cluster.call(_conns(cluster.proxy, "sess_a")) and time.monotonic() < end:
            time.sleep(0.02)
        cluster.client.unregister("sess_a")
        got = b""
        while chunk := s.recv(65536):  # ends in EOF (closed by the proxy); a timeout would raise
            got += chunk
        assert got == b"" or b"session-removed" in got, got
    assert cluster.get(POD_A, f"http://allowed.test:{a.port}/").raw == b""
    assert not a.connections and cluster.proxy.registrations() == {}


async def _conns(proxy: ClusterEgressProxy, sid: str) -> int:
    sess = proxy._sessions.get(sid)
    return len(sess.conns) if sess else 0


def test_the_admin_endpoint_needs_the_token_and_never_echoes_it(cluster: Cluster, targets: dict[str, Target],
                                                                 tmp_path: Path) -> None:
    a = targets["allowed"]
    body = json.dumps({"pod_ip": STRANGER, "policy": _policy(a, "allowed.test").model_dump(mode="json"), "ttl_s": 60})
    for auth in (None, "Bearer wrong-" + TOKEN[6:], "Basic " + TOKEN, TOKEN):
        req = urllib.request.Request(f"{cluster.admin_url}/v1/sessions/sess_x", data=body.encode(), method="PUT",
                                     headers={"Authorization": auth} if auth else {})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=5)
        assert e.value.code == 401 and TOKEN.encode() not in e.value.read()
    assert cluster.proxy.registrations() == {} and cluster.get(STRANGER, f"http://allowed.test:{a.port}/").raw == b""
    with pytest.raises(ClusterEgressError) as err:
        ClusterEgressClient(cluster.admin_url, "x" * 40).register("sess_x", STRANGER, _policy(a, "allowed.test"), 60)
    assert "401" in str(err.value) and "x" * 40 not in str(err.value)
    with urllib.request.urlopen(f"{cluster.admin_url}/healthz", timeout=5) as r:  # probes need no token
        assert json.loads(r.read())["ok"] is True
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(ClusterEgressError, match="at least 32 characters") as err2:
        read_token(short)
    assert "abc" not in str(err2.value)


def test_bad_registrations_are_refused_with_a_reason(cluster: Cluster, targets: dict[str, Target]) -> None:
    a = targets["allowed"]
    cases = [
        ("sess_a", "not-an-ip", _policy(a, "allowed.test"), "does not appear to be an IPv4 or IPv6 address"),
        ("sess_a", "0.0.0.0", _policy(a, "allowed.test"), "cannot be a pod's address"),
        ("sess_a", POD_A, EgressPolicy.model_validate({"rules": [{"host": "api.test", "ports": [443],
                                                                  "credential": {"name": "tok"}}],
                                                       "credentials": {"tok": {"env": "EGRESS_CLUSTER_NOT_SET"}}}),
         r"credential 'tok' \(env EGRESS_CLUSTER_NOT_SET\): the variable is not set in the egress proxy's pod"),
    ]
    for sid, ip, pol, why in cases:
        with pytest.raises(ClusterEgressError, match=why):
            cluster.client.register(sid, ip, pol, ttl_s=60)
    with pytest.raises(ClusterEgressError, match="ttl_s"):
        cluster.client.register("sess_a", POD_A, _policy(a, "allowed.test"), ttl_s=-1)
    assert cluster.proxy.registrations() == {}


def test_re_registering_an_address_replaces_its_session_and_a_registration_expires(
        cluster: Cluster, targets: dict[str, Target]) -> None:
    a, o = targets["allowed"], targets["other"]
    cluster.client.register("sess_old", POD_A, _policy(a, "allowed.test"), ttl_s=600)
    # The pod died; the controller gave its IP to a new pod, which its worker registers for a new session.
    cluster.client.register("sess_new", POD_A, _policy(o, "other.test"), ttl_s=1)
    assert cluster.proxy.registrations() == {"sess_new": POD_A}
    assert cluster.get(POD_A, f"http://allowed.test:{a.port}/").status == 403
    assert cluster.get(POD_A, f"http://other.test:{o.port}/").status == 200
    # ... and when nobody unregisters it (the worker died), the registration ends at its expiry.
    end = time.monotonic() + 10
    while cluster.proxy.registrations() and time.monotonic() < end:
        time.sleep(0.1)
    assert cluster.proxy.registrations() == {}
    assert cluster.get(POD_A, f"http://other.test:{o.port}/").raw == b""


def test_the_kubernetes_backend_registers_its_pod_with_the_proxy_for_the_claims_life(cluster: Cluster,
                                                                                     tmp_path: Path) -> None:
    from sandbox.kube.backend import KubeBackend
    from sandbox.kube.config import config_from_dict
    from sandbox.kube.degradations import KNOWN_IDS
    from sandbox.policy import load_policy
    from tests.kube.fake_apiserver import FakeCluster, api_client

    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o400)
    cfg = config_from_dict({"accept": {k: "accepted in this test on purpose" for k in KNOWN_IDS},
                            "egress_proxy": {"cluster_ip": "10.96.0.53", "admin_url": cluster.admin_url,
                                             "admin_token_file": str(token_file)}})
    api = FakeCluster(tmp_path / "k8s")
    try:
        b = KubeBackend(cfg, api_client=api_client(api.url), ready_timeout=30)  # the proxy client from the config
        pol = load_policy("python-packages")
        sb = b.create(pol, session_id="sess_pod")
        try:
            assert cluster.proxy.registrations() == {"sess_pod": "10.4.0.7"}  # the fake pod's IP, after Ready
            got = sb.exec(["sh", "-c", 'cat "$SANDBOX_EGRESS_DIR/ca-bundle.pem"'])
            assert got.exit_code == 0 and got.stdout == cluster.call(cluster.proxy.register(
                "sess_pod", "10.4.0.7", pol.egress, 60))  # the same bundle the proxy hands out
        finally:
            sb.destroy()
        assert cluster.proxy.registrations() == {} and not api.claims
        # The proxy's admin endpoint refusing (wrong token) means no sandbox, and no claim left behind.
        token_file.chmod(0o600)
        token_file.write_text("w" * 40)
        b2 = KubeBackend(cfg, api_client=api_client(api.url), ready_timeout=30)
        with pytest.raises(Exception, match="egress proxy refused pod .*401"):
            b2.create(pol, session_id="sess_refused")
        assert not api.claims and cluster.proxy.registrations() == {}
    finally:
        api.close()


def test_a_proxy_that_forgot_a_live_session_gets_it_registered_again_by_the_worker(
        cluster: Cluster, targets: dict[str, Target], tmp_path: Path) -> None:
    a = targets["allowed"]
    client = ClusterEgressClient(cluster.admin_url, TOKEN, mirror_dir=tmp_path / "mirror")
    client.register("sess_a", POD_A, _policy(a, "allowed.test"), ttl_s=600)
    assert cluster.get(POD_A, f"http://allowed.test:{a.port}/1").status == 200
    end = time.monotonic() + 10
    while not client.records("sess_a") and time.monotonic() < end:  # copied by the worker's side
        time.sleep(0.05)
    cluster.call(cluster.proxy.unregister("sess_a"))  # as after a restart of the proxy: nothing known
    end = time.monotonic() + 10
    while not cluster.proxy.registrations() and time.monotonic() < end:
        time.sleep(0.05)
    assert cluster.proxy.registrations() == {"sess_a": POD_A}
    assert cluster.get(POD_A, f"http://allowed.test:{a.port}/2").status == 200
    client.unregister("sess_a")
    # every decision of both registrations is in the worker's copy, once (the new proxy numbers anew)
    paths = [r.get("path") for r in client.records("sess_a", limit=100)]
    assert sorted(paths) == ["/1", "/2"], paths
    assert cluster.proxy.registrations() == {}
