"""The archive a cluster sandbox writes of its workspace (sandbox.worker.pool): opaque bytes the
worker stores and never unpacks, replaced only by a complete newer one.

The sandbox here is a stand-in at the pod boundary (its `exec` streams what a pod's `tar` would, or
is cut off); the end-to-end path with a real `tar` behind the fake API server's exec stream is in
test_worker_kube.py."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from sandbox.policy import load_policy
from sandbox.runtime import ExecResult
from sandbox.worker.pool import Assignment, SessionSandboxes
from sandbox.worker.store import SessionStore


class PodStandIn:
    """What SessionSandboxes uses of a cluster sandbox: `exec` of the archive command."""

    def __init__(self, outputs: list[tuple[bytes, ExecResult]], gate: threading.Event | None = None) -> None:
        self.outputs = outputs
        self.gate = gate
        self.started = threading.Event()
        self.alive = True
        self.id = "pod-standin-0001"
        self.session_id = "sess"
        self.destroyed = False
        self.channel = type("Channel", (), {"close_reason": "the pod is gone"})()

    def exec(self, argv: list[str], *, max_output: int | None = None, on_output: Any = None, **_: Any) -> ExecResult:
        data, res = self.outputs.pop(0)
        if self.gate is not None and not self.started.is_set():
            on_output(1, data[: len(data) // 2])
            self.started.set()
            assert self.gate.wait(30)
            on_output(1, data[len(data) // 2:])
        else:
            on_output(1, data)
        return res

    def destroy(self) -> None:
        self.destroyed = True
        self.alive = False


def _sandboxes(tmp_path: Path, sb: PodStandIn) -> tuple[SessionSandboxes, SessionStore, str]:
    store = SessionStore(tmp_path / "store", host_workspaces=False)
    meta, _ = store.open_session("sess", 64)
    sbs = SessionSandboxes(None, load_policy("worker"), None, park_grace=60, store=store)  # type: ignore[arg-type]
    sbs._by_session["sess"] = Assignment(session_id="sess", sandbox=sb, source="fresh",  # type: ignore[arg-type]
                                         workspace=meta.workspace)
    return sbs, store, meta.workspace


def test_an_archive_cut_off_midway_leaves_the_previous_archive_whole(tmp_path: Path) -> None:
    # The pod dies while it writes (its exec stream ends with an error after half the bytes).
    sb = PodStandIn([(b"half of a tar stream", ExecResult(exit_code=-1, error="sandbox is not running: closed"))])
    sbs, store, ws = _sandboxes(tmp_path, sb)
    store.workspace_archive(ws).write_bytes(b"the previous complete archive")
    assert sbs.archive("sess") is None
    assert store.workspace_archive(ws).read_bytes() == b"the previous complete archive"
    assert [p.name for p in store.workspace_archive(ws).parent.iterdir() if p.name.endswith(".tmp")] == []


def test_an_archive_over_the_workspace_cap_is_not_kept(tmp_path: Path) -> None:
    # A sandbox cannot fill the worker's disk through its archive: the stream is capped (truncated: refused).
    sb = PodStandIn([(b"x" * 100, ExecResult(exit_code=0, truncated=True))])
    sbs, store, ws = _sandboxes(tmp_path, sb)
    assert sbs.archive("sess") is None and not store.workspace_archive(ws).exists()


def test_the_run_end_archive_waits_for_a_periodic_one_in_flight_and_is_the_one_kept(tmp_path: Path) -> None:
    gate = threading.Event()
    sb = PodStandIn([(b"periodic archive (older)", ExecResult(exit_code=0)),
                     (b"final archive (newer)", ExecResult(exit_code=0))], gate=gate)
    sbs, store, ws = _sandboxes(tmp_path, sb)
    results: dict[str, Any] = {}
    periodic = threading.Thread(target=lambda: results.setdefault("periodic", sbs.archive("sess")))
    periodic.start()
    assert sb.started.wait(30)
    # At most one archive per sandbox at a time: a second periodic one is not started meanwhile.
    assert sbs.archive("sess") is None and len(sb.outputs) == 1
    end = threading.Thread(target=lambda: results.setdefault("parked", sbs.release("sess", park=False)))
    end.start()
    end.join(0.5)
    assert end.is_alive() and not sb.destroyed, "the run's end waits for the archive in flight"
    gate.set()
    periodic.join(30)
    end.join(30)
    assert results == {"periodic": len(b"periodic archive (older)"), "parked": False}
    assert store.workspace_archive(ws).read_bytes() == b"final archive (newer)" and sb.destroyed


def test_a_dead_sandbox_writes_nothing_and_the_previous_archive_stays(tmp_path: Path) -> None:
    sb = PodStandIn([])
    sb.alive = False
    sbs, store, ws = _sandboxes(tmp_path, sb)
    store.workspace_archive(ws).write_bytes(b"previous")
    assert sbs.archive("sess") is None
    sbs.release("sess", park=False)
    assert store.workspace_archive(ws).read_bytes() == b"previous" and sb.destroyed


def test_a_parked_sandbox_archives_the_run_at_once_not_only_when_it_stops(tmp_path: Path) -> None:
    # Parked (the control plane ended the run; the session will come back): if the pod dies while parked,
    # the run's last changes must already be in the store.
    sb = PodStandIn([(b"the run's last state", ExecResult(exit_code=0)), (b"at its stop", ExecResult(exit_code=0))])
    sbs, store, ws = _sandboxes(tmp_path, sb)
    lock = store.try_lock_run("sess")
    assert lock is not None
    assert sbs.release("sess", park=True, run_lock=lock) is True
    assert store.workspace_archive(ws).read_bytes() == b"the run's last state" and not sb.destroyed
    sbs.close()  # the parked sandbox stops: archived once more, then destroyed
    assert store.workspace_archive(ws).read_bytes() == b"at its stop" and sb.destroyed


def test_a_cluster_worker_claims_work_only_with_room_for_an_archive_and_the_next_one_being_written() -> None:
    from sandbox.worker.admission import HostStats
    from sandbox.worker.pool import ClusterAdmission

    policy = load_policy("worker")
    one = int(policy.workspace.size_mb * (1 << 20) * 1.1)  # an archive's cap
    reserve = 512 << 20

    def stats(free: int) -> HostStats:
        return HostStats(available_memory=8 << 30, free_disk=free, load1=0.0, cpus=2)

    room_for_one = ClusterAdmission(policy, lambda: stats(one + reserve + (1 << 20)), load_per_cpu=float("inf"))
    refused = room_for_one.check()
    assert not refused.ok and refused.resource == "disk", refused
    room_for_two = ClusterAdmission(policy, lambda: stats(2 * one + reserve + (1 << 20)), load_per_cpu=float("inf"))
    assert room_for_two.check().ok


def test_the_worker_cli_hands_the_archive_interval_and_metrics_host_to_the_worker(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from click.testing import CliRunner

    import sandbox.worker.worker as worker_mod
    from sandbox.worker.cli import worker_cmd

    seen: list[Any] = []

    class Captured:
        fatal_error = None

        def __init__(self, config: Any, key: Any) -> None:
            seen.append(config)

        async def run(self) -> None:
            return None

        def request_stop(self) -> None:
            return None

    monkeypatch.setattr(worker_mod, "Worker", Captured)
    for var in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    env = {"ANTHROPIC_ENVIRONMENT_KEY": "test-environment-key-value"}  # (the CLI scrubs it from its environment)
    base = ["--base-url", "http://127.0.0.1:9", "--environment-id", "env_x", "--state-dir", str(tmp_path / "w")]
    res = CliRunner(env=env).invoke(worker_cmd, [*base, "--archive-interval", "15", "--metrics-host", "0.0.0.0"])
    assert res.exit_code == 0, res.output
    res = CliRunner(env=env).invoke(worker_cmd, base)
    assert res.exit_code == 0, res.output
    assert [(c.archive_interval, c.metrics_host) for c in seen] == [(15.0, "0.0.0.0"), (60.0, "127.0.0.1")]  # noqa: S104
    res = CliRunner(env=env).invoke(worker_cmd, [*base, "--archive-interval", "-1"])
    assert res.exit_code == 2 and "--archive-interval" in res.output
