"""A worker told to stop drains the sessions it serves, and only those that still have something to wait for."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from sandbox.controlplane import ControlPlane, LocalAdmin

from .helpers import log_events, wait_result

pytestmark = pytest.mark.docker


def test_a_killed_workers_unacknowledged_result_does_not_hold_up_the_next_workers_stop(
        cp: ControlPlane, admin: LocalAdmin, tmp_path: Path,
        worker_process: Callable[..., subprocess.Popen[bytes]]) -> None:
    # w1 answers a call and is killed -9 before it marks the result accepted: the shared journal keeps it
    # as "done". w2 then serves the session; told to stop, it waits for its own results, not for w1's.
    w1 = worker_process("w1")
    sid = admin.create_session(cp.environment_id)
    tid = admin.send_tool_use(sid, "write", {"file_path": "a.txt", "content": "a"})
    assert not wait_result(admin, sid, tid, timeout=90)["is_error"]
    w1.send_signal(signal.SIGKILL)
    w1.wait(10)
    w2 = worker_process("w2", "--drain-timeout", "600")
    tid = admin.send_tool_use(sid, "read", {"file_path": "a.txt"})
    assert not wait_result(admin, sid, tid, timeout=90)["is_error"]
    w2.send_signal(signal.SIGTERM)  # the session is still open: w2 is serving it
    try:
        w2.wait(120)
    except subprocess.TimeoutExpired:
        pytest.fail("the worker was still draining 120 s after SIGTERM, for a result another worker left")
    assert w2.returncode == 0
    assert log_events(tmp_path / "w2.log", "worker_stopped")
    admin.terminate(sid)
