"""A session's egress decisions reach its trail as they happen, once each (egress_trail.py).

Unit part: a real capped per-session decision log (the egress daemon's own writer),
rotated by floods, followed from a cursor. End to end: a worker on an egress policy,
a call that the proxy refuses, and the refusal in the session's trail while the run is
still active, then not again in the next run."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from sandbox.controlplane import ControlPlane, LocalAdmin
from sandbox.egress.audit import AuditLog, AuditRecord
from sandbox.worker import Worker
from sandbox.worker.egress_trail import EgressTail

from .helpers import call, wait_for


def _rec(i: int) -> AuditRecord:
    return AuditRecord(session="s", method="CONNECT", host=f"h{i}.test", port=443, decision="deny",
                       reason="no rule", code="no-matching-rule")


def test_records_arrive_once_across_rotation_and_restart(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "s.jsonl", max_bytes=4096)
    got: list[dict[str, Any]] = []
    tail = EgressTail(tmp_path / "s.jsonl", tmp_path / "cursor", got.append)
    for i in range(10):
        log.write(_rec(i))
    tail.poll()
    assert [r["host"] for r in got] == [f"h{i}.test" for i in range(10)]
    for i in range(10, 25):  # past 4 KiB: the writer rotates (copy to .1, truncate) once
        log.write(_rec(i))
    tail.poll()
    assert [r["host"] for r in got] == [f"h{i}.test" for i in range(25)]
    # A new run (or another worker) continues from the cursor: nothing twice.
    again: list[dict[str, Any]] = []
    tail2 = EgressTail(tmp_path / "s.jsonl", tmp_path / "cursor", again.append)
    tail2.poll()
    assert again == []
    log.write(_rec(99))
    tail2.poll()
    assert [r["host"] for r in again] == ["h99.test"]
    log.close()


def test_a_half_written_line_waits_for_its_end(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    got: list[dict[str, Any]] = []
    tail = EgressTail(path, tmp_path / "cursor", got.append)
    line = json.dumps({"host": "a.test", "decision": "deny"}).encode() + b"\n"
    path.write_bytes(line[:10])
    tail.poll()
    assert got == []
    path.write_bytes(line)
    tail.poll()
    assert got == [{"host": "a.test", "decision": "deny"}]


def test_two_rotations_between_reads_are_said_not_hidden(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "s.jsonl", max_bytes=2048)
    got: list[dict[str, Any]] = []
    lost: list[str] = []
    tail = EgressTail(tmp_path / "s.jsonl", tmp_path / "cursor", got.append, lost=lost.append)
    for i in range(8):
        log.write(_rec(i))
    tail.poll()
    for i in range(8, 60):  # several rotations before the next read: a flood of the session's own
        log.write(_rec(i))
    tail.poll()
    assert lost and "rotated" in lost[0]
    log.close()


@pytest.mark.docker
def test_a_refused_request_is_in_the_trail_while_the_run_is_active(
        cp: ControlPlane, admin: LocalAdmin, start_worker: Callable[..., Worker], tmp_path: Path) -> None:
    worker = start_worker(profile="python-packages", max_idle=60.0)
    sid = admin.create_session(cp.environment_id)
    is_error, text, _ = call(admin, sid, "bash", {"command": "curl -sS -m 10 -o /dev/null https://denied.invalid/ "
                                                             "|| echo refused"}, timeout=90)
    assert "refused" in text, text
    trail = worker.store.trail_path(sid)

    def egress_records() -> list[dict[str, Any]]:
        return [r for r in (json.loads(x) for x in trail.read_text().splitlines() if x.strip()) if r.get("kind") == "egress"]

    denied = wait_for(lambda: [r for r in egress_records() if r.get("host") == "denied.invalid"], timeout=10,
                      what="the refusal in the trail during the run")
    assert denied[0]["decision"] == "deny"
    assert worker.sessions_in_flight == 1  # the run is still active: not copied in at its close
    time.sleep(1.5)
    assert len([r for r in egress_records() if r.get("host") == "denied.invalid"]) == 1  # once
    admin.terminate(sid)
