"""Nothing lost, nothing run twice: control-plane outage, lost lease (412), SIGKILL, SIGTERM.

Every test counts executions where they happen (a line appended to a file in
the sandbox, or the worker's `tool_exec` log records across processes) and
results where they land (the control plane's event log).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.controlplane import ControlPlane, LocalAdmin
from sandbox.worker import Worker

from .helpers import LogCapture, results, text_of, wait_for, wait_result

pytestmark = pytest.mark.docker


def _one_result_each(admin: LocalAdmin, session_id: str, tool_use_ids: list[str]) -> dict[str, dict[str, Any]]:
    got = Counter(ev["tool_use_id"] for ev in results(admin, session_id))
    assert all(got[t] == 1 for t in tool_use_ids), got
    return {ev["tool_use_id"]: ev for ev in results(admin, session_id)}


def _running(worker: Worker, tool_use_id: str) -> bool:
    rec = worker.outbox.get(tool_use_id) if worker.outbox else None
    return rec is not None and rec.state == "running"


def test_control_plane_outage_every_result_delivered_exactly_once(
        tmp_path: Path, cp: ControlPlane, admin: LocalAdmin, start_worker: Callable[..., Worker],
        worker_logs: LogCapture) -> None:
    worker = start_worker(lease_ttl=10, park_grace=120)
    sid = admin.create_session(cp.environment_id)
    first = admin.send_tool_use(sid, "bash", {"command": "echo one >> runs.txt"})
    wait_result(admin, sid, first)
    during = admin.send_tool_use(sid, "bash", {"command": "sleep 2; echo two >> runs.txt; echo done"})
    wait_for(lambda: _running(worker, during), what="the call to start")
    port = int(cp.base_url.rsplit(":", 1)[1])
    cp.stop()  # the call finishes while the control plane is down: its result must wait in the outbox
    wait_for(lambda: worker.outbox.get(during).state == "done", timeout=20, what="the result to be stored")  # type: ignore[union-attr]
    wait_for(lambda: worker.middleware.breaker.open, timeout=20, what="the circuit to open")  # type: ignore[union-attr]
    # Longer than the lease TTL: the worker assumes the lease lost and parks the sandbox.
    try:
        wait_for(lambda: worker_logs.events("sandbox_parked"), timeout=40, what="the sandbox to be parked")
    except AssertionError:
        raise AssertionError(f"not parked: {worker_logs.events('work_done')}") from None
    with ControlPlane(cp.state_dir, port=port, sse_ping_interval=0.5) as back, \
            LocalAdmin(back.base_url, back.admin_key) as admin:
        ev = wait_result(admin, sid, during, timeout=60)  # the queue re-delivers the item; the result is replayed
        assert (ev["is_error"], text_of(ev)) == (False, "done")
        last = admin.send_tool_use(sid, "bash", {"command": "cat runs.txt"})
        ev = wait_result(admin, sid, last)
        # Same sandbox (parked, then reused), and the call that straddled the outage ran exactly once.
        assert text_of(ev) == "one\ntwo"
        _one_result_each(admin, sid, [first, during, last])
        assert [r["tool_use_id"] for r in worker_logs.events("tool_replayed")] == [during]
        assert Counter(r["tool_use_id"] for r in worker_logs.events("tool_exec"))[during] == 1
        wait_for(lambda: worker.outbox.pending() == [], what="the outbox to drain")  # type: ignore[union-attr]
        admin.terminate(sid)
        wait_for(lambda: worker.sessions_in_flight == 0, what="the session to end")
    cp.start()  # the fixture stops it again


def test_lost_lease_412_stops_the_item_without_posting_more(
        cp: ControlPlane, admin: LocalAdmin, start_worker: Callable[..., Worker], worker_logs: LogCapture) -> None:
    worker = start_worker(lease_ttl=10, park_grace=120)
    sid = admin.create_session(cp.environment_id)
    slow = admin.send_tool_use(sid, "bash", {"command": "sleep 7; echo ran >> ran.txt; echo slow-done"})
    wait_for(lambda: _running(worker, slow), what="the call to start")
    work_id = admin.work_items(sid)[-1]["id"]
    # Someone else's heartbeat moved the lease on: our next heartbeat's echo no longer matches -> 412.
    with sqlite3.connect(cp.state_dir / "controlplane.db") as db:
        db.execute("UPDATE work SET last_heartbeat='someone-else' WHERE id=?", (work_id,))
    wait_for(lambda: worker_logs.events("lease_lost"), timeout=15, what="the 412")
    wait_for(lambda: worker.outbox.get(slow).state == "done", timeout=15, what="the call to finish")  # type: ignore[union-attr]
    time.sleep(1.5)
    # The call finished after the lease was lost: its result is held, not posted, and the item not stopped.
    assert not any(ev["tool_use_id"] == slow for ev in results(admin, sid))
    assert admin.work_items(sid)[-1]["state"] != "stopped"
    assert worker.metrics.heartbeat_failures.labels(reason="precondition")._value.get() >= 1
    # When the lease lapses the queue re-delivers the item; whoever holds it then answers the call.
    ev = wait_result(admin, sid, slow, timeout=45)
    assert text_of(ev) == "slow-done"
    check = admin.send_tool_use(sid, "bash", {"command": "cat ran.txt"})
    assert text_of(wait_result(admin, sid, check)) == "ran"  # ran once
    _one_result_each(admin, sid, [slow, check])
    admin.terminate(sid)


# ---------------------------------------------------------------------- the worker as a process

@pytest.fixture
def worker_process(cp: ControlPlane, tmp_path: Path, docker_client: Any) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(name: str, *extra: str) -> subprocess.Popen[bytes]:
        key_file = tmp_path / "env.key"
        key_file.write_text(cp.environment_key)
        key_file.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC_")}
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - owned by the process
        p = subprocess.Popen(
            [sys.executable, "-m", "sandbox.cli", "worker", "--base-url", cp.base_url, "--environment-id",
             cp.environment_id, "--environment-key-file", str(key_file), "--state-dir", str(tmp_path / "wstate"),
             "--session-store", str(tmp_path / "sessions"),
             "--lease-ttl", "10", "--max-idle", "30", *extra],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        procs.append(p)
        return p

    yield spawn
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def _log_records(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _events(path: Path, name: str) -> list[dict[str, Any]]:
    return [r for r in _log_records(path) if r.get("event") == name]


def test_sigkill_mid_tool_second_worker_reclaims_and_no_call_runs_twice(
        cp: ControlPlane, admin: LocalAdmin, tmp_path: Path, worker_process: Callable[..., subprocess.Popen[bytes]],
        docker_client: Any) -> None:
    first = worker_process("w1")
    sid = admin.create_session(cp.environment_id)
    a = admin.send_tool_use(sid, "write", {"file_path": "a.txt", "content": "a"})
    wait_result(admin, sid, a, timeout=60)
    b = admin.send_tool_use(sid, "bash", {"command": "sleep 20; echo b"})
    wait_for(lambda: any(r.get("tool_use_id") == b for r in _events(tmp_path / "w1.log", "tool_exec")),
             what="the first worker to start the call")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    started = time.monotonic()
    second = worker_process("w2")
    ev = wait_result(admin, sid, b, timeout=60)  # reclaimed after the lease lapsed
    assert ev["is_error"] and "interrupted" in text_of(ev) and "not run again" in text_of(ev)
    assert time.monotonic() - started < 40
    c = admin.send_tool_use(sid, "bash", {"command": "echo c"})
    assert text_of(wait_result(admin, sid, c, timeout=60)) == "c"
    _one_result_each(admin, sid, [a, b, c])
    execs = Counter(r["tool_use_id"] for p in ("w1.log", "w2.log") for r in _events(tmp_path / p, "tool_exec"))
    assert execs == Counter({a: 1, b: 1, c: 1}), execs  # b ran once, in the killed worker, never again
    w2 = _log_records(tmp_path / "w2.log")
    assert any(r.get("event") == "outbox_recovered" for r in w2)
    # The dead worker's sandbox is gone: it exits when its channel closes, or the new worker reaps it.
    owner = f"worker:{first.pid}:"
    assert not [c for c in docker_client.containers.list(all=True, filters={"label": "org.sandbox.managed=true"})
                if c.labels.get("org.sandbox.owner", "").startswith(owner)]
    text = (tmp_path / "w1.log").read_text() + (tmp_path / "w2.log").read_text()
    assert cp.environment_key not in text and "sk-ant-" not in text
    admin.terminate(sid)
    second.send_signal(signal.SIGTERM)
    assert second.wait(40) == 0


def test_sigterm_finishes_the_call_in_flight_hands_back_and_removes_sandboxes(
        cp: ControlPlane, admin: LocalAdmin, tmp_path: Path, worker_process: Callable[..., subprocess.Popen[bytes]],
        docker_client: Any) -> None:
    proc = worker_process("w", "--drain-timeout", "15")
    sid = admin.create_session(cp.environment_id)
    wait_result(admin, sid, admin.send_tool_use(sid, "write", {"file_path": "x", "content": "x"}), timeout=60)
    b = admin.send_tool_use(sid, "bash", {"command": "sleep 2; echo finished"})
    wait_for(lambda: any(r.get("tool_use_id") == b for r in _events(tmp_path / "w.log", "tool_exec")),
             what="the call to start")
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(40) == 0
    assert time.monotonic() - started < 20
    ev = wait_result(admin, sid, b, timeout=5)
    assert (ev["is_error"], text_of(ev)) == (False, "finished")  # finished and delivered before exiting
    assert _events(tmp_path / "w.log", "handed_back")  # not stopped: another worker picks the session up
    assert admin.work_items(sid)[-1]["state"] != "stopped"
    owner = f"worker:{proc.pid}:"
    left = [c for c in docker_client.containers.list(all=True, filters={"label": "org.sandbox.managed=true"})
            if c.labels.get("org.sandbox.owner", "").startswith(owner)]
    assert left == []
