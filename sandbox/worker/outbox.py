"""The journal: durable record of every tool call, keyed by `tool_use_id`, shared by workers.

Why: the SDK's session runner dedupes tool calls by event id only in memory.
After a restart (or a lost lease, or a re-delivered work item) its reconcile
pass re-dispatches every call that has no posted result, and without this
record the call would run a second time. So:

- `begin()` writes a `running` row BEFORE the tool touches the sandbox;
- `finish()` stores the result (`done`) BEFORE the SDK posts it;
- `delivered()` drops the stored result once the control plane accepted the
  post (the row stays as a tombstone so the call can never run again);
- rows left `running` by a worker that is gone become an `interrupted` error
  result: the call may or may not have had effects, so it is not run again;
  the model is told so and can decide. A row `running` under a worker that is
  still alive (the lease moved while that worker still runs the call) is
  waited for (`Begin.wait`), then replayed.

The file lives in the session store (`<store>/journal.db`, host side, never
inside a sandbox) and is shared by every worker using that store, so a call
whose worker was killed is answered as interrupted by whichever worker serves
the session next. Who is alive is asked of `alive(owner)` (the store's owner
lock files); owners are unique per worker instance.

A re-dispatched call whose row is `done` gets the stored result (replayed, not
re-run); `delivered` rows replay too (a reconcile can race the post that made
them delivered). SQLite in WAL mode, one connection per thread, short
`BEGIN IMMEDIATE` transactions, so several processes may write.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

TOMBSTONE_TTL_S = 7 * 24 * 3600
INTERRUPTED_TEXT = (
    "interrupted: the worker that was running this tool call stopped before it finished. "
    "The call was not run again so that it never runs twice; its effects, if any, are unknown. "
    "Check the state and retry if needed."
)

State = Literal["running", "done", "delivered"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls(
    tool_use_id TEXT PRIMARY KEY,
    session_id  TEXT NOT NULL,
    work_id     TEXT,
    tool        TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('running','done','delivered')),
    owner       TEXT NOT NULL,
    is_error    INTEGER,
    content     TEXT,
    started_at  REAL NOT NULL,
    finished_at REAL,
    delivered_at REAL,
    replays     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS calls_pending ON calls(state, session_id);
"""


@dataclass(frozen=True)
class StoredResult:
    content: Any  # str, or a list of content blocks
    is_error: bool


@dataclass(frozen=True)
class CallRecord:
    tool_use_id: str
    session_id: str
    work_id: str | None
    tool: str
    state: State
    owner: str
    result: StoredResult | None
    started_at: float
    finished_at: float | None


@dataclass(frozen=True)
class Begin:
    """What `begin()` decided: run the tool now, or answer with a stored result."""

    run: bool
    record: CallRecord | None = None  # the existing row when not running
    wait: bool = False  # another live worker is running it right now: ask again later


def _when_unlocked(step: Callable[[], Any], deadline_s: float = 30.0) -> None:
    """Run a setup step, again while another process holds the file (SQLite's busy handler skips these)."""
    end = time.monotonic() + deadline_s
    pause = 0.005
    while True:
        try:
            step()
            return
        except sqlite3.OperationalError as e:
            if ("locked" not in str(e) and "busy" not in str(e)) or time.monotonic() > end:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


class AcceptedResults:
    """Results the control plane accepted, noted without I/O (so on an event loop) and marked in the
    journal later, by its next write and before any read of pending results (both journal forms)."""

    def __init__(self) -> None:
        self._accepted: list[str] = []
        self._accepted_lock = threading.Lock()

    def delivered_later(self, tool_use_ids: list[str]) -> None:
        """Like `delivered`, without touching the file now (callable on an event loop: no I/O).

        Applied in the next write transaction of this outbox (the next call's `begin` or `finish`) and before
        any read of pending results, so nothing reads a stale `done`. If the worker dies first, the
        results stay `done`: a replay posts the same result again, which the control plane answers
        with the first one (never a second run), or the sweeper finds it answered and drops it."""
        if tool_use_ids:
            with self._accepted_lock:
                self._accepted.extend(tool_use_ids)

    def _take_accepted(self) -> list[str]:
        with self._accepted_lock:
            ids, self._accepted = self._accepted, []
        return ids


class Outbox(AcceptedResults):
    kind = "sqlite"

    def __init__(self, path: Path, owner: str, *, synchronous: str = "FULL",
                 alive: Callable[[str], bool] | None = None) -> None:
        self.path = Path(path)
        self.owner = owner
        # Without a liveness oracle every other owner counts as gone (a private, single-writer outbox).
        self._alive = alive or (lambda o: o == owner)
        self._sync = synchronous
        self._local = threading.local()
        self._write_lock = threading.Lock()
        AcceptedResults.__init__(self)  # results the control plane accepted, not yet marked in the file
        self._nowait: sqlite3.Connection | None = None  # try_begin's connection (see there)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _when_unlocked(lambda: self._conn().executescript(_SCHEMA))
        try:
            self.path.chmod(0o600)
        except OSError:
            pass

    # ---------------------------------------------------------------- plumbing

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=True)
            conn.row_factory = sqlite3.Row
            # Switching to WAL takes the file's exclusive lock and SQLite answers "locked" at once, without
            # its busy handler, while another worker opens the same journal (two workers starting together).
            _when_unlocked(lambda: conn.execute("PRAGMA journal_mode=WAL"))
            # FULL: a result the worker reported as stored survives a power cut too.
            conn.execute(f"PRAGMA synchronous={self._sync}")
            self._local.conn = conn
        return conn

    class _Tx:
        def __init__(self, conn: sqlite3.Connection, lock: threading.Lock) -> None:
            self.conn = conn
            self.lock = lock

        def __enter__(self) -> sqlite3.Connection:
            # Threads of this process queue on a mutex: colliding on the file lock instead would put them
            # in SQLite's busy handler, which sleeps 1, 2, 5, 10... ms between retries (with 16 sessions
            # calling at once, that sleep was on most calls). Other processes still meet the file lock.
            self.lock.acquire()
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.lock.release()
                raise
            return self.conn

        def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
            try:
                self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
            finally:
                self.lock.release()

    def _tx(self) -> Outbox._Tx:
        return Outbox._Tx(self._conn(), self._write_lock)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        with self._write_lock:
            if self._nowait is not None:
                self._nowait.close()
                self._nowait = None

    @staticmethod
    def _record(row: sqlite3.Row) -> CallRecord:
        result = None
        if row["content"] is not None:
            result = StoredResult(json.loads(row["content"]), bool(row["is_error"]))
        return CallRecord(row["tool_use_id"], row["session_id"], row["work_id"], row["tool"], row["state"],
                          row["owner"], result, row["started_at"], row["finished_at"])

    # ---------------------------------------------------------------- lifecycle

    def recover(self) -> int:
        """Calls left running by workers that are gone become `interrupted` results."""
        now = time.time()
        with self._tx() as c:
            owners = [r[0] for r in c.execute("SELECT DISTINCT owner FROM calls WHERE state='running' AND owner<>?",
                                              (self.owner,))]
            dead = [o for o in owners if not self._alive(o)]
            n = 0
            for o in dead:
                n += c.execute(
                    "UPDATE calls SET state='done', is_error=1, content=?, finished_at=? WHERE state='running' AND owner=?",
                    (json.dumps(INTERRUPTED_TEXT), now, o),
                ).rowcount
            c.execute("DELETE FROM calls WHERE state='delivered' AND delivered_at < ?", (now - TOMBSTONE_TTL_S,))
            return n

    def begin(self, tool_use_id: str, session_id: str, work_id: str | None, tool: str) -> Begin:
        """Claim the call for execution, or return the row that already answers it."""
        accepted = self._take_accepted()
        with self._tx() as c:
            self._mark_delivered(c, accepted)
            row = c.execute("SELECT * FROM calls WHERE tool_use_id=?", (tool_use_id,)).fetchone()
            if row is None:
                c.execute(
                    "INSERT INTO calls(tool_use_id, session_id, work_id, tool, state, owner, started_at)"
                    " VALUES(?, ?, ?, ?, 'running', ?, ?)",
                    (tool_use_id, session_id, work_id, tool, self.owner, time.time()),
                )
                return Begin(run=True)
            if row["state"] == "running":
                if row["owner"] == self.owner or self._alive(row["owner"]):
                    # A live worker runs it now (it lost the lease mid-call): wait for its result.
                    return Begin(run=False, record=self._record(row), wait=True)
                # Its worker is gone: the call may have had effects; never run it again.
                c.execute(
                    "UPDATE calls SET state='done', is_error=1, content=?, finished_at=? WHERE tool_use_id=?",
                    (json.dumps(INTERRUPTED_TEXT), time.time(), tool_use_id),
                )
                row = c.execute("SELECT * FROM calls WHERE tool_use_id=?", (tool_use_id,)).fetchone()
            if row["state"] in ("done", "delivered"):
                c.execute("UPDATE calls SET replays=replays+1 WHERE tool_use_id=?", (tool_use_id,))
            return Begin(run=False, record=self._record(row))

    def try_begin(self, tool_use_id: str, session_id: str, work_id: str | None, tool: str) -> Begin | None:
        """`begin` for a caller that must not wait (the worker's event loop): claims a call never seen
        before in one statement on a connection of its own that never waits for a lock (busy timeout 0)
        and never checkpoints the file; None when it cannot say at once (another thread of this process
        or another process is writing, or the call has a row already): ask `begin`, in a thread.

        One INSERT is its own transaction, and SQLite takes the write lock before it reads: the check and
        the claim are one atomic step for every connection to the file, as in `begin`."""
        if not self.finishes_on_loop or not self._write_lock.acquire(blocking=False):
            return None  # a FULL commit fsyncs: never on the loop
        try:
            conn = self._nowait_conn()
            claimed = conn.execute(
                "INSERT INTO calls(tool_use_id, session_id, work_id, tool, state, owner, started_at)"
                " VALUES(?, ?, ?, ?, 'running', ?, ?) ON CONFLICT(tool_use_id) DO NOTHING",
                (tool_use_id, session_id, work_id, tool, self.owner, time.time()),
            ).rowcount
        except sqlite3.OperationalError:
            return None  # locked or busy: nothing was written
        finally:
            self._write_lock.release()
        return Begin(run=True) if claimed == 1 else None

    @property
    def finishes_on_loop(self) -> bool:
        """Can `try_begin` and `try_finish` answer without waiting? Not when every commit fsyncs (FULL)."""
        return self._sync.upper() not in ("FULL", "EXTRA")

    def _nowait_conn(self) -> sqlite3.Connection:
        """The connection of `try_begin` and `try_finish` (under the write mutex): it never waits for a
        lock (busy timeout 0) and never checkpoints the file (the threads' connections do)."""
        conn = self._nowait
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=0.0, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA synchronous={self._sync}")
            conn.execute("PRAGMA wal_autocheckpoint=0")
            self._nowait = conn
        return conn

    # Every this many results offered to `try_finish`, one goes to `finish` in a thread instead: the no-wait
    # connection never checkpoints (a checkpoint fsyncs), so the threads' connections keep the WAL bounded.
    CHECKPOINT_EVERY = 128
    _nowait_finishes = 0

    def try_finish(self, tool_use_id: str, content: Any, is_error: bool) -> bool:
        """`finish` for a caller that must not wait (the worker's event loop, where the sandbox's channel
        is read): stores the result, and the results accepted since the last write, in one transaction
        on `try_begin`'s connection. False, with nothing written, when it cannot at once (another thread
        of this process or another process is writing, every commit fsyncs, or a checkpoint is due): call
        `finish` in a thread."""
        payload = json.dumps(content)
        if not self.finishes_on_loop:
            return False
        self._nowait_finishes += 1
        if self._nowait_finishes % self.CHECKPOINT_EVERY == 0 or not self._write_lock.acquire(blocking=False):
            return False  # (a checkpoint turn: see CHECKPOINT_EVERY)
        accepted = self._take_accepted()
        written = False
        try:
            conn = self._nowait_conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._mark_delivered(conn, accepted)
                conn.execute(
                    "UPDATE calls SET state='done', content=?, is_error=?, finished_at=? WHERE tool_use_id=? AND state='running'",
                    (payload, int(is_error), time.time(), tool_use_id),
                )
                conn.execute("COMMIT")
                written = True
            finally:
                if not written:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass  # no transaction left to end; the error that got here is raised
        except sqlite3.OperationalError:
            return False
        finally:
            if not written:
                self.delivered_later(accepted)  # nothing was written: they go with the next write
            self._write_lock.release()
        return True

    def finish(self, tool_use_id: str, content: Any, is_error: bool) -> None:
        """Store the result; called before the result is handed to the SDK to post."""
        accepted = self._take_accepted()  # earlier results the control plane took (`try_begin` leaves them)
        with self._tx() as c:
            self._mark_delivered(c, accepted)
            c.execute(
                "UPDATE calls SET state='done', content=?, is_error=?, finished_at=? WHERE tool_use_id=? AND state='running'",
                (json.dumps(content), int(is_error), time.time(), tool_use_id),
            )

    def delivered(self, tool_use_ids: list[str]) -> int:
        """The control plane accepted these results: drop their payload, keep the tombstone."""
        with self._tx() as c:
            return self._mark_delivered(c, list(tool_use_ids) + self._take_accepted())

    def _flush_accepted(self) -> None:
        if self._accepted:
            ids = self._take_accepted()
            if ids:
                with self._tx() as c:
                    self._mark_delivered(c, ids)

    @staticmethod
    def _mark_delivered(c: sqlite3.Connection, tool_use_ids: list[str]) -> int:
        now = time.time()
        n = 0
        for tid in tool_use_ids:
            n += c.execute(
                "UPDATE calls SET state='delivered', content=NULL, delivered_at=? WHERE tool_use_id=? AND state='done'",
                (now, tid),
            ).rowcount
        return n

    def abandon(self, tool_use_id: str) -> None:
        """The tool was cancelled mid-flight (SDK timeout, shutdown): its effects are unknown."""
        with self._tx() as c:
            c.execute(
                "UPDATE calls SET state='done', is_error=1, content=?, finished_at=? WHERE tool_use_id=? AND state='running'",
                (json.dumps(INTERRUPTED_TEXT), time.time(), tool_use_id),
            )

    # ---------------------------------------------------------------- queries

    def get(self, tool_use_id: str) -> CallRecord | None:
        self._flush_accepted()
        row = self._conn().execute("SELECT * FROM calls WHERE tool_use_id=?", (tool_use_id,)).fetchone()
        return None if row is None else self._record(row)

    def pending(self, session_id: str | None = None, older_than: float | None = None) -> list[CallRecord]:
        """Results stored but not yet accepted by the control plane."""
        self._flush_accepted()
        sql = "SELECT * FROM calls WHERE state='done'"
        args: list[Any] = []
        if session_id is not None:
            sql += " AND session_id=?"
            args.append(session_id)
        if older_than is not None:
            sql += " AND finished_at < ?"
            args.append(time.time() - older_than)
        return [self._record(r) for r in self._conn().execute(sql + " ORDER BY started_at", args)]

    def pending_count(self) -> int:
        self._flush_accepted()
        return int(self._conn().execute("SELECT COUNT(*) FROM calls WHERE state='done'").fetchone()[0])

    def all(self) -> list[CallRecord]:
        self._flush_accepted()
        return [self._record(r) for r in self._conn().execute("SELECT * FROM calls ORDER BY started_at")]

    def drop(self, tool_use_id: str) -> None:
        """Forget a pending result that can never be delivered (its session is gone)."""
        with self._tx() as c:
            c.execute("UPDATE calls SET state='delivered', content=NULL, delivered_at=? WHERE tool_use_id=?",
                      (time.time(), tool_use_id))
