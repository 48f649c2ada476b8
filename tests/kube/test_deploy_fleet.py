"""deploy/kubernetes as a fleet: several worker replicas share one session store, on a ReadWriteMany
volume, with the journal a network filesystem can hold; no sandbox ever mounts that store."""

from __future__ import annotations

from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"


def _docs() -> list[dict]:
    return [d for p in sorted(DEPLOY.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def _worker() -> dict:
    return next(d for d in _docs() if d["kind"] == "Deployment" and d["metadata"]["name"] == "sandbox-worker")


def test_several_workers_share_one_readwritemany_store_with_the_file_journal():
    worker = _worker()
    assert worker["spec"]["replicas"] >= 2
    spec = worker["spec"]["template"]["spec"]
    vol = next(v for v in spec["volumes"] if v.get("persistentVolumeClaim"))
    claim = next(d for d in _docs() if d["kind"] == "PersistentVolumeClaim"
                 and d["metadata"]["name"] == vol["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["metadata"]["namespace"] == worker["metadata"]["namespace"]
    (container,) = spec["containers"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == vol["name"])
    argv = container["command"]
    assert argv[argv.index("--session-store") + 1] == mount["mountPath"]
    # SQLite's locks and shared memory are not trusted on a network filesystem: the journal is files.
    assert argv[argv.index("--journal") + 1] == "files"
    # The pod's own state (worker lock, SDK work dir) is not the shared store.
    state = argv[argv.index("--state-dir") + 1]
    assert not mount["mountPath"].startswith(state.rstrip("/") + "/") and mount["mountPath"] != state


def test_no_sandbox_pod_can_mount_the_session_store(tmp_path):
    """The compiled sandbox template (the shipped worker profile and configuration) has memory volumes
    only: no claim, no host path, nothing that could reach the workers' shared store."""
    from sandbox.kube import compiler as kc
    from sandbox.kube.config import config_from_dict
    from sandbox.policy import load_policy

    data = next(d for d in _docs() if d["kind"] == "ConfigMap" and "kube.yaml" in d.get("data", {}))["data"]
    cfg = config_from_dict(yaml.safe_load(data["kube.yaml"]))
    prof = tmp_path / "worker-gvisor.yaml"
    prof.write_text(data["worker-gvisor.yaml"])
    for d in kc.compile_manifests(load_policy(str(prof)), cfg):
        assert "sandbox-sessions" not in yaml.safe_dump(d), d["kind"]
        if d["kind"] == "SandboxTemplate":
            vols = d["spec"]["podTemplate"]["spec"]["volumes"]
            assert vols and all(set(v) == {"name", "emptyDir"} for v in vols), vols
