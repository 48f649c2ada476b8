"""`sandbox doctor --backend kubernetes`: the API checks and the canaries in a claimed sandbox pod,
against the local fake API server. The fake's "pod" is a process on this host (root, no seccomp, no
NetworkPolicy), so the canaries must fail there: that is what they are for. The connection canary
only ever targets loopback addresses here."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from sandbox.cli import main
from sandbox.kube.backend import KubeBackend
from sandbox.kube.config import config_from_dict
from sandbox.kube.degradations import KNOWN_IDS
from sandbox.kube.doctor import CONNECT_ID, CRDS, PERMISSIONS, run_cluster_canaries
from sandbox.policy import load_policy
from tests.kube.fake_apiserver import FakeCluster, api_client
from tests.kube.test_backend import _crd

ACCEPT = {k: "accepted in this test on purpose" for k in KNOWN_IDS}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[FakeCluster]:
    c = FakeCluster(tmp_path / "k8s")
    for n, v in CRDS.items():
        c.crds[n] = _crd(n, v)
    c.runtime_classes.add("gvisor")
    c.namespace_labels["pod-security.kubernetes.io/enforce"] = "restricted"
    c.allowed |= {(v, r, s) for v, _, r, s in PERMISSIONS}
    yield c
    c.close()


@pytest.fixture
def open_port() -> Iterator[str]:
    """A loopback address something listens on: what a pod must not be able to reach."""
    srv = socket.socket()
    srv.bind(("127.0.0.9", 0))
    srv.listen(8)
    threading.Thread(target=lambda: [srv.accept()[0].close() for _ in range(8)], daemon=True).start()
    yield f"127.0.0.9:{srv.getsockname()[1]}"
    srv.close()


def test_the_canaries_run_in_a_claimed_pod_and_catch_a_network_that_is_not_enforced(cluster: FakeCluster,
                                                                                    open_port: str) -> None:
    b = KubeBackend(config_from_dict({"accept": ACCEPT, "canary_targets": [open_port, "127.0.0.9:9"]}),
                    api_client=api_client(cluster.url), ready_timeout=30)
    by = {c.name: c for c in b.doctor("default")}
    assert all(c.status == "ok" for n, c in by.items() if n.startswith(("crd ", "rbac ", "runtimeclass")))
    assert by["self-test (cluster sandbox)"].status == "fail" and "inside.user" in by["self-test (cluster sandbox)"].detail
    net = by["networkpolicy enforcement"]
    assert net.status == "fail" and f"connected to {open_port}" in net.detail
    assert len(cluster.exec_commands) == 1 and not cluster.claims, "one canary pod, claimed then deleted"


def test_the_connection_canary_passes_when_nothing_answers_and_the_route_checks_are_not_asked_of_a_pod(
        cluster: FakeCluster) -> None:
    b = KubeBackend(config_from_dict({"accept": ACCEPT, "canary_targets": ["127.0.0.9:9", "127.0.0.10:9"]}),
                    api_client=api_client(cluster.url), ready_timeout=30)
    rows = {r.id: r for r in run_cluster_canaries(b, load_policy("default"))}
    assert rows[CONNECT_ID].status == "pass" and "127.0.0.9:9 ConnectionRefusedError" in rows[CONNECT_ID].observed
    assert "inside.no_route" not in rows and "inside.metadata" not in rows
    assert rows["inside.user"].status == "fail"  # the fake pod runs as root: caught


def test_without_canaries_the_networkpolicy_row_is_never_ok(cluster: FakeCluster) -> None:
    b = KubeBackend(config_from_dict({"accept": ACCEPT}), api_client=api_client(cluster.url))
    by = {c.name: c for c in b.doctor(None)}
    assert by["networkpolicy enforcement"].status == "warn" and not cluster.exec_commands


def _use_fake_kubeconfig(cluster: FakeCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kubeconfig naming the fake API server, and no in-cluster or backend setting in the way."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": cluster.url}}],
        "users": [{"name": "u", "user": {"token": "not-a-real-token"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    for var in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "SANDBOX_BACKEND"):
        monkeypatch.delenv(var, raising=False)


def test_sandbox_doctor_backend_kubernetes_reads_the_kubeconfig_and_reports_json(cluster: FakeCluster, tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "kube.yaml"
    cfg.write_text(yaml.safe_dump({"accept": ACCEPT}))
    _use_fake_kubeconfig(cluster, tmp_path, monkeypatch)
    res = CliRunner().invoke(main, ["doctor", "--backend", "kubernetes", "--config", str(cfg), "--no-canaries", "--json"])
    doc = json.loads(res.output)
    names = {c["name"]: c["status"] for c in doc["checks"]}
    assert names["runtimeclass gvisor"] == "ok" and names["namespace sandboxes pod security"] == "ok"
    assert names["networkpolicy enforcement"] == "warn" and res.exit_code == 0, res.output
    assert ("GET", "/apis/node.k8s.io/v1/runtimeclasses/gvisor") in cluster.log
    bad = CliRunner().invoke(main, ["doctor", "--backend", "kubernetes", "--config", str(tmp_path / "missing.yaml")])
    assert bad.exit_code != 0 and "missing.yaml" in bad.output


def test_doctor_on_a_machine_without_the_workers_admin_token_checks_the_cluster_and_says_so(
        cluster: FakeCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "kube.yaml"
    missing = tmp_path / "no-such-token"
    cfg.write_text(yaml.safe_dump({"accept": ACCEPT, "egress_proxy": {"admin_token_file": str(missing)}}))
    _use_fake_kubeconfig(cluster, tmp_path, monkeypatch)
    res = CliRunner().invoke(main, ["doctor", "--backend", "kubernetes", "--config", str(cfg), "--no-canaries", "--json"])
    assert res.exit_code == 0, res.output
    names = {c["name"]: c for c in json.loads(res.output)["checks"]}
    assert names["egress admin token"]["status"] == "warn" and str(missing) in names["egress admin token"]["detail"]
    assert names["runtimeclass gvisor"]["status"] == "ok"

