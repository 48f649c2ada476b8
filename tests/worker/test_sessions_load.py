"""16 sessions x 20 calls over two workers sharing one store, each session in two runs:
every result posted exactly once, nothing lost, every call in the session's one audit trail."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from sandbox.audit.trail import verify
from sandbox.controlplane import ControlPlane, LocalAdmin
from sandbox.worker import Worker
from sandbox.worker.store import SessionStore

from .helpers import LogCapture, results, wait_for

pytestmark = pytest.mark.docker

SESSIONS, CALLS = 16, 20


def test_16_sessions_x_20_calls_posted_once_and_all_in_multi_run_trails(
        cp: ControlPlane, admin: LocalAdmin, start_worker: Callable[..., Worker], worker_logs: LogCapture,
        tmp_path: Path) -> None:
    workers = [start_worker(max_sessions=6, max_idle=1.0, checkpoints=0), start_worker(max_sessions=6, max_idle=1.0,
                                                                                        checkpoints=0)]
    sids = [admin.create_session(cp.environment_id) for _ in range(SESSIONS)]
    sent: dict[str, list[str]] = {s: [] for s in sids}
    errors: list[BaseException] = []

    def drive(sid: str) -> None:
        try:
            with LocalAdmin(cp.base_url, cp.admin_key) as a:
                for turn in range(2):  # two runs: the run goes idle and ends between the turns
                    ids = [a.send_tool_use(sid, "bash", {"command": f"echo {turn}-{i} >> calls.txt; echo {i}"})
                           for i in range(CALLS // 2)]
                    sent[sid].extend(ids)
                    wait_for(lambda: {e["tool_use_id"] for e in results(a, sid)} >= set(ids), timeout=240,
                             interval=0.5, what=f"turn {turn} of {sid}")
                    a.send_idle(sid)
                    if turn == 0:
                        wait_for(lambda: SessionStore(tmp_path / "sessions").meta(sid).runs >= 1,  # type: ignore[union-attr]
                                 timeout=120, interval=0.5, what=f"the first run of {sid} to end")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=drive, args=(s,)) for s in sids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(400)
    assert not errors, errors[:3]
    store = SessionStore(tmp_path / "sessions")
    expected = SESSIONS * CALLS
    posted = Counter()
    for sid in sids:
        got = Counter(e["tool_use_id"] for e in results(admin, sid))
        assert set(got) == set(sent[sid]), sid  # nothing lost, nothing unknown
        posted.update(got)
    assert sum(posted.values()) == expected and max(posted.values()) == 1  # posted == expected, 0 duplicates
    for sid in sids:
        admin.terminate(sid)
    wait_for(lambda: all(w.sessions_in_flight == 0 for w in workers), timeout=60, what="all runs to end")
    executed = Counter(r["tool_use_id"] for r in worker_logs.events("tool_exec"))
    assert sum(executed.values()) == expected and max(executed.values()) == 1  # each call ran once
    runs = 0
    for sid in sids:
        path = store.trail_path(sid)
        res = verify(path, allow_open=True)
        assert res.ok and res.runs >= 2, (sid, res)
        runs += res.runs
        in_trail = [json.loads(x).get("call_id") for x in path.read_text().splitlines()
                    if json.loads(x).get("kind") == "tool_call"]
        assert Counter(in_trail) == Counter(sent[sid]), sid  # every call of every run, once
    assert runs >= 2 * SESSIONS
