"""Tamper-evident audit trail: one append-only JSON-lines file per session, hash-chained.

Every record is one canonical JSON line carrying ``seq`` (1, 2, ...), ``prev``
(the ``hash`` of the record before it; the first record chains to
:data:`GENESIS`) and ``hash`` (sha256 of the record's canonical JSON without
``hash``). Altering a record breaks its own hash; removing or reordering
records breaks ``seq`` and ``prev``; cutting the file mid-line leaves an
unparseable last line; cutting it at a line boundary loses the closing
record. :func:`verify` reports the first broken record.

A hash chain shows edits, not authorship: someone able to rewrite the whole
file can recompute every hash. Anchor the trail by recording its head
(:attr:`AuditTrail.head`, also in the closing record) somewhere the sandbox
host's users cannot write, e.g. the worker's log or the control plane.

Nothing secret or file content is written: tool inputs and free text are
stored as sha256 digests; egress decisions keep only method, host, port,
verdict and counts; lifecycle details are scalars, and long or key-looking
strings are replaced by their digest.

    trail = AuditTrail(trail_path(state_dir, session_id), session=session_id)
    trail.policy(policy)
    trail.lifecycle("sandbox_created", container=sb.id[:12])
    trail.tool_call("bash", {"command": cmd}, exit_status=res.exit_code, limit=res.limit, duration_s=res.duration)
    trail.egress(record)                      # an egress AuditRecord or its dict
    trail.close("session_ended")              # the closing record; no writes after it

A session served in several runs (each run of the worker closes the trail when
it ends) keeps one chain: ``AuditTrail(path, session=..., reopen=True)`` appends
a ``reopen`` record chained to the closing record and carries on. :func:`verify`
accepts a ``reopen`` right after a closing record and nothing else there, so a
multi-run trail verifies as one chain, and its runs can be told apart.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

GENESIS = "sha256:" + "0" * 64
CLOSE_KIND = "close"
REOPEN_KIND = "reopen"  # the only record allowed after a closing record: the next run of the same session
FsyncPolicy = Literal["always", "batched", "never"]
BATCH_FSYNC_S = 1.0  # a crash loses at most this much of tool-call/egress records; lifecycle is always synced
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.:@/+-]")
_SECRETISH = re.compile(r"sk-ant-|\bsk-[A-Za-z0-9_-]{16,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{16,}|github_pat_|"
                        r"xox[abprs]-|-----BEGIN|eyJ[A-Za-z0-9_-]{10,}\.", re.IGNORECASE)
_EGRESS_FIELDS = ("method", "host", "port", "addr", "decision", "rule", "reason", "code", "bytes_up", "bytes_down",
                  "duration_ms")


class TrailError(RuntimeError):
    pass


def canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def record_hash(rec: dict[str, Any]) -> str:
    body = {k: v for k, v in rec.items() if k != "hash"}
    return "sha256:" + hashlib.sha256(canonical(body)).hexdigest()


def digest(value: Any) -> str:
    """sha256 of a value's canonical JSON (bytes are hashed as they are)."""
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
    else:
        data = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _name(v: Any, limit: int = 64) -> str:
    return _SAFE_NAME.sub("_", str(v))[:limit]


def _scalar(v: Any) -> Any:
    """Lifecycle detail values: numbers and short, secret-free strings; anything else becomes a digest."""
    if v is None or isinstance(v, (bool, int, float)):
        return v
    s = str(v)
    if len(s) > 128 or _SECRETISH.search(s) or "\n" in s:
        return {"digest": digest(s)}
    return s


def trail_path(state_dir: Path | str, session_id: str) -> Path:
    """``<state_dir>/audit/<session>.jsonl``; the session id can never name another directory."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", session_id)[:96] or "_"
    return Path(state_dir) / "audit" / f"{safe}.jsonl"


class AuditTrail:
    """Appends hash-chained records for one session. Thread-safe; several processes may
    append to the same file (each append holds an exclusive flock and re-reads the head
    when the file grew under it)."""

    def __init__(self, path: Path | str, *, session: str, fsync: FsyncPolicy = "batched", reopen: bool = False):
        self.path = Path(path)
        self.reopen = reopen
        self.session = _name(session, 96)
        self.fsync = fsync
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
        self._fd = os.open(self.path, flags, 0o600)
        self._lock = threading.Lock()
        self._size = -1
        self._seq, self._head = 0, GENESIS
        self._last_sync = time.monotonic()
        self._closed = False

    # -------------------------------------------------------------- public API

    @property
    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last record written: anchor it outside the host to detect a rewrite."""
        return self._seq, self._head

    def policy(self, policy: Any) -> dict[str, Any]:
        # `policy_digest`, not `hash`: `hash` is the record's own chain hash.
        return self.append("policy", {"name": _name(policy.name), "policy_digest": policy.digest(),
                                      "runtime": _name(policy.runtime), "image": _name(policy.image, 128)}, sync=True)

    def tool_call(self, name: str, input: Any, *, exit_status: int | None, limit: str | None = None,
                  duration_s: float = 0.0, truncated: bool = False, error: str | None = None,
                  call_id: str | None = None) -> dict[str, Any]:
        """One tool call. ``input`` is stored only as its sha256 digest; ``error`` text likewise."""
        rec: dict[str, Any] = {"tool": _name(name), "input_digest": digest(input), "exit_status": exit_status,
                               "limit": _name(limit) if limit else None, "duration_s": round(float(duration_s), 4),
                               "truncated": bool(truncated)}
        if error:
            rec["error_digest"] = digest(error)
        if call_id:
            rec["call_id"] = _name(call_id, 96)
        return self.append("tool_call", rec)

    def egress(self, decision: Any) -> dict[str, Any]:
        """One proxy decision (an egress ``AuditRecord`` or its dict); paths and queries never kept."""
        d = decision if isinstance(decision, dict) else dict(vars(decision))
        rec = {k: _scalar(d.get(k)) for k in _EGRESS_FIELDS if d.get(k) is not None}
        if d.get("path"):
            rec["path_digest"] = digest(str(d["path"]))
        if d.get("ts"):
            rec["decided_at"] = _scalar(d["ts"])
        return self.append("egress", rec)

    def lifecycle(self, event: str, **details: Any) -> dict[str, Any]:
        return self.append("lifecycle", {"event": _name(event), **{_name(k): _scalar(v) for k, v in details.items()}},
                           sync=True)

    def close(self, event: str = "session_ended", **details: Any) -> dict[str, Any] | None:
        """Write the closing record (its presence tells `verify` the trail is complete) and close."""
        if self._closed:
            return None
        rec = self.append(CLOSE_KIND, {"event": _name(event), **{_name(k): _scalar(v) for k, v in details.items()}},
                          sync=True)
        with self._lock:
            self._closed = True
            os.close(self._fd)
        return rec

    def append(self, kind: str, fields: dict[str, Any], *, sync: bool = False) -> dict[str, Any]:
        with self._lock:
            if self._closed:
                raise TrailError(f"audit trail {self.path} is closed")
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                size = os.fstat(self._fd).st_size
                if size != self._size:  # first write, or another writer appended: re-read the head
                    self._seq, self._head, closed = _read_head(self.path, allow_closed=self.reopen)
                    if closed:
                        # The previous run closed the trail: the chain carries on with a reopen record.
                        size = self._write({"seq": self._seq + 1, "ts": _now(), "session": self.session,
                                            "kind": REOPEN_KIND, "prev": self._head}, size)
                rec: dict[str, Any] = {"seq": self._seq + 1, "ts": _now(), "session": self.session, "kind": _name(kind),
                                       **fields, "prev": self._head}
                self._write(rec, size)
                if self.fsync == "always" or (self.fsync == "batched" and
                                              (sync or time.monotonic() - self._last_sync >= BATCH_FSYNC_S)):
                    os.fsync(self._fd)
                    self._last_sync = time.monotonic()
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            return rec

    def _write(self, rec: dict[str, Any], size: int) -> int:
        """Hash and append one record (lock held); returns the file size after it."""
        rec["hash"] = record_hash(rec)
        line = canonical(rec) + b"\n"
        os.write(self._fd, line)  # one write on an O_APPEND fd: never interleaved with another's
        self._size = size + len(line)
        self._seq, self._head = rec["seq"], rec["hash"]
        return self._size

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close("session_ended" if exc[0] is None else "session_failed")


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="microseconds")


def _read_head(path: Path, *, allow_closed: bool = False) -> tuple[int, str, bool]:
    """(seq, hash, closed) of the file's last complete record; refuses to extend a broken trail, or a
    closed one unless ``allow_closed`` (the caller then writes a reopen record first)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            if end == 0:
                return 0, GENESIS, False
            f.seek(max(0, end - 65536))
            tail = f.read()
    except FileNotFoundError:
        return 0, GENESIS, False
    if not tail.endswith(b"\n"):
        raise TrailError(f"{path}: last record is incomplete; run `sandbox audit verify` and start a new trail")
    last = tail.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    try:
        rec = json.loads(last)
        seq, h = int(rec["seq"]), str(rec["hash"])
    except (ValueError, KeyError, TypeError):
        raise TrailError(f"{path}: last record is unreadable; run `sandbox audit verify`") from None
    if record_hash(rec) != h:
        raise TrailError(f"{path}: last record's hash does not match its content; run `sandbox audit verify`")
    closed = rec.get("kind") == CLOSE_KIND
    if closed and not allow_closed:
        raise TrailError(f"{path}: the trail is closed; open it with reopen=True to continue the session's chain")
    return seq, h, closed


# ------------------------------------------------------------------ verification

@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    records: int                # complete, valid records before the first break
    first_bad: int | None       # 1-based line number of the first broken record
    reason: str
    head: str                   # hash of the last valid record (GENESIS if none)
    closed: bool
    runs: int = 0               # runs recorded: 1 + the reopen records

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def verify(path: Path | str, *, allow_open: bool = False, expect_head: str | None = None) -> VerifyResult:
    """Check the chain; report the first broken record. An unclosed trail fails unless ``allow_open``
    (a live session's trail), because cutting records off the end looks exactly like that."""
    prev, seq, closed, runs = GENESIS, 0, False, 0
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    complete = data.endswith(b"\n") or not data
    if complete:
        lines = lines[:-1]

    def bad(n: int, why: str) -> VerifyResult:
        return VerifyResult(False, n - 1, n, why, prev, closed, runs)

    for n, raw in enumerate(lines, start=1):
        if n == len(lines) and not complete:
            return bad(n, "incomplete last record: the file was cut mid-record")
        try:
            rec = json.loads(raw)
        except ValueError:
            rec = None
        if not isinstance(rec, dict):
            return bad(n, "not a JSON object (altered or corrupted)")
        if closed and rec.get("kind") != REOPEN_KIND:
            return bad(n, "record after the closing record (only a reopen record may follow it)")
        if not closed and rec.get("kind") == REOPEN_KIND:
            return bad(n, "reopen record that does not follow a closing record")
        if rec.get("hash") != record_hash(rec):
            return bad(n, "hash does not match the record's content: this record was altered")
        if canonical(rec) != raw:
            return bad(n, "not in canonical form: this record was rewritten")
        if rec.get("seq") != seq + 1:
            return bad(n, f"sequence {rec.get('seq')} where {seq + 1} was expected: records were removed, "
                          "inserted or reordered")
        if rec.get("prev") != prev:
            return bad(n, "prev does not match the hash of the record before it: records were removed, "
                          "reordered or the previous one was altered and re-hashed")
        prev, seq = rec["hash"], rec["seq"]
        closed = rec.get("kind") == CLOSE_KIND
        if n == 1 or rec.get("kind") == REOPEN_KIND:
            runs += 1
    if expect_head is not None and prev != expect_head:
        return VerifyResult(False, seq, seq + 1, f"head {prev} is not the anchored head {expect_head}: records were "
                                                 "cut off the end, or the trail was rewritten", prev, closed, runs)
    if not closed and not allow_open:
        return VerifyResult(False, seq, seq + 1, f"no closing record after record {seq}: the trail was truncated, "
                                                 "or its session is still running (use --allow-open)", prev, closed, runs)
    state = "closed" if closed else "open (session still running)"
    across = f" across {runs} runs" if runs > 1 else ""
    return VerifyResult(True, seq, None, f"chain intact: {seq} records{across}, {state}", prev, closed, runs)
