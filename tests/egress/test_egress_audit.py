"""Audit log: bounded on disk, readable per session, credential-free by construction."""

from __future__ import annotations

import json
from pathlib import Path

from sandbox.egress.audit import AuditLog, AuditRecord, read_records


def test_refusal_flood_cannot_fill_the_disk(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", max_bytes=4096)
    for i in range(500):
        log.write(AuditRecord(session="s", method="GET", host="evil.test", port=80, reason=f"denied {i}", code="no-matching-rule"))
    log.close()
    assert (tmp_path / "audit.jsonl").stat().st_size <= 4096
    assert (tmp_path / "audit.jsonl.1").stat().st_size <= 4096
    recent = read_records(tmp_path / "audit.jsonl", limit=5)
    assert [r["reason"] for r in recent] == [f"denied {i}" for i in range(495, 500)]


def test_records_are_retrievable_by_session_and_tolerate_a_torn_line(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    for s in ("a", "b", "a"):
        log.write(AuditRecord(session=s, decision="allow"))
    log.close()
    with open(tmp_path / "audit.jsonl", "a") as f:
        f.write('{"session": "a", "trunc')  # a crash mid-write
    assert len(read_records(tmp_path / "audit.jsonl", session="a")) == 2
    assert len(read_records(tmp_path / "audit.jsonl", session="b")) == 1


def test_query_string_never_reaches_the_log_even_if_a_caller_passes_it(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.write(AuditRecord(session="a", path="/download?token=s3cr3t#frag"))
    log.close()
    rec = json.loads((tmp_path / "audit.jsonl").read_text())
    assert rec["path"] == "/download" and "s3cr3t" not in (tmp_path / "audit.jsonl").read_text()
