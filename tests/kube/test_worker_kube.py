"""The worker on the backend seam: the same worker, tools, journal and audit trail, with its sandboxes
claimed from a cluster (the Kubernetes backend against the local fake API server, the real agent
behind the pod exec stream) instead of Docker.

What this shows and what it does not: the worker's code path on `backend: kubernetes` (claim,
watch, exec stream with the HMAC agent protocol, delete; the workspace carried between the
sandboxes of a session) runs end to end here. Nothing ran against a real cluster.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.audit.trail import verify
from sandbox.controlplane import ControlPlane, LocalAdmin
from sandbox.kube.backend import KubeBackend
from sandbox.kube.config import config_from_dict
from sandbox.kube.degradations import KNOWN_IDS
from sandbox.worker import EnvironmentKey, Worker, WorkerConfig
from sandbox.worker.pool import open_runtime, uses_host_workspaces
from sandbox.worker.runner import BackgroundWorker
from sandbox.worker.store import SessionMeta, SessionStore
from tests.kube.fake_apiserver import FakeCluster, api_client
from tests.worker.helpers import LogCapture, call, free_port, wait_for

# The connection canary's targets stay on this machine: a closed loopback port (nothing is sent elsewhere).
ACCEPT = {"accept": {k: "accepted in this test on purpose" for k in KNOWN_IDS}, "canary_targets": ["127.0.0.9:9"]}
CLAIMS = "/apis/extensions.agents.x-k8s.io/v1beta1/namespaces/sandboxes/sandboxclaims"


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL", "ANTHROPIC_ENVIRONMENT_KEY",
                "ANTHROPIC_ENVIRONMENT_KEY_FILE", "SANDBOX_BACKEND"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[FakeCluster]:
    c = FakeCluster(tmp_path / "cluster")
    yield c
    c.close()


@pytest.fixture
def kube_worker(cp: ControlPlane, cluster: FakeCluster, tmp_path: Path,
                worker_logs: LogCapture) -> Iterator[Callable[..., Worker]]:
    running: list[BackgroundWorker] = []

    def start(**overrides: Any) -> Worker:
        backend = KubeBackend(config_from_dict(ACCEPT), api_client=api_client(cluster.url), ready_timeout=30)
        cfg: dict[str, Any] = dict(base_url=cp.base_url, environment_id=cp.environment_id,
                                   state_dir=tmp_path / f"worker{len(running)}", store_dir=tmp_path / "sessions",
                                   max_sessions=2, warm=0, lease_ttl=10, max_idle=30.0, park_grace=60.0,
                                   selftest=False, backend="kubernetes")
        cfg.update(overrides)
        worker = Worker(WorkerConfig(**cfg), EnvironmentKey(cp.environment_key, "test"), runtime=backend)  # type: ignore[arg-type]
        running.append(BackgroundWorker(worker).start())
        return worker

    yield start
    for bw in reversed(running):
        bw.stop(timeout=90)


def test_the_worker_serves_tool_calls_from_cluster_sandboxes_and_carries_the_workspace_between_them(
        cp: ControlPlane, admin: LocalAdmin, cluster: FakeCluster, kube_worker: Callable[..., Worker],
        worker_logs: LogCapture, tmp_path: Path) -> None:
    worker = kube_worker(max_idle=1.0)
    assert worker.store is not None and worker.store.host_workspaces is False
    sid = admin.create_session(cp.environment_id)
    # The SDK's tools, unchanged, run inside the claimed sandbox through the exec stream.
    assert call(admin, sid, "write", {"file_path": "proj/hello.txt", "content": "hello cluster\n"}, timeout=60)[:2] == \
        (False, "wrote 14 bytes to proj/hello.txt")
    assert call(admin, sid, "read", {"file_path": "proj/hello.txt"})[:2] == (False, "hello cluster\n")
    err, text, _ = call(admin, sid, "bash", {"command": "cat proj/hello.txt; env | grep -c ANTHROPIC_ || true"})
    assert (err, text) == (False, "hello cluster\n0"), text
    (first,) = cluster.claims.values()
    assert first["spec"]["warmPoolRef"] == {"name": "sandbox-worker"} and "env" not in first["spec"]
    assert len(cluster.exec_commands) == 1  # one agent per sandbox: the tools are channel requests
    # The run goes idle: the sandbox saves its workspace (as it writes it) and its claim is deleted.
    admin.send_idle(sid)
    wait_for(lambda: worker_logs.events("work_done"), timeout=60, what="the idle run to end")
    wait_for(lambda: first["metadata"]["name"] in cluster.deleted_by_client, what="the claim's deletion")
    (saved,) = worker_logs.events("workspace_saved")
    store, meta = _check_archive(tmp_path, sid, saved)
    assert not list((tmp_path / "sessions" / "workspaces").glob("*.img")), "nothing is mounted on the worker"
    # Work arrives again: a new claim, a new pod, the session's files unpacked into it.
    err, text, _ = call(admin, sid, "bash", {"command": "cat proj/hello.txt; pwd"}, timeout=60)
    assert not err and text.splitlines()[0] == "hello cluster", text
    second = [n for n in cluster.claims if n != first["metadata"]["name"]]
    assert len(second) == 1 and text.splitlines()[1].endswith(cluster.claims[second[0]]["_pod"])
    assigned = worker_logs.events("sandbox_assigned")
    assert [r["source"] for r in assigned] == ["fresh", "resumed"]
    assert assigned[0]["workspace"] == assigned[1]["workspace"] == meta.workspace
    # The session ends: its claim, its archive and its entry go; the trail stays, one chain over both runs.
    admin.terminate(sid)
    wait_for(lambda: worker_logs.events("session_removed"), timeout=60, what="the session's removal")
    wait_for(lambda: not cluster.claims, what="every claim deleted")
    # (the session is removed just before its run's trail is closed: wait for that too)
    wait_for(lambda: len(worker_logs.events("trail_closed")) == 2, timeout=60, what="both runs' trails closed")
    assert store.meta(sid) is None and not store.workspace_archive(meta.workspace).exists()
    res = verify(store.trail_path(sid))
    assert res.ok and res.runs == 2, res
    assert worker.metrics.results_posted._value.get() == 4
    # Every call the worker made to the cluster: claims created and deleted, nothing else written.
    writes = {(m, p.rsplit("/", 1)[0] if m == "DELETE" else p) for m, p in cluster.log if m in ("POST", "PATCH", "DELETE")
              and "/exec" not in p}
    assert writes == {("POST", CLAIMS), ("DELETE", CLAIMS)}


def test_the_start_up_canaries_run_in_a_cluster_sandbox_and_a_failing_one_refuses_service(
        cp: ControlPlane, cluster: FakeCluster, kube_worker: Callable[..., Worker]) -> None:
    # The fake "pod" is a process on this host as root: no seccomp, all capabilities. The canaries must
    # see that through the exec stream and the worker must refuse to serve.
    with pytest.raises(Exception, match="refusing to serve: sandbox self-test failed.*inside.user") as e:
        kube_worker(selftest=True)
    assert "inside.no_route" not in str(e.value), "a pod has a route by construction: not a canary there"
    assert len(cluster.exec_commands) == 1 and cluster.deleted_by_client, "one canary sandbox, claimed and deleted"
    assert not cluster.claims


def test_the_backend_setting_picks_the_source_of_sandboxes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert uses_host_workspaces(backend="docker") and not uses_host_workspaces(backend="kubernetes")
    monkeypatch.setenv("SANDBOX_BACKEND", "kubernetes")
    assert not uses_host_workspaces()
    kb = open_runtime(None, state_dir=tmp_path, owner_kind="worker")
    assert isinstance(kb, KubeBackend) and not uses_host_workspaces(kb)
    monkeypatch.setenv("SANDBOX_BACKEND", "nomad")
    with pytest.raises(ValueError, match=r"unknown backend 'nomad' \(\$SANDBOX_BACKEND\)"):
        uses_host_workspaces()


def test_the_docker_path_hands_the_worker_the_runtime_itself() -> None:
    # Docker stays as it was: the worker gets a sandbox.runtime.Runtime (no wrapper on its hot path).
    code = ("from pathlib import Path; from sandbox.worker.pool import open_runtime; "
            "from sandbox.runtime import Runtime; "
            "r = open_runtime('docker', state_dir=Path('/nonexistent-state'), owner_kind='worker'); "
            "print(type(r) is Runtime, r.state_dir, r.owner.startswith('worker'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.split() == ["True", "/nonexistent-state", "True"], out.stderr


def test_a_bad_backend_configuration_stops_the_worker_with_the_file_and_key(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox.worker.worker import WorkerError

    bad = tmp_path / "kube.yaml"
    bad.write_text("namespace: Not_A_Label\negress_proxy: {admin_token_file: /nonexistent/token}\n")
    monkeypatch.setenv("SANDBOX_KUBE_CONFIG", str(bad))
    with pytest.raises(WorkerError, match=r"(?s)cannot open the sandbox backend kubernetes: .*kube.yaml: namespace: .Not_A_Label. is not a DNS label"):
        open_runtime("kubernetes", state_dir=tmp_path, owner_kind="worker")
    bad.write_text("egress_proxy: {admin_token_file: /nonexistent/token}\n")
    with pytest.raises(WorkerError, match="cannot read the egress admin token file /nonexistent/token"):
        open_runtime("kubernetes", state_dir=tmp_path, owner_kind="worker")


def test_a_cluster_session_with_egress_goes_through_the_cluster_proxy_and_its_decisions_reach_the_trail(
        cp: ControlPlane, admin: LocalAdmin, cluster: FakeCluster, tmp_path: Path, worker_logs: LogCapture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import ipaddress
    import json
    import socket as _socket

    from sandbox.egress.acl import Decision
    from sandbox.egress.proxy import EgressProxy
    from tests.egress.egress_helpers import ALLOWED_ADDR, OTHER_ADDR, Target
    from tests.kube.test_egress_cluster import TOKEN, Cluster

    original = EgressProxy._connect

    async def guarded(self: EgressProxy, decision: Decision, port: int, timeout: float) -> _socket.socket:
        for a in decision.addrs or ((decision.addr,) if decision.addr else ()):
            assert ipaddress.ip_address(a).is_loopback, f"proxy tried to connect to non-loopback {a}"
        return await original(self, decision, port, timeout)

    monkeypatch.setattr(EgressProxy, "_connect", guarded)
    allowed, other = Target(ALLOWED_ADDR).start(), Target(OTHER_ADDR).start()
    (tmp_path / "proxy").mkdir()
    proxy = Cluster(tmp_path / "proxy")
    try:
        # The fake's "pods" are processes on this host: their connections to the proxy come from 127.0.0.1.
        cluster.pod_ip = "127.0.0.1"
        token = tmp_path / "admin-token"
        token.write_text(TOKEN)
        token.chmod(0o400)
        profile = tmp_path / "net.yaml"
        profile.write_text(
            "extends: worker\negress:\n"
            f"  rules: [{{host: allowed.test, ports: [{allowed.port}]}}]\n"
            f"  allow_cidrs: ['{ALLOWED_ADDR}/32']\n"
            f"unsafe: {{egress.allow_cidrs.{ALLOWED_ADDR}/32: 'the test target is a loopback server of this test'}}\n")
        cfg = config_from_dict({**ACCEPT, "egress_proxy": {"cluster_ip": "127.0.0.1", "port": proxy.port,
                                                            "admin_url": proxy.admin_url, "admin_token_file": str(token)}})
        state = tmp_path / "worker-net"
        backend = KubeBackend(cfg, api_client=api_client(cluster.url), ready_timeout=30, state_dir=state)
        worker = Worker(WorkerConfig(base_url=cp.base_url, environment_id=cp.environment_id, state_dir=state,
                                     store_dir=tmp_path / "sessions", profile=str(profile), max_sessions=1,
                                     lease_ttl=10, max_idle=30.0, selftest=False, backend="kubernetes"),
                        EnvironmentKey(cp.environment_key, "test"), runtime=backend)  # type: ignore[arg-type]
        with BackgroundWorker(worker):
            sid = admin.create_session(cp.environment_id)
            curl = f"curl -sS -o /dev/null -w '%{{http_code}}' -x http://127.0.0.1:{proxy.port}"
            err, text, _ = call(admin, sid, "bash", {"command": f"{curl} http://allowed.test:{allowed.port}/ok; echo; "
                                                                f"{curl} http://other.test:{other.port}/no"}, timeout=60)
            assert (err, text.split()) == (False, ["200", "403"]), text
            assert len(allowed.connections) == 1 and not other.connections
            # the bundle for the pod was installed where the CA variables point
            (pod,) = [c["_pod"] for c in cluster.claims.values()]
            assert (cluster.workdir / "pods" / f"{pod}.egress" / "ca-bundle.pem").is_file()
            # the decisions are copied to the worker while the run is active (its denial counter reads them)
            wait_for(lambda: len(backend.egress.records(session=sid)) == 2, what="the decisions' local copy")
            admin.terminate(sid)
            wait_for(lambda: worker_logs.events("trail_closed"), timeout=60, what="the session's trail to close")
        assert proxy.proxy.registrations() == {} and not cluster.claims
        store = SessionStore(tmp_path / "sessions", host_workspaces=False)
        assert verify(store.trail_path(sid)).ok
        recs = [json.loads(line) for line in store.trail_path(sid).read_text().splitlines()]
        egress = [(r["decision"], r["host"]) for r in recs if r.get("kind") == "egress"]
        # (recorded when each connection ends: an allowed one may close after the next one was refused)
        assert sorted(egress) == [("allow", "allowed.test"), ("deny", "other.test")], egress
        assert not worker_logs.events("trail_failed")
    finally:
        proxy.close()
        allowed.close()
        other.close()


def test_a_cluster_session_gets_its_skills_copied_into_its_pod_read_only_by_mode_without_links_or_a_bomb(
        cluster: FakeCluster, tmp_path: Path, worker_logs: LogCapture) -> None:
    """Skills on a cluster: no host path reaches a pod, so the worker copies the run's skills (as the
    SDK placed them) into the pod's skills volume (/mnt/skills; here the fake pod's directory) over
    the exec channel, before the first tool call; without symlinks, hard links or devices, and a
    skill over the cap left out whole. Read-only by MODE only (the pod's uid owns what it unpacked:
    not a boundary, unlike Docker's read-only mount)."""
    from tests.worker.test_skills import _add, _tar, _zip

    d = tmp_path / "archives"
    d.mkdir()
    paths = [
        _zip(d / "good.zip", {"good/SKILL.md": b"# good\nuse me\n", "good/scripts/run.sh": b"#!/bin/sh\necho skill-ran\n"},
             modes={"good/scripts/run.sh": 0o755}),
        _tar(d / "links.tar.gz", lambda t: (
            _add(t, "links/SKILL.md", b"# links\n"),
            _add(t, "links/passwd", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
            _add(t, "links/hard", type=tarfile.LNKTYPE, linkname="/etc/shadow"),
            _add(t, "links/dev", type=tarfile.CHRTYPE, devmajor=1, devminor=3))),
        _zip(d / "zbig.zip", {"zbig/SKILL.md": b"x", "zbig/zeros": b"\0" * (3 << 20)}),
    ]
    with ControlPlane(tmp_path / "cp", port=free_port(), sse_ping_interval=0.5, skills=paths) as cp, \
            LocalAdmin(cp.base_url, cp.admin_key) as admin:
        backend = KubeBackend(config_from_dict(ACCEPT), api_client=api_client(cluster.url), ready_timeout=30)
        worker = Worker(WorkerConfig(base_url=cp.base_url, environment_id=cp.environment_id, state_dir=tmp_path / "w",
                                     store_dir=tmp_path / "sessions", max_sessions=1, warm=0, lease_ttl=10,
                                     max_idle=30.0, selftest=False, backend="kubernetes", skills_mb=2),
                        EnvironmentKey(cp.environment_key, "test"), runtime=backend)  # type: ignore[arg-type]
        with BackgroundWorker(worker):
            sid = admin.create_session(cp.environment_id, skills=[cp.skill_ids[str(p)] for p in paths])
            # The very first call already sees them (copied before the sandbox is handed to the tools).
            err, text, _ = call(admin, sid, "bash", {"command": (
                'cd "$SANDBOX_SKILLS_DIR" && ls | tr "\\n" " "; echo; cat good/SKILL.md; ./good/scripts/run.sh;'
                ' ls -A links | tr "\\n" " "; echo; find . -mindepth 1 -perm /222 | wc -l;'
                ' stat -c "%a %n" good good/SKILL.md good/scripts/run.sh')}, timeout=90)
            lines = text.splitlines()
            assert not err, text
            assert lines[0].split() == ["good", "links"], text  # zbig: over the 2 MiB cap, left out whole
            assert lines[1:4] == ["# good", "use me", "skill-ran"], text
            assert lines[4].split() == ["SKILL.md"], text  # no symlink, hard link or device came through
            assert lines[5] == "0", text  # nothing writable by mode
            assert lines[6:] == ["555 good", "444 good/SKILL.md", "555 good/scripts/run.sh"], text
            (copied,) = worker_logs.events("skills_copied")
            assert copied["files"] == 3
            assert [e.get("skills") for e in worker_logs.events("skills_unavailable")] == [["zbig"]]
            # The pod's agent dies (OOM, a node going away): the session goes on in a new pod, skills and all.
            ((first_claim, first_pod),) = [(n, c["_pod"]) for n, c in cluster.claims.items()]
            cluster._kill_execs(first_pod)
            # (the backend deletes the claim once it sees the channel end: the next call gets a new sandbox)
            wait_for(lambda: first_claim in cluster.deleted_by_client, timeout=30, what="the dead pod's claim deleted")
            err, text, _ = call(admin, sid, "bash", {"command": 'cd "$SANDBOX_SKILLS_DIR" && pwd && ls && cat good/SKILL.md'},
                                timeout=90)
            assert not err and first_pod not in text.splitlines()[0], text
            assert text.splitlines()[1:] == ["good", "links", "# good", "use me"], text
            assert len(worker_logs.events("skills_copied")) == 2
            admin.terminate(sid)
            wait_for(lambda: not cluster.claims, timeout=60, what="the claim's deletion")
    # the worker's copy of the run's skills is gone with the run (a plain directory on a cluster)
    assert not list((tmp_path / "sessions").rglob("SKILL.md"))


def test_the_pod_probes_see_a_cluster_worker_ready_until_its_session_limit_and_alive_throughout(
        cp: ControlPlane, admin: LocalAdmin, kube_worker: Callable[..., Worker]) -> None:
    """deploy/kubernetes/worker.yaml's probes (sandbox.kube.probe) against the worker's own health
    endpoint: ready while it can take a session, not ready (but alive) while its one slot is busy."""
    from sandbox.kube.probe import check

    worker = kube_worker(metrics_port=0, max_sessions=1)
    wait_for(lambda: worker.health_port is not None, what="the health endpoint")
    port = worker.health_port
    assert port is not None
    assert check("live", port)[0] and check("ready", port) == (True, "ready: status ok, sessions 0/1")
    sid = admin.create_session(cp.environment_id)
    assert call(admin, sid, "bash", {"command": "echo hi"}, timeout=60)[:2] == (False, "hi")
    ok, why = check("ready", port)
    assert not ok and "at_session_limit" in why, why
    assert check("live", port)[0]
    admin.terminate(sid)
    wait_for(lambda: check("ready", port)[0], timeout=60, what="the slot to come free")


def test_a_pod_that_dies_mid_run_comes_back_with_the_files_of_its_last_periodic_archive(
        cp: ControlPlane, admin: LocalAdmin, cluster: FakeCluster, kube_worker: Callable[..., Worker],
        worker_logs: LogCapture, tmp_path: Path) -> None:
    """A cluster sandbox's workspace lives in its pod. During a run the sandbox archives it every
    `archive_interval` seconds after a tool call (only then: nothing changed otherwise), so a pod
    that dies mid-run loses only what changed since that archive, not the whole run."""
    worker = kube_worker(archive_interval=0.5)
    sid = admin.create_session(cp.environment_id)
    assert call(admin, sid, "write", {"file_path": "before.txt", "content": "kept\n"}, timeout=60)[0] is False
    wait_for(lambda: worker_logs.events("workspace_archived"), timeout=30, what="a periodic archive")
    (archived,) = worker_logs.events("workspace_archived")
    _check_archive(tmp_path, sid, archived)
    assert not list((tmp_path / "sessions" / "workspaces").glob(".*.tmp")), "no partial archive left behind"
    # No more archives from here (the interval is read at each tick): what follows is written after the last one.
    worker.config.archive_interval = 0
    assert call(admin, sid, "write", {"file_path": "after.txt", "content": "lost\n"})[0] is False
    ((first_claim, first_pod),) = [(n, c["_pod"]) for n, c in cluster.claims.items()]
    cluster._kill_execs(first_pod)  # the pod dies (OOM, its node going away)
    wait_for(lambda: first_claim in cluster.deleted_by_client, timeout=30, what="the dead pod's claim deleted")
    err, text, _ = call(admin, sid, "bash", {"command": "pwd; ls"}, timeout=90)
    assert not err and first_pod not in text.splitlines()[0], text
    assert text.splitlines()[1:] == ["before.txt"], text  # the periodic archive's files; after.txt went with the pod
    assert len(worker_logs.events("workspace_archived")) == 1 and not worker_logs.events("workspace_save_failed")
    assert worker.metrics.workspace_archives.labels(outcome="ok")._value.get() == 1
    admin.terminate(sid)
    wait_for(lambda: not cluster.claims, timeout=60, what="the claim's deletion")


def test_without_periodic_archives_a_pod_that_dies_mid_run_loses_the_run(
        cp: ControlPlane, admin: LocalAdmin, cluster: FakeCluster, kube_worker: Callable[..., Worker],
        worker_logs: LogCapture) -> None:
    """The setting is honoured: 0 turns periodic archives off (the workspace is archived only at the run's end)."""
    kube_worker(archive_interval=0)
    sid = admin.create_session(cp.environment_id)
    assert call(admin, sid, "write", {"file_path": "before.txt", "content": "x\n"}, timeout=60)[0] is False
    ((first_claim, first_pod),) = [(n, c["_pod"]) for n, c in cluster.claims.items()]
    cluster._kill_execs(first_pod)
    wait_for(lambda: first_claim in cluster.deleted_by_client, timeout=30, what="the dead pod's claim deleted")
    err, text, _ = call(admin, sid, "bash", {"command": "ls | wc -l"}, timeout=90)
    assert (err, text) == (False, "0"), text
    assert not worker_logs.events("workspace_archived")
    admin.terminate(sid)
    wait_for(lambda: not cluster.claims, timeout=60, what="the claim's deletion")


def test_a_cluster_session_gets_archive_checkpoints_listed_and_restored_through_the_cli(
        cp: ControlPlane, admin: LocalAdmin, cluster: FakeCluster, kube_worker: Callable[..., Worker],
        worker_logs: LogCapture, tmp_path: Path) -> None:
    """Like Docker's checkpoints: one each time a run goes idle (here: the archive its sandbox wrote,
    linked, never unpacked on the worker), listed and restored with `sandbox session`; the session's
    next sandbox gets the restored state."""
    import json

    from click.testing import CliRunner

    from sandbox.cli import main

    def cli(*args: str) -> Any:
        return CliRunner().invoke(main, ["session", *args[:1], "--store", str(tmp_path / "sessions"), *args[1:]])

    kube_worker(max_idle=1.0)
    sid = admin.create_session(cp.environment_id)
    assert call(admin, sid, "bash", {"command": "echo v1 > state.txt"}, timeout=60)[0] is False
    admin.send_idle(sid)
    wait_for(lambda: worker_logs.events("checkpoint"), timeout=60, what="the first checkpoint")
    assert call(admin, sid, "bash", {"command": "echo v2 > state.txt; touch later.txt"}, timeout=60)[0] is False
    admin.send_idle(sid)
    wait_for(lambda: len(worker_logs.events("checkpoint")) == 2, timeout=60, what="the second checkpoint")
    wait_for(lambda: len(worker_logs.events("work_done")) == 2, timeout=60, what="the second run to end")
    first, second = worker_logs.events("checkpoint")
    assert first["kind"] == second["kind"] == "archive" and first["digest"] != second["digest"]
    listed = cli("checkpoints", "--json", sid)
    assert listed.exit_code == 0, listed.output
    assert [(c["id"], c["kind"]) for c in json.loads(listed.output)] == [(first["checkpoint"], "archive"),
                                                                         (second["checkpoint"], "archive")]
    assert "archive" in cli("checkpoints", sid).output
    out = tmp_path / "export.tar"
    assert cli("export", "--checkpoint", first["checkpoint"], sid, str(out)).exit_code == 0
    with tarfile.open(out) as t:  # (the test reads it; the CLI only copied the bytes)
        assert "./state.txt" in t.getnames() and "./later.txt" not in t.getnames()
    restored = cli("restore", sid, first["checkpoint"])
    assert restored.exit_code == 0, restored.output
    err, text, _ = call(admin, sid, "bash", {"command": "cat state.txt; ls"}, timeout=60)
    assert (err, text.splitlines()) == (False, ["v1", "state.txt"]), text
    admin.terminate(sid)
    wait_for(lambda: worker_logs.events("session_removed"), timeout=60, what="the session's removal")
    store = SessionStore(tmp_path / "sessions", host_workspaces=False)
    assert not store.session_dir(sid).exists(), "its checkpoints went with the session"
    records = [json.loads(x) for x in store.trail_path(sid).read_text().splitlines()]
    assert [(r.get("event"), r.get("digest")) for r in records if r.get("event") in ("checkpoint", "restore")][:3] == \
        [("checkpoint", first["digest"]), ("checkpoint", second["digest"]), ("restore", first["digest"])]


def _check_archive(tmp_path: Path, sid: str, event: dict) -> tuple[SessionStore, SessionMeta]:
    """The session's archive is the one the log event names, not empty, and private to the worker."""
    store = SessionStore(tmp_path / "sessions", host_workspaces=False)
    meta = store.meta(sid)
    assert meta is not None and event["workspace"] == meta.workspace and event["bytes"] > 0
    assert store.workspace_archive(meta.workspace).stat().st_mode & 0o777 == 0o600
    return store, meta
