"""The Kubernetes backend's calls - claim, watch until ready, exec stream carrying the agent
protocol, delete - against a local server that plays the API server at the client boundary
(tests/kube/fake_apiserver.py), with the official `kubernetes` client and the real agent.

Nothing here has run against a real cluster: see deploy/kubernetes/README.md for that check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandbox.backend import Backend, DockerBackend, open_backend
from sandbox.kube import compiler as kc
from sandbox.kube.backend import KubeBackend
from sandbox.kube.config import config_from_dict
from sandbox.kube.degradations import KNOWN_IDS
from sandbox.policy import load_policy, policy_from_dict
from sandbox.runtime import SANDBOX_ERROR_EXIT, SandboxError
from tests.kube.fake_apiserver import FakeCluster, api_client

ACCEPT = {"accept": {k: "accepted in this test on purpose" for k in KNOWN_IDS}}
REPO = Path(__file__).resolve().parents[2]


def _until(pred, timeout=15.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _policy(session_s: float = 600, **over):
    base = load_policy("default").model_dump(mode="json")
    base["timeouts"]["session_s"] = session_s
    base.update(over)
    return policy_from_dict(base)


class Registry:
    def __init__(self, bundle: bytes | None = None) -> None:
        self.calls: list[tuple] = []
        self.bundle = bundle

    def register(self, session_id, pod_ip, policy, ttl_s):
        self.calls.append(("register", session_id, pod_ip, tuple(r.host for r in policy.rules), ttl_s))
        return self.bundle

    def unregister(self, session_id):
        self.calls.append(("unregister", session_id))


@pytest.fixture
def cluster(tmp_path):
    c = FakeCluster(tmp_path)
    yield c
    c.close()


@pytest.fixture
def backend(cluster):
    made = []

    def make(ready_timeout=15.0, egress=None, **cfg):
        b = KubeBackend(config_from_dict({**ACCEPT, **cfg}), api_client=api_client(cluster.url), egress=egress,
                        ready_timeout=ready_timeout)
        made.append(b)
        return b

    yield make
    for b in made:
        for sb in list(b._bridges):
            b._delete_claim(sb)


def test_both_backends_satisfy_the_protocol(cluster):
    kb = KubeBackend(config_from_dict({}), api_client=api_client(cluster.url))
    assert isinstance(kb, Backend)
    assert isinstance(DockerBackend(runtime=object()), Backend)
    with pytest.raises(ValueError, match="unknown backend"):
        open_backend("nomad")


def test_session_runs_the_same_agent_over_the_exec_stream_with_authenticated_frames(cluster, backend):
    b = backend()
    pol = _policy(session_s=600)
    before = time.time()
    sb = b.create(pol, session_id="sess_demo")
    try:
        res = sb.exec(["sh", "-c", "echo hello; echo oops >&2; exit 3"])
        assert (res.exit_code, res.stdout, res.stderr) == (3, b"hello\n", b"oops\n")
        assert sb.exec(["true"]).exit_code == 0
        # the claim: the policy's warm pool, removed by the controller at the session limit
        (claim,) = cluster.claims.values()
        assert claim["spec"]["warmPoolRef"] == {"name": "sandbox-default"}
        life = claim["spec"]["lifecycle"]
        assert life["shutdownPolicy"] == "Delete"
        shutdown = time.mktime(time.strptime(life["shutdownTime"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
        assert before + 600 <= shutdown <= time.time() + 602
        assert "env" not in claim["spec"], "nothing (no key, no token) is injected into the pod"
        # the exec: the launcher (hard rlimits, then the agent), in the sandbox container
        assert cluster.exec_commands == [kc.agent_command(pol)]
        # the channel: the hello with the key first, then every line MAC'd under that key
        hello = json.loads(cluster.stdin_messages[0])
        assert hello["op"] == "hello" and len(bytes.fromhex(hello["key"])) == 32 and hello["session_s"] == 600
        rest = b"".join(cluster.stdin_messages[1:]).splitlines()
        assert rest and all(len(line.split(b" ", 1)[0]) == 32 and line.split(b" ", 1)[1].startswith(b"{")
                            for line in rest)
        assert not any(hello["key"].encode() in m for m in cluster.stdin_messages[1:])
        assert sb.uid == b.config.template_ids("default")[0]
    finally:
        sb.destroy()
    assert cluster.deleted_by_client == [claim["metadata"]["name"]] and not cluster.claims
    assert ("DELETE", f"/apis/extensions.agents.x-k8s.io/v1beta1/namespaces/sandboxes/sandboxclaims/{claim['metadata']['name']}") \
        in cluster.log


def test_a_pod_that_never_becomes_ready_ends_in_an_error_and_a_deleted_claim(cluster, backend):
    cluster.never_ready = True
    b = backend(ready_timeout=1.5)
    with pytest.raises(SandboxError, match="not ready within"):
        b.create(_policy(), session_id="sess_stuck")
    assert len(cluster.deleted_by_client) == 1 and not cluster.claims
    assert cluster.exec_commands == []


def test_a_claim_deleted_before_the_watch_begins_is_an_error_at_once_not_a_wait(cluster, backend):
    cluster.delete_at_once = True
    b = backend(ready_timeout=120)
    with pytest.raises(SandboxError, match="was deleted before it was ready"):
        b.create(_policy(), session_id="sess_gone")
    assert cluster.exec_commands == [] and not cluster.claims


def test_an_exec_stream_that_drops_mid_call_fails_the_call_and_deletes_the_claim(cluster, backend):
    b = backend()
    sb = b.create(_policy(), session_id="sess_drop")
    name = sb.id
    cluster.drop_exec_after = len(cluster.stdin_messages) + 1  # the next request is cut off
    res = sb.exec(["sleep", "30"], timeout=60)
    assert res.exit_code == SANDBOX_ERROR_EXIT and "agent stopped" in (res.error or "")
    _until(lambda: name in cluster.deleted_by_client, what="the claim's deletion")
    assert not sb.alive
    assert sb.exec(["true"]).exit_code == SANDBOX_ERROR_EXIT


def test_a_forged_frame_from_the_pod_ends_the_sandbox(cluster, backend):
    cluster.forge_after_ready = True
    b = backend()
    try:
        sb = b.create(_policy(), session_id="sess_forge")
    except SandboxError:
        assert len(cluster.deleted_by_client) == 1  # refused before it was handed out: also fine
        return
    _until(lambda: sb.id in cluster.deleted_by_client, what="the claim's deletion")
    assert sb.channel.violation and not sb.alive


def test_the_controller_deletes_the_claim_at_its_shutdown_time_when_the_worker_died(cluster, tmp_path):
    # A worker process claims a sandbox and is killed outright: nothing of it is left to clean up.
    code = f"""
import os, sys
sys.path.insert(0, {str(REPO)!r})
from sandbox.kube.backend import KubeBackend
from sandbox.kube.config import config_from_dict
from sandbox.policy import load_policy, policy_from_dict
from tests.kube.fake_apiserver import api_client
d = load_policy("default").model_dump(mode="json"); d["timeouts"]["session_s"] = 4
b = KubeBackend(config_from_dict({ACCEPT!r}), api_client=api_client({cluster.url!r}))
sb = b.create(policy_from_dict(d), session_id="sess_orphan")
print(sb.id, flush=True)
os.kill(os.getpid(), 9)
"""
    out, err = tmp_path / "out", tmp_path / "err"
    with out.open("wb") as o, err.open("wb") as e:  # files, not pipes: nothing waits on a pipe's other holders
        p = subprocess.Popen([sys.executable, "-c", code], stdout=o, stderr=e, cwd=REPO)
        assert p.wait(timeout=60) == -9, err.read_text()
    name = out.read_text().strip()
    assert name.startswith("sbx-sess-orphan-"), err.read_text()
    _until(lambda: name in cluster.deleted_by_controller, timeout=20, what="the controller's deletion")
    assert cluster.deleted_by_client == [] and not cluster.claims and not cluster.pods


def test_egress_registers_the_pod_address_installs_the_trust_bundle_and_unregisters_at_the_end(cluster, backend):
    bundle = b"-----BEGIN CERTIFICATE-----\nMIIB-session-ca\n-----END CERTIFICATE-----\n"
    reg = Registry(bundle)
    b = backend(egress=reg, egress_proxy={"cluster_ip": "10.96.0.53"})
    pol = load_policy("python-packages")
    sb = b.create(pol, session_id="sess_net")
    try:
        # registered for the session's limit (the claim's shutdownTime), so a dead worker's entry expires
        assert reg.calls == [("register", "sess_net", "10.4.0.7", ("pypi.org", "files.pythonhosted.org"),
                              float(pol.timeouts.session_s + 1))]
        # the bundle sits where the template's CA variables point, before the sandbox is handed out
        r = sb.exec(["sh", "-c", 'cat "$SANDBOX_EGRESS_DIR/ca-bundle.pem"'])
        assert r.exit_code == 0 and r.stdout == bundle
    finally:
        sb.destroy()
    assert reg.calls[-1] == ("unregister", "sess_net")


def test_egress_without_a_registry_and_host_mounts_are_refused(cluster, backend, tmp_path):
    b = backend()
    with pytest.raises(SandboxError, match="no egress proxy registry"):
        b.create(load_policy("python-packages"))
    with pytest.raises(SandboxError, match="cannot mount host paths"):
        b.create(_policy(), workspace=tmp_path)
    assert cluster.claims == {} and ("POST", "/apis/extensions.agents.x-k8s.io/v1beta1/namespaces/sandboxes/sandboxclaims") \
        not in cluster.log


def test_prepare_refuses_a_missing_or_stale_template(cluster, backend):
    b = backend()
    pol = load_policy("default")
    with pytest.raises(SandboxError, match="does not exist.*policy compile default --target kubernetes"):
        b.prepare(pol)
    tpl = kc.sandbox_template(pol, b.config)
    cluster.templates[tpl["metadata"]["name"]] = dict(tpl, metadata={**tpl["metadata"], "annotations": {kc.ANN_DIGEST: "sha256:old"}})
    with pytest.raises(SandboxError, match="enforces sha256:old"):
        b.prepare(pol)
    cluster.templates[tpl["metadata"]["name"]] = tpl
    assert b.prepare(pol).digest == pol.digest()
    unaccepted = KubeBackend(config_from_dict({}), api_client=api_client(cluster.url))
    with pytest.raises(SandboxError, match="limits.pids"):
        unaccepted.prepare(pol)


def test_warm_pool_size_goes_through_the_scale_subresource(cluster, backend):
    b = backend()
    pol = load_policy("default")
    assert b.warm_pool_size(pol, 3) == 3 and b.warm_pool_size(pol) == 3
    assert ("PATCH", "/apis/extensions.agents.x-k8s.io/v1beta1/namespaces/sandboxes/sandboxwarmpools/sandbox-default/scale") \
        in cluster.log


def test_reap_deletes_claims_of_an_earlier_life_of_this_worker_only(cluster, backend):
    b = backend()
    sb = b.create(_policy(), session_id="sess_live")
    try:
        stale = kc.claim(load_policy("default"), b.config, "sbx-stale", "sess_old", "2099-01-01T00:00:00Z")
        stale["metadata"]["labels"]["sandbox.dev/owner"] = b.owner.rsplit("-", 1)[0] + "-1"
        other = kc.claim(load_policy("default"), b.config, "sbx-other", "sess_other", "2099-01-01T00:00:00Z")
        other["metadata"]["labels"]["sandbox.dev/owner"] = "worker-elsewhere-7"
        for c in (stale, other):
            b._custom().create_namespaced_custom_object(kc.SANDBOX_GROUP, kc.SANDBOX_VERSION, "sandboxes", "sandboxclaims", c)
        assert {i.id for i in b.list()} == {sb.id, "sbx-stale", "sbx-other"}
        assert b.reap() == ["sbx-stale"]
        assert set(cluster.claims) == {sb.id, "sbx-other"}
    finally:
        sb.destroy()


def test_the_kubernetes_package_is_only_imported_when_used():
    code = ("import sys; import sandbox.backend, sandbox.kube.backend, sandbox.kube.compiler; "
            "print(any(m == 'kubernetes' or m.startswith('kubernetes.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env={**os.environ})
    assert out.stdout.strip() == "False", out.stderr


def _crd(name: str, version: str) -> dict:
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", "metadata": {"name": name},
            "spec": {"group": name.split(".", 1)[1], "scope": "Namespaced",
                     "names": {"plural": name.split(".")[0], "kind": "X"},
                     "versions": [{"name": version, "served": True, "storage": True}]}}


def test_doctor_reports_what_the_cluster_lacks_and_what_it_cannot_see(cluster, backend):
    from sandbox.kube.doctor import CRDS, PERMISSIONS

    b = backend()
    by = {c.name: c for c in b.doctor()}
    assert all(by[f"crd {n}"].status == "fail" for n in CRDS)
    assert by["runtimeclass gvisor"].status == "fail" and "gVisor" in by["runtimeclass gvisor"].fix
    assert by["namespace sandboxes pod security"].status == "warn"
    assert all(c.status == "fail" for n, c in by.items() if n.startswith("rbac "))
    # now a cluster with everything in place
    for n, v in CRDS.items():
        cluster.crds[n] = _crd(n, v)
    cluster.crds["sandboxclaims.extensions.agents.x-k8s.io"] = _crd("sandboxclaims.extensions.agents.x-k8s.io", "v1alpha1")
    cluster.runtime_classes.add("gvisor")
    cluster.namespace_labels["pod-security.kubernetes.io/enforce"] = "restricted"
    cluster.allowed |= {(v, r, s) for v, _, r, s in PERMISSIONS}
    by = {c.name: c for c in b.doctor()}
    assert by["crd sandboxclaims.extensions.agents.x-k8s.io"].status == "fail"  # only v1alpha1 served
    others = [c for n, c in by.items() if n != "crd sandboxclaims.extensions.agents.x-k8s.io"
              and n != "networkpolicy enforcement"]
    assert all(c.status == "ok" for c in others), [c for c in others if c.status != "ok"]
    # NetworkPolicy enforcement is never reported ok from the API alone
    assert by["networkpolicy enforcement"].status == "warn" and "canary" in by["networkpolicy enforcement"].fix


def test_what_a_sandbox_calls_on_its_maker_is_exactly_the_sandbox_owner_interface(cluster):
    """Both makers implement SandboxOwner, and Sandbox calls nothing else on them: a new call would
    break the Kubernetes backend silently, so it must be added to the interface (and here) first."""
    import ast
    import inspect
    import typing

    from sandbox import runtime as rt
    from sandbox.backend import SandboxOwner

    tree = ast.parse(inspect.getsource(rt.Sandbox))
    called = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
              and isinstance(n.value, ast.Attribute) and n.value.attr == "runtime"
              and isinstance(n.value.value, ast.Name) and n.value.value.id == "self"}
    declared = {n for n in vars(SandboxOwner) if not n.startswith("__") and callable(getattr(SandboxOwner, n))
                and n not in dir(typing.Protocol)}
    assert called == declared == {"log_event", "_teardown"}
    kb = KubeBackend(config_from_dict({}), api_client=api_client(cluster.url))
    assert isinstance(kb, SandboxOwner) and issubclass(rt.Runtime, SandboxOwner)
    for maker in (rt.Runtime, KubeBackend):
        assert "wait" in inspect.signature(maker._teardown).parameters
