"""A session's start (worker.py `_serve_item`): however slowly its audit trail opens, no call runs before the
trail can record it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sandbox.controlplane import ControlPlane, LocalAdmin
from sandbox.worker import Worker
from sandbox.worker.store import SessionStore

from .helpers import LogCapture, call, wait_for, wait_result

pytestmark = pytest.mark.docker


def test_a_first_call_that_beats_the_trail_opening_waits_for_it_and_is_recorded(
        tmp_path: Path, cp: ControlPlane, admin: LocalAdmin, start_worker: Callable[..., Worker],
        worker_logs: LogCapture, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[float] = []
    original = Worker._open_trail

    def slow_open(self: Worker, session_id: str, work_id: str) -> Any:
        time.sleep(1.5)  # a slow disk: the SDK and a warm sandbox are ready long before
        trail = original(self, session_id, work_id)
        opened.append(time.monotonic())
        return trail

    monkeypatch.setattr(Worker, "_open_trail", slow_open)
    start_worker(warm=1)
    sid = admin.create_session(cp.environment_id)
    tid = admin.send_tool_use(sid, "bash", {"command": "echo first"})
    ev = wait_result(admin, sid, tid, timeout=90)
    answered = time.monotonic()
    assert not ev.get("is_error"), ev
    assert opened and opened[0] <= answered
    is_error, text, _ = call(admin, sid, "bash", {"command": "echo second"}, timeout=60)
    assert (is_error, text.strip()) == (False, "second")
    admin.terminate(sid)
    trail = SessionStore(tmp_path / "sessions").trail_path(sid)
    wait_for(lambda: trail.exists() and '"work_done"' in trail.read_text(), timeout=60, what="the trail to close")
    records = [json.loads(line) for line in trail.read_text().splitlines()]
    calls = [r for r in records if r.get("kind") == "tool_call"]
    assert [r.get("call_id") for r in calls][:1] == [tid], calls  # the first call has its record, first
    assert len(calls) == 2
    claimed = next(i for i, r in enumerate(records) if r.get("event") == "work_claimed")
    assert claimed < records.index(calls[0])
