"""A session keeps its workspace for its whole life: across idle runs, worker kills and workers.

Real worker(s), the real embedded control plane, real sandboxes. Executions are
counted where they happen: a line appended to a counter file in the
session's workspace.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sandbox.audit.trail import verify
from sandbox.controlplane import ControlPlane, LocalAdmin
from sandbox.worker import Worker
from sandbox.worker.store import SessionStore

from .helpers import LogCapture, call, log_events, results, text_of, wait_for, wait_result

pytestmark = pytest.mark.docker


def _containers(docker_client: Any, session_id: str) -> list[dict[str, Any]]:
    """Label dicts of the session's containers (one listing call: no per-container lookups that race removal)."""
    return [c.get("Labels") or {} for c in docker_client.api.containers(all=True, filters={
        "label": [f"org.sandbox.session={session_id}", "org.sandbox.managed=true"]})]


def test_files_survive_a_run_going_idle_past_max_idle_and_the_sandbox_is_stopped(
        cp: ControlPlane, admin: LocalAdmin, start_worker: Callable[..., Worker], worker_logs: LogCapture,
        docker_client: Any, tmp_path: Path) -> None:
    worker = start_worker(max_idle=1.0)
    sid = admin.create_session(cp.environment_id)
    assert call(admin, sid, "bash", {"command": "mkdir -p d && echo 41 > d/n.txt && echo ok"}, timeout=60)[:2] == \
        (False, "ok")
    admin.send_idle(sid)
    # The run ends after max-idle: its sandbox is stopped (memory freed), its workspace kept.
    wait_for(lambda: worker_logs.events("work_done"), timeout=30, what="the idle run to end")
    wait_for(lambda: not _containers(docker_client, sid), timeout=20, what="the sandbox to be removed")
    assert worker.sessions_in_flight == 0
    time.sleep(2.0)  # idle for longer than max-idle
    store = SessionStore(tmp_path / "sessions")
    meta = store.meta(sid)
    assert meta is not None and meta.state == "idle" and meta.runs == 1
    # Work arrives: a new sandbox over the same workspace, files intact, owned by the new sandbox's uid.
    is_error, text, _ = call(admin, sid, "bash", {"command": "cat d/n.txt; test -O d/n.txt && echo mine"}, timeout=60)
    assert (is_error, text) == (False, "41\nmine")
    assigned = worker_logs.events("sandbox_assigned")
    assert [r["source"] for r in assigned] == ["fresh", "resumed"]
    assert assigned[0]["container"] != assigned[1]["container"]
    assert assigned[0]["workspace"] == assigned[1]["workspace"] == meta.workspace
    # The session ends: workspace, metadata and sandbox removed; the audit trail stays, one chain.
    admin.terminate(sid)
    wait_for(lambda: worker_logs.events("session_removed"), timeout=30, what="the session's store entry removal")
    assert store.meta(sid) is None and not store.workspace_dir(meta.workspace).exists()
    res = verify(store.trail_path(sid))
    assert res.ok and res.runs == 2, res


def test_the_workspace_is_size_capped_enospc_inside_host_untouched(
        cp: ControlPlane, admin: LocalAdmin, start_worker: Callable[..., Worker], tmp_path: Path) -> None:
    start_worker()
    sid = admin.create_session(cp.environment_id)
    is_error, text, _ = call(admin, sid, "bash", {
        # Files of 100 MiB (under the 128 MiB file-size rlimit) until the 512 MiB workspace is full.
        "command": "for i in 1 2 3 4 5 6; do head -c 100M /dev/zero > f$i || break; done 2>&1 | tail -1;"
                   " df -m . | tail -1 | awk '{print $2}'",
        "timeout_ms": 60000}, timeout=90)
    assert "No space left on device" in text, text
    assert int(text.splitlines()[-1]) <= 512  # the policy's workspace size (worker profile)
    admin.terminate(sid)


def test_kill_9_of_the_worker_keeps_the_files_for_the_next_worker(
        cp: ControlPlane, admin: LocalAdmin, tmp_path: Path, worker_process: Callable[..., subprocess.Popen[bytes]],
        docker_client: Any) -> None:
    first = worker_process("w1")
    sid = admin.create_session(cp.environment_id)
    tid = admin.send_tool_use(sid, "write", {"file_path": "keep/me.txt", "content": "still here"})
    assert not wait_result(admin, sid, tid, timeout=90)["is_error"]
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    # Its sandbox dies with it; the workspace stays in the store.
    wait_for(lambda: not _containers(docker_client, sid), timeout=30, what="the dead worker's sandbox to go")
    worker_process("w2")
    tid = admin.send_tool_use(sid, "read", {"file_path": "keep/me.txt"})
    ev = wait_result(admin, sid, tid, timeout=60)
    assert (ev["is_error"], text_of(ev)) == (False, "still here")
    admin.terminate(sid)


def test_two_workers_kill_9_mid_call_the_call_is_answered_interrupted_and_never_rerun(
        cp: ControlPlane, admin: LocalAdmin, tmp_path: Path, worker_process: Callable[..., subprocess.Popen[bytes]],
        docker_client: Any) -> None:
    procs = {"a": worker_process("a"), "b": worker_process("b")}
    sid = admin.create_session(cp.environment_id)
    first = admin.send_tool_use(sid, "bash", {"command": "echo first >> count"})
    assert not wait_result(admin, sid, first, timeout=90)["is_error"]
    slow = admin.send_tool_use(sid, "bash", {"command": "echo slow >> count; sleep 25; echo done"})

    def runner() -> str | None:
        for name in procs:
            if any(r.get("tool_use_id") == slow for r in log_events(tmp_path / f"{name}.log", "tool_exec")):
                return name
        return None

    victim = wait_for(runner, timeout=30, what="a worker to start the slow call")
    procs[victim].send_signal(signal.SIGKILL)
    procs[victim].wait(10)
    survivor = "b" if victim == "a" else "a"
    ev = wait_result(admin, sid, slow, timeout=90)  # the lease lapses; the survivor serves the session
    assert ev["is_error"] and "interrupted" in text_of(ev) and "not run again" in text_of(ev), text_of(ev)
    check = admin.send_tool_use(sid, "bash", {"command": "cat count"})
    assert text_of(wait_result(admin, sid, check, timeout=60)) == "first\nslow"  # slow ran once, never again
    got = Counter(e["tool_use_id"] for e in results(admin, sid))
    assert got == Counter({first: 1, slow: 1, check: 1}), got
    execs = Counter(r["tool_use_id"] for n in procs for r in log_events(tmp_path / f"{n}.log", "tool_exec"))
    assert execs[slow] == 1
    assert not any(r.get("tool_use_id") == slow for r in log_events(tmp_path / f"{survivor}.log", "tool_exec"))
    # No orphan: the killed worker's sandbox went with it.
    owners = {c.get("org.sandbox.owner", "") for c in _containers(docker_client, sid)}
    assert not any(o.startswith(f"worker:{procs[victim].pid}:") for o in owners), owners
    admin.terminate(sid)
