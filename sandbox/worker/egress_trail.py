"""A session's egress decisions reach its audit trail as they happen.

The egress daemon writes each session's decisions to its own capped file
(``audit/<session>.jsonl`` beside the daemon's ``audit.jsonl``, rotated by
copy-then-truncate into ``.1``), so no other session can evict them. While a run
of the session is active, :class:`EgressTail` follows that file from a cursor and
appends every new record to the session's trail within a poll interval; the
cursor (byte offset, and a digest of the file's first line, which tells a rotation
apart even when the new generation has already grown past the offset) is kept in
the session store, so a later run, on any worker, continues where the last
stopped: no record twice, none skipped unless the session's own flood rotated the
file twice between two polls (then an ``egress_records_lost`` lifecycle record says
so).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any, Callable

POLL_S = 0.5
MAX_READ = 4 << 20  # per poll: bounded work whatever the flood


class EgressTail:
    def __init__(self, audit_file: Path, cursor_file: Path, sink: Callable[[dict[str, Any]], Any],
                 lost: Callable[[str], Any] = lambda why: None) -> None:
        self.audit_file = Path(audit_file)
        self.cursor_file = Path(cursor_file)
        self.sink = sink
        self.lost = lost
        self.offset, self.first = self._load_cursor()
        self._partial = b""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------ cursor

    def _load_cursor(self) -> tuple[int, str]:
        try:
            doc = json.loads(self.cursor_file.read_text())
            offset, first = doc.get("offset", 0), doc.get("first", "")
            if isinstance(offset, int) and offset >= 0 and isinstance(first, str):
                return offset, first
        except (OSError, ValueError, AttributeError):
            pass
        return 0, ""

    @staticmethod
    def _first_line(path: Path) -> str:
        """A digest of the file's first complete line ("" while it has none)."""
        try:
            with open(path, "rb") as f:
                head = f.readline(1 << 16)
        except OSError:
            return ""
        return hashlib.sha256(head).hexdigest()[:32] if head.endswith(b"\n") else ""

    def _save_cursor(self) -> None:
        tmp = self.cursor_file.with_name(self.cursor_file.name + ".tmp")
        try:
            tmp.write_text(json.dumps({"offset": self.offset, "first": self.first}))
            os.replace(tmp, self.cursor_file)
        except OSError:
            pass

    # ------------------------------------------------------------ reading

    @staticmethod
    def _read(path: Path, start: int, limit: int) -> bytes:
        try:
            with open(path, "rb") as f:
                f.seek(start)
                return f.read(limit)
        except OSError:
            return b""

    def _emit(self, data: bytes) -> None:
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()  # a line still being written
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                self.sink(rec)

    def poll(self) -> int:
        """Append what is new; returns how many bytes were consumed."""
        with self._lock:
            try:
                size = self.audit_file.stat().st_size
            except OSError:
                return 0
            consumed = 0
            first = self._first_line(self.audit_file)
            rotated_away = self.offset > 0 and (size < self.offset or bool(self.first) and first != self.first)
            if rotated_away:
                # Rotated (copied to .1, then truncated): finish the old generation first.
                rotated = self.audit_file.with_name(self.audit_file.name + ".1")
                try:
                    old_size = rotated.stat().st_size
                except OSError:
                    old_size = 0
                if old_size >= self.offset and self._first_line(rotated) == self.first:
                    data = self._read(rotated, self.offset, old_size - self.offset)
                    self._emit(data)
                    consumed += len(data)
                else:
                    self.lost("the session's egress log rotated more than once between two reads")
                self._partial = b""
                self.offset = 0
            if self.offset == 0 or not self.first:
                self.first = first  # (a first line still being written is adopted once complete)
            data = self._read(self.audit_file, self.offset, min(MAX_READ, size - self.offset))
            if data:
                self._emit(data)
                self.offset += len(data)
                consumed += len(data)
            if consumed:
                self._save_cursor()
            return consumed

    # ------------------------------------------------------------ background

    def start(self) -> EgressTail:
        self._thread = threading.Thread(target=self._run, name="egress-trail", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the tail must not die; stop() drains once more
                pass

    def stop(self) -> None:
        """Stop following, after a last read (the run is over: what the proxy decided is in)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.poll()
