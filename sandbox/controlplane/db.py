"""The SQLite file behind the control plane: schema, one lock, one change signal.

One connection guarded by one re-entrant lock: every operation here is a few
indexed statements, so serialising them costs nothing measurable locally and
rules out SQLITE_BUSY and lost updates between request threads. WAL keeps the
file consistent across crashes and lets an operator read it (sqlite3 CLI) while
we run. Writes go through `tx()` (BEGIN IMMEDIATE); reads through `read()`,
which takes the lock but no write transaction (this connection is the only
writer and holds the same lock, so a read sees no half-done write).

Waiting instead of spinning, on Conditions over the same lock: `changed` wakes
work long-polls (a session created, work queued or stopped); each session with
an open event stream has its own condition, woken only by events of that
session (`notify_session`). With one shared condition every appended event
woke every stream and every long-poll of every session, each then querying the
database under the one lock: the cost of a tool call grew with the number of
sessions open (measured: 8 event queries per call with 2 streams open).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import ApiError

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(
  key TEXT PRIMARY KEY,
  value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS environments(
  id TEXT PRIMARY KEY,
  name TEXT NOT NULL,
  description TEXT,
  metadata TEXT NOT NULL DEFAULT '{}',
  key_hash TEXT NOT NULL,
  created_at REAL NOT NULL,
  updated_at REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS environments_by_key ON environments(key_hash);
CREATE TABLE IF NOT EXISTS sessions(
  id TEXT PRIMARY KEY,
  environment_id TEXT NOT NULL REFERENCES environments(id),
  status TEXT NOT NULL,
  title TEXT,
  metadata TEXT NOT NULL DEFAULT '{}',
  agent TEXT NOT NULL,
  created_at REAL NOT NULL,
  updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events(
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  session_id TEXT NOT NULL REFERENCES sessions(id),
  type TEXT NOT NULL,
  processed_us INTEGER NOT NULL,
  ref_id TEXT,
  body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_session ON events(session_id, seq);
CREATE INDEX IF NOT EXISTS events_by_ref ON events(session_id, ref_id);
CREATE TABLE IF NOT EXISTS work(
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  environment_id TEXT NOT NULL REFERENCES environments(id),
  session_id TEXT NOT NULL REFERENCES sessions(id),
  state TEXT NOT NULL,
  created_at REAL NOT NULL,
  delivered_at REAL,
  delivered_to TEXT,
  generation INTEGER NOT NULL DEFAULT 0,
  acknowledged_at REAL,
  started_at REAL,
  latest_heartbeat_at REAL,
  last_heartbeat TEXT,
  lease_expires_at REAL,
  ttl_seconds INTEGER NOT NULL,
  stop_requested_at REAL,
  stopped_at REAL,
  metadata TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS work_queue ON work(environment_id, state, seq);
CREATE INDEX IF NOT EXISTS work_by_session ON work(session_id, state);
CREATE INDEX IF NOT EXISTS work_leases ON work(state, lease_expires_at);  -- _expire_leases, on every poll/ack/beat
CREATE TABLE IF NOT EXISTS tokens(
  token_hash TEXT PRIMARY KEY,
  work_id TEXT NOT NULL REFERENCES work(id),
  generation INTEGER NOT NULL,
  created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS workers(
  environment_id TEXT NOT NULL,
  worker_id TEXT NOT NULL,
  last_poll REAL NOT NULL,
  PRIMARY KEY(environment_id, worker_id)
);
"""


class Database:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.closing = False
        # session id -> [its condition, how many streams wait on it, version]; the version counts the
        # session's notifications, so a stream that has read everything up to a version need not query
        # again until it changes.
        self._session_conds: dict[str, list[Any]] = {}
        self._local = threading.local()
        existed = path.exists()
        conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=10.0)
        if not existed:
            # Token hashes and session transcripts: nobody else's business.
            os.chmod(path, 0o600)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=10000")
        conn.executescript(SCHEMA)
        self._conn: sqlite3.Connection | None = conn

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; nested calls on the same thread join the outer one."""
        with self.lock:
            conn = self._conn
            if conn is None:
                raise ApiError(503, "the control plane is shutting down")
            depth = getattr(self._local, "depth", 0)
            if depth:
                self._local.depth = depth + 1
                try:
                    yield conn
                finally:
                    self._local.depth = depth
                return
            conn.execute("BEGIN IMMEDIATE")
            self._local.depth = 1
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            else:
                conn.execute("COMMIT")
            finally:
                self._local.depth = 0

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """Statements that only read: under the lock, without a write transaction."""
        with self.lock:
            conn = self._conn
            if conn is None:
                raise ApiError(503, "the control plane is shutting down")
            yield conn

    def notify(self) -> None:
        """Work may have changed: wake the long-polls (and, to be safe, every stream)."""
        with self.lock:
            self.changed.notify_all()
            for entry in self._session_conds.values():
                entry[2] += 1
                entry[0].notify_all()

    def notify_session(self, session_id: str, *, work: bool) -> None:
        """Events were appended to `session_id`: wake its streams; with `work`, also the long-polls."""
        with self.lock:
            entry = self._session_conds.get(session_id)
            if entry is not None:
                entry[2] += 1
                entry[0].notify_all()
            if work:
                self.changed.notify_all()

    def session_version(self, session_id: str) -> int:
        """How many times `session_id`'s streams were notified (while any is open; call with the lock held)."""
        entry = self._session_conds.get(session_id)
        return -1 if entry is None else int(entry[2])

    @contextmanager
    def session_condition(self, session_id: str) -> Iterator[threading.Condition]:
        """The condition a stream of `session_id` waits on (call with the lock held; waits release it)."""
        with self.lock:
            entry = self._session_conds.get(session_id)
            if entry is None:
                entry = self._session_conds[session_id] = [threading.Condition(self.lock), 0, 0]
            entry[1] += 1
        try:
            yield entry[0]
        finally:
            with self.lock:
                entry[1] -= 1
                if entry[1] <= 0:
                    del self._session_conds[session_id]

    def get_meta(self, key: str) -> str | None:
        with self.tx() as c:
            row = c.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
            return None if row is None else str(row["value"])

    def set_meta(self, key: str, value: str) -> None:
        with self.tx() as c:
            c.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))

    def begin_close(self) -> None:
        """Wake every waiter and make them leave; the connection stays open until close()."""
        with self.lock:
            self.closing = True
            self.notify()

    def close(self) -> None:
        with self.lock:
            self.closing = True
            self.notify()
            if self._conn is not None:
                self._conn.close()
                self._conn = None
