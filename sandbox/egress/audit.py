"""Egress audit log: one JSON line per proxy decision.

What is recorded is deliberately narrow: who (session), what (method, canonical
host, port, path WITHOUT query), where it went (the checked address), the
verdict and why, and how much moved. Never request bodies, headers, userinfo or
query strings - those are where credentials live, and this file is readable by
operators who must not learn a sandbox's secrets from it.

Each file is size-capped with one rotated generation, so a sandbox that hammers
the proxy with refused requests cannot fill the host's disk. The daemon keeps one
file pair per session (:class:`SessionAuditLogs`, ``audit/<session>.jsonl``): a session
that floods the proxy rotates away only its own records, never another session's.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

DEFAULT_MAX_BYTES = 16 * 1024 * 1024
SESSION_MAX_BYTES = 4 * 1024 * 1024  # per session file (plus one rotated generation)
SESSIONS_DIR = "audit"  # next to audit.jsonl
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

Verdict = Literal["allow", "deny", "error"]


@dataclass
class AuditRecord:
    session: str
    method: str | None = None
    host: str | None = None  # canonical, or None when the request named no valid host
    port: int | None = None
    path: str | None = None  # plain HTTP only; query and fragment already stripped
    addr: str | None = None  # the address connected to (or refused)
    decision: Verdict = "deny"
    rule: str | None = None
    reason: str = ""
    code: str = ""
    bytes_up: int = 0
    bytes_down: int = 0
    duration_ms: float = 0.0
    ts: str = ""
    tls: str | None = None  # "tunnel" (SNI checked) or "terminated" (requests seen by the proxy)
    sni: str | None = None  # the ClientHello's server name, when one was read
    credential: str | None = None  # the NAME of a credential injected into this request, never its value
    status: int | None = None  # terminated requests: the response status the client got

    def to_json(self) -> str:
        d = dict(vars(self))  # flat fields only: asdict()'s deep copy is measurable per request
        if not d["ts"]:
            d["ts"] = utc_now_ms()
        d["path"] = _strip_query(d["path"])
        if _C_ENCODE is not None:
            return "".join(_C_ENCODE(d, 0))
        return _ENCODER.encode(d)


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)  # json.dumps with options builds one per call
# What _ENCODER.encode builds on every call for a dict (the C encoder and its settings), built once.
# No circular-reference markers: a record is one flat dict of strings and numbers.
_make = getattr(json.encoder, "c_make_encoder", None)  # None without the _json accelerator
_C_ENCODE = None if _make is None else _make(None, _ENCODER.default, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, True)
_SECOND: tuple[int, str] = (-1, "")


def utc_now_ms() -> str:
    """``datetime.now(UTC).isoformat(timespec="milliseconds")``, the date and time text made
    once a second (one record per request: the datetime object and its formatting showed up)."""
    global _SECOND
    t = time.time()
    sec = int(t)
    if _SECOND[0] != sec:
        _SECOND = (sec, datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{_SECOND[1]}.{min(999, int((t - sec) * 1000)):03d}+00:00"


def _strip_query(path: str | None) -> str | None:
    if path is None:
        return None
    return path.partition("?")[0].partition("#")[0][:256]


class AuditLog:
    """Append-only JSON-lines writer, safe to call from the proxy's event loop (each
    record is one small write on an O_APPEND descriptor)."""

    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._fd = self._open()
        self._size = os.fstat(self._fd).st_size  # tracked, not fstat'ed per record

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def write(self, record: AuditRecord) -> None:
        line = (record.to_json() + "\n").encode("ascii")
        try:
            if self._size + len(line) > self.max_bytes:
                # another writer (e.g. `sandbox proxy` next to the daemon) may have grown it
                self._size = os.fstat(self._fd).st_size
                if self._size + len(line) > self.max_bytes:
                    self._rotate()
                    self._size = 0
            self._size += os.write(self._fd, line)
        except OSError:
            # Auditing must not take the proxy down (e.g. disk full); the decision itself
            # has already been enforced.
            pass

    def _rotate(self) -> None:
        # Copy-then-truncate instead of rename: after the daemon drops privileges it may
        # own the two files but not the directory they live in.
        old = self.path.with_name(self.path.name + ".1")
        with open(self.path, "rb") as src, open(old, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.ftruncate(self._fd, 0)

    def close(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass


def session_file(path: Path, session: str) -> Path:
    """Where :class:`SessionAuditLogs` next to ``path`` (an ``audit.jsonl``) keeps ``session``'s records."""
    name = session if _SAFE_NAME.match(session) and session not in (".", "..") else "h-" + hashlib.sha256(session.encode()).hexdigest()[:32]
    return Path(path).parent / SESSIONS_DIR / f"{name}.jsonl"


class SessionAuditLogs:
    """One capped :class:`AuditLog` per session under ``<dir of path>/audit/``: per-session
    quotas, so no session's flood can evict another's records. Same ``write`` as AuditLog."""

    def __init__(self, path: Path, max_bytes: int = SESSION_MAX_BYTES) -> None:
        self.path = Path(path)
        self.dir = self.path.parent / SESSIONS_DIR
        self.dir.mkdir(mode=0o750, exist_ok=True)
        self.max_bytes = max_bytes
        self._logs: dict[str, AuditLog] = {}

    def write(self, record: AuditRecord) -> None:
        log = self._logs.get(record.session)
        if log is None:
            try:
                log = self._logs[record.session] = AuditLog(session_file(self.path, record.session), self.max_bytes)
            except OSError:
                return  # auditing must not take the proxy down
        log.write(record)

    def close_session(self, session: str) -> None:
        log = self._logs.pop(session, None)
        if log is not None:
            log.close()

    def close(self) -> None:
        for s in list(self._logs):
            self.close_session(s)


def _lines(path: Path) -> Iterator[str]:
    for p in (path.with_name(path.name + ".1"), path):
        try:
            with open(p, encoding="ascii", errors="replace") as f:
                yield from f
        except FileNotFoundError:
            continue


def read_records(path: Path, session: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """The most recent ``limit`` records (oldest first), optionally for one session: from
    ``path`` itself and from the per-session files next to it (:class:`SessionAuditLogs`)."""
    path = Path(path)
    sources = [path]
    if session is not None:
        sources.append(session_file(path, session))
    else:
        with_dir = path.parent / SESSIONS_DIR
        if with_dir.is_dir():
            sources += sorted(p for p in with_dir.glob("*.jsonl"))
    merged: list[dict[str, Any]] = []
    for src in sources:
        out: deque[dict[str, Any]] = deque(maxlen=max(1, limit))
        for line in _lines(src):
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a torn last line after a crash
            if not isinstance(rec, dict):
                continue
            if session is not None and rec.get("session") != session:
                continue
            out.append(rec)
        merged += out
    if len(sources) > 1:
        merged.sort(key=lambda r: str(r.get("ts", "")))  # ISO 8601 UTC: text order is time order
    return merged[-max(1, limit):]


def now_ms(start: float) -> float:
    return round((time.monotonic() - start) * 1000, 3)
