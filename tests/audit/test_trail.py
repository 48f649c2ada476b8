"""The audit trail: a hash chain that reports the first broken record, and keeps no secrets."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from sandbox.audit.trail import (
    GENESIS,
    AuditTrail,
    TrailError,
    digest,
    record_hash,
    trail_path,
    verify,
)

FAKE_KEY = "sk-ant-api03-FAKE-never-in-a-trail-7f3a9c"
FILE_CONTENT = "root:x:0:0:SECRET-FILE-CONTENT-91b2:/root:/bin/bash"


class _Policy:
    name, runtime, image = "default", "runc", "sandbox-runtime:latest"

    def digest(self) -> str:
        return "sha256:" + "ab" * 32


def make_trail(path: Path, n_calls: int = 4) -> Path:
    t = AuditTrail(path, session="sess_test")
    t.policy(_Policy())
    t.lifecycle("sandbox_created", container="0123456789ab", runtime="runc")
    for i in range(n_calls):
        t.tool_call("bash", {"command": f"echo {i}"}, exit_status=0, duration_s=0.01 * i)
    t.egress({"session": "sess_test", "method": "CONNECT", "host": "pypi.org", "port": 443, "decision": "allow",
              "path": "/simple/?token=abc", "bytes_up": 10, "bytes_down": 20})
    t.close("session_ended")
    return path


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_a_clean_trail_verifies_and_chains_from_genesis(tmp_path: Path) -> None:
    p = make_trail(tmp_path / "t.jsonl")
    res = verify(p)
    assert res.ok and res.closed and res.records == 8 and res.first_bad is None, res
    recs = [json.loads(x) for x in lines(p)]
    assert recs[0]["prev"] == GENESIS
    assert [r["seq"] for r in recs] == list(range(1, 9))
    for a, b in itertools.pairwise(recs):
        assert b["prev"] == a["hash"] == record_hash(a)
    assert {r["kind"] for r in recs} == {"policy", "lifecycle", "tool_call", "egress", "close"}
    assert oct(p.stat().st_mode & 0o777) == "0o600"


N = 8  # records make_trail writes


@pytest.mark.parametrize("index", range(N))
def test_tampering_with_any_record_is_reported_at_that_record(tmp_path: Path, index: int) -> None:
    p = make_trail(tmp_path / "t.jsonl")
    ls = lines(p)
    rec = json.loads(ls[index])
    rec["ts"] = "2000-01-01T00:00:00+00:00"  # an edit that leaves the JSON valid
    ls[index] = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    p.write_bytes(b"".join(ls))
    res = verify(p)
    assert not res.ok and res.first_bad == index + 1 and "altered" in res.reason, res


@pytest.mark.parametrize("index", range(N - 1))
def test_tampering_and_rehashing_a_record_is_reported_at_the_next(tmp_path: Path, index: int) -> None:
    p = make_trail(tmp_path / "t.jsonl")
    ls = lines(p)
    rec = json.loads(ls[index])
    rec["exit_status"] = 99
    rec["hash"] = record_hash(rec)  # a forger who re-hashes the record itself
    ls[index] = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    p.write_bytes(b"".join(ls))
    res = verify(p)
    assert not res.ok and res.first_bad == index + 2 and "prev" in res.reason, res


@pytest.mark.parametrize("index", range(N))
def test_deleting_any_record_is_reported(tmp_path: Path, index: int) -> None:
    p = make_trail(tmp_path / "t.jsonl")
    ls = lines(p)
    del ls[index]
    p.write_bytes(b"".join(ls))
    res = verify(p)
    assert not res.ok
    if index == N - 1:  # the closing record itself: the trail now ends open
        assert res.first_bad == N and "closing record" in res.reason, res
    else:
        assert res.first_bad == index + 1 and ("sequence" in res.reason or "prev" in res.reason), res


def test_reordering_records_is_reported(tmp_path: Path) -> None:
    p = make_trail(tmp_path / "t.jsonl")
    ls = lines(p)
    ls[3], ls[4] = ls[4], ls[3]
    p.write_bytes(b"".join(ls))
    res = verify(p)
    assert not res.ok and res.first_bad == 4 and "reordered" in res.reason, res


def test_truncating_mid_record_is_reported(tmp_path: Path) -> None:
    p = make_trail(tmp_path / "t.jsonl")
    data = p.read_bytes()
    cut = len(b"".join(lines(p)[:5])) + 17
    p.write_bytes(data[:cut])
    res = verify(p, allow_open=True)
    assert not res.ok and res.first_bad == 6 and "cut mid-record" in res.reason and res.records == 5, res


def test_truncating_at_a_record_boundary_is_reported(tmp_path: Path) -> None:
    p = make_trail(tmp_path / "t.jsonl")
    full_head = verify(p).head
    p.write_bytes(b"".join(lines(p)[:6]))
    res = verify(p)
    assert not res.ok and res.first_bad == 7 and "closing record" in res.reason, res
    # A live session's trail is legitimately open; an anchored head still catches the cut.
    assert verify(p, allow_open=True).ok
    anchored = verify(p, allow_open=True, expect_head=full_head)
    assert not anchored.ok and "anchored head" in anchored.reason


def test_appending_after_the_closing_record_is_reported(tmp_path: Path) -> None:
    p = make_trail(tmp_path / "t.jsonl")
    last = json.loads(lines(p)[-1])
    extra = {"seq": last["seq"] + 1, "ts": last["ts"], "session": "sess_test", "kind": "tool_call", "prev": last["hash"]}
    extra["hash"] = record_hash(extra)
    with open(p, "ab") as f:
        f.write(json.dumps(extra, sort_keys=True, separators=(",", ":")).encode() + b"\n")
    res = verify(p)
    assert not res.ok and res.first_bad == N + 1 and "after the closing record" in res.reason


def test_secret_looking_input_is_stored_only_as_a_digest(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    t = AuditTrail(p, session="sess_secret")
    tool_input = {"command": f"export ANTHROPIC_API_KEY={FAKE_KEY}; cat /etc/passwd", "content": FILE_CONTENT}
    rec = t.tool_call("bash", tool_input, exit_status=1, limit="timeout", duration_s=1.5, error=f"stderr: {FILE_CONTENT}")
    t.lifecycle("note", detail=f"key {FAKE_KEY}", long="x" * 500, count=3)
    t.egress({"method": "GET", "host": "example.com", "port": 80, "decision": "deny",
              "path": f"/upload?key={FAKE_KEY}", "reason": "no-matching-rule"})
    t.close()
    raw = p.read_text()
    assert FAKE_KEY not in raw and "SECRET-FILE-CONTENT" not in raw and "passwd" not in raw and "upload" not in raw
    assert rec["input_digest"] == digest(tool_input)
    assert rec["limit"] == "timeout" and rec["exit_status"] == 1 and rec["tool"] == "bash"
    note = json.loads(raw.splitlines()[1])
    assert note["detail"] == {"digest": digest(f"key {FAKE_KEY}")} and note["count"] == 3
    assert verify(p).ok


def test_two_writers_share_one_chain(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    a, b = AuditTrail(p, session="s"), AuditTrail(p, session="s")
    for i in range(5):
        (a if i % 2 else b).tool_call("read", {"i": i}, exit_status=0)
    b.close()
    res = verify(p)
    assert res.ok and res.records == 6, res


def test_a_closed_or_broken_trail_is_never_extended(tmp_path: Path) -> None:
    p = make_trail(tmp_path / "t.jsonl")
    with pytest.raises(TrailError, match="closed"):
        AuditTrail(p, session="s").lifecycle("again")
    q = tmp_path / "cut.jsonl"
    q.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(TrailError, match="incomplete"):
        AuditTrail(q, session="s").lifecycle("again")


def test_trail_path_is_per_session_and_safe(tmp_path: Path) -> None:
    assert trail_path(tmp_path, "sess_1") == tmp_path / "audit" / "sess_1.jsonl"
    assert trail_path(tmp_path, "../../etc/x").parent == tmp_path / "audit"


def test_verify_cli_reports_the_first_broken_record(tmp_path: Path) -> None:
    from sandbox.cli import main

    p = make_trail(tmp_path / "t.jsonl")
    ok = CliRunner().invoke(main, ["audit", "verify", str(p)])
    assert ok.exit_code == 0 and "OK" in ok.output, ok.output
    ls = lines(p)
    del ls[2]
    p.write_bytes(b"".join(ls))
    bad = CliRunner().invoke(main, ["audit", "verify", str(p)])
    assert bad.exit_code == 1 and "BROKEN at record 3" in bad.output, bad.output
    js = CliRunner().invoke(main, ["audit", "verify", "--json", str(p)])
    assert js.exit_code == 1 and json.loads(js.output)["first_bad"] == 3


def test_policy_record_keeps_the_policy_digest_apart_from_the_chain_hash(tmp_path: Path) -> None:
    p = make_trail(tmp_path / "t.jsonl")
    rec = json.loads(lines(p)[0])
    assert rec["kind"] == "policy" and rec["policy_digest"] == _Policy().digest()
    assert rec["hash"] == record_hash(rec) != rec["policy_digest"]


def test_a_reopened_trail_continues_one_chain_across_runs(tmp_path: Path) -> None:
    p = make_trail(tmp_path / "t.jsonl")  # run 1, closed
    for run in (2, 3):
        t = AuditTrail(p, session="sess_test", reopen=True)
        t.lifecycle("work_claimed", work_id=f"work_{run}")
        t.tool_call("bash", {"command": f"run {run}"}, exit_status=0)
        t.close("work_done")
    res = verify(p)
    assert res.ok and res.closed and res.runs == 3 and res.records == N + 2 * 4, res
    kinds = [json.loads(x)["kind"] for x in lines(p)]
    assert kinds[N:N + 4] == ["reopen", "lifecycle", "tool_call", "close"]
    # A reopen is allowed only right after a closing record ...
    ls = lines(p)
    del ls[N - 1]  # drop run 1's closing record (and re-chain nothing): broken at the reopen
    q = tmp_path / "q.jsonl"
    q.write_bytes(b"".join(ls))
    assert not verify(q).ok
    # ... and a forged reopen in the middle of a run is reported even when correctly chained.
    r = tmp_path / "r.jsonl"
    t = AuditTrail(r, session="s")
    t.lifecycle("a")
    t.append("reopen", {})
    t.close()
    bad = verify(r)
    assert not bad.ok and bad.first_bad == 2 and "reopen" in bad.reason


def test_the_verify_cli_accepts_a_multi_run_trail(tmp_path: Path) -> None:
    from sandbox.cli import main

    p = make_trail(tmp_path / "t.jsonl")
    t = AuditTrail(p, session="sess_test", reopen=True)
    t.tool_call("read", {"file_path": "x"}, exit_status=0)
    t.close()
    ok = CliRunner().invoke(main, ["audit", "verify", str(p)])
    assert ok.exit_code == 0 and "OK" in ok.output, ok.output
