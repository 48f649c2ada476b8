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
    # The entry is removed just before the run's trail is closed (its last record): wait for that too,
    # or the chain is read without its closing record (seen 1 in 10-30 runs).
    wait_for(lambda: len(worker_logs.events("trail_closed")) == 2, timeout=30, what="both runs' trails closed")
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


def _cli(*args: str) -> Any:
    from click.testing import CliRunner

    from sandbox.cli import main

    return CliRunner().invoke(main, list(args))


def test_checkpoint_and_restore_round_trip_byte_for_byte_refused_during_a_run(
        cp: ControlPlane, admin: LocalAdmin, start_worker: Callable[..., Worker], worker_logs: LogCapture,
        tmp_path: Path) -> None:
    import json

    start_worker(max_idle=1.0)
    store_dir = str(tmp_path / "sessions")
    sid = admin.create_session(cp.environment_id)
    make = ("head -c 300000 /dev/urandom > data.bin && mkdir -p sub && echo v1 > sub/v.txt && ln -sf sub/v.txt link"
            " && sha256sum data.bin sub/v.txt | awk '{print $1}' | sha256sum")
    is_error, before, _ = call(admin, sid, "bash", {"command": make}, timeout=60)
    assert not is_error, before
    admin.send_idle(sid)
    wait_for(lambda: worker_logs.events("checkpoint"), timeout=30, what="the first checkpoint")
    first = worker_logs.events("checkpoint")[0]
    assert first["calls"] == 1 and first["bytes_new"] >= 300000
    # The next turn changes things; a run is active while its call sleeps: restore is refused.
    slow = admin.send_tool_use(sid, "bash", {"command": "echo v2 > sub/v.txt; rm data.bin; sleep 6; echo slept"})
    wait_for(lambda: any(r.get("tool_use_id") == slow for r in worker_logs.events("tool_exec")), what="the call")
    refused = _cli("session", "restore", "--store", store_dir, sid, first["checkpoint"])
    assert refused.exit_code == 1 and "active run" in refused.output, refused.output
    wait_result(admin, sid, slow, timeout=30)
    admin.send_idle(sid)
    wait_for(lambda: len(worker_logs.events("checkpoint")) == 2, timeout=30, what="the second checkpoint")
    wait_for(lambda: worker_logs.events("work_done") and len(worker_logs.events("work_done")) == 2, timeout=30,
             what="the second run to end")
    listed = _cli("session", "checkpoints", "--store", store_dir, "--json", sid)
    assert listed.exit_code == 0, listed.output
    cps = json.loads(listed.output)
    assert [c["id"] for c in cps] == [r["checkpoint"] for r in worker_logs.events("checkpoint")]
    assert cps[0]["digest"] != cps[1]["digest"] and cps[1]["calls"] == 1
    ok = _cli("session", "restore", "--store", store_dir, sid, cps[0]["id"])
    assert ok.exit_code == 0, ok.output
    # The next run sees the first checkpoint's bytes exactly.
    is_error, after, _ = call(admin, sid, "bash", {"command": "sha256sum data.bin sub/v.txt | awk '{print $1}' | "
                                                               "sha256sum; readlink link; cat sub/v.txt"}, timeout=60)
    assert not is_error and after.splitlines() == [before, "sub/v.txt", "v1"], after
    # The trail ties states to calls: both checkpoints and the restore, with their digests, in one chain.
    store = SessionStore(tmp_path / "sessions")
    admin.terminate(sid)
    wait_for(lambda: worker_logs.events("session_removed"), timeout=30, what="the session to be removed")
    # (the entry goes just before the run's trail gets its closing record: wait for the closed chain)
    wait_for(lambda: verify(store.trail_path(sid)).ok, timeout=30, what="the session's trail to close")
    records = [json.loads(x) for x in store.trail_path(sid).read_text().splitlines()]
    events = [(r.get("event"), r.get("digest")) for r in records if r.get("event") in ("checkpoint", "restore")]
    assert events == [("checkpoint", cps[0]["digest"]), ("checkpoint", cps[1]["digest"]),
                      ("restore", cps[0]["digest"])]
    assert verify(store.trail_path(sid)).ok
    # Export of a removed session says so.
    gone = _cli("session", "export", "--store", store_dir, sid, str(tmp_path / "x.tar"))
    assert gone.exit_code != 0 and "no session" in gone.output


def test_session_list_and_export(cp: ControlPlane, admin: LocalAdmin, start_worker: Callable[..., Worker],
                                 worker_logs: LogCapture, tmp_path: Path) -> None:
    import json
    import tarfile

    start_worker(max_idle=1.0)
    store_dir = str(tmp_path / "sessions")
    sid = admin.create_session(cp.environment_id)
    assert not call(admin, sid, "bash", {"command": "mkdir d && echo hi > d/f && ln -s /etc/passwd d/l"},
                    timeout=60)[0]
    listed = json.loads(_cli("session", "list", "--store", store_dir, "--json").output)
    assert [(r["session_id"], r["state"]) for r in listed] == [(sid, "running")]
    admin.send_idle(sid)
    wait_for(lambda: worker_logs.events("work_done"), timeout=30, what="the run to end")
    listed = json.loads(_cli("session", "list", "--store", store_dir, "--json").output)
    assert listed[0]["state"] == "idle" and listed[0]["checkpoints"] == 1 and listed[0]["workspace_bytes"] > 0
    out = tmp_path / "ws.tar"
    res = _cli("session", "export", "--store", store_dir, sid, str(out))
    assert res.exit_code == 0, res.output
    with tarfile.open(out) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert tar.extractfile(members["workspace/d/f"]).read() == b"hi\n"  # type: ignore[union-attr]
        assert members["workspace/d/l"].issym() and members["workspace/d/l"].linkname == "/etc/passwd"
    admin.terminate(sid)


def test_an_idle_session_is_removed_when_it_ends_or_its_retention_expires(
        cp: ControlPlane, admin: LocalAdmin, start_worker: Callable[..., Worker], worker_logs: LogCapture,
        tmp_path: Path) -> None:
    start_worker(max_idle=0.5, retention_s=4.0, store_sweep_s=0.5, checkpoints=0)
    store = SessionStore(tmp_path / "sessions")
    ended, kept, expiring = (admin.create_session(cp.environment_id) for _ in range(3))
    for sid in (ended, kept, expiring):
        assert not call(admin, sid, "write", {"file_path": "f", "content": sid}, timeout=60)[0]
        admin.send_idle(sid)
    wait_for(lambda: len(worker_logs.events("work_done")) == 3, timeout=30, what="the three runs to end")
    workspaces = {sid: store.meta(sid).workspace for sid in (ended, kept, expiring)}  # type: ignore[union-attr]
    # Terminated while no run serves it: the worker notices on its sweep and removes it.
    admin.terminate(ended)
    wait_for(lambda: store.meta(ended) is None, timeout=20, what="the ended session's removal")
    assert not store.workspace_dir(workspaces[ended]).exists()
    # Activity keeps `kept` alive past the retention; `expiring` has none and goes.
    for _ in range(4):
        assert call(admin, kept, "read", {"file_path": "f"}, timeout=60)[1] == kept
        time.sleep(1.5)
    wait_for(lambda: store.meta(expiring) is None, timeout=20, what="the expired session's removal")
    assert store.meta(kept) is not None
    reasons = {r["session_id"]: r["reason"] for r in worker_logs.events("session_removed")}
    assert reasons == {ended: "terminated", expiring: "retention expired"}
    for sid in (kept, expiring):
        admin.terminate(sid)
