"""The work queue and its leases: the state machine behind the Environments Work API.

States (BetaSelfHostedWork.state) and what moves an item:

    queued --poll--> queued+delivered ("pending") --ack--> starting --heartbeat--> active
       ^                    |  (not acked within reclaim_older_than_ms:
       |                    |   another poll may take it)
       +---- lease lapsed (starting/active with no heartbeat for ttl) ----+
    any live state --stop(force) or stop of an un-acked item--> stopped
    starting/active --stop(graceful)--> stopping --stop(force) / lease lapse--> stopped

Each delivery (poll) mints a fresh sessions token and bumps the item's
`generation`. A token is bound to the delivery that minted it: once the item is
delivered again, the old holder's heartbeats get 412 (the lease is someone
else's), its ack/stop get 409, and its session calls are refused. That is the
split-brain guard the SDK worker expects from the server.

A first heartbeat (`NO_HEARTBEAT`) on a delivered but un-acked item claims it,
for workers that never ack (the Go SDK's `HandleItem`, the GKE dispatcher).
"""

from __future__ import annotations

import base64
import json
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from . import keys
from .clock import Clock, new_id, rfc3339, rfc3339_or_none, rfc3339_us, to_us
from .db import Database
from .errors import ApiError, bad_request, conflict, not_found

DEFAULT_TTL_SECONDS = 120  # the TS SDK fixture's value; the server's answer is what counts
MIN_TTL_SECONDS = 10
MAX_TTL_SECONDS = 600
DEFAULT_RECLAIM_MS = 5000  # documented default of reclaim_older_than_ms
WORKERS_WINDOW_SECONDS = 30  # "workers that have polled in the last 30 seconds"
WORKER_ROW_RETENTION_SECONDS = 3600
NO_HEARTBEAT = "NO_HEARTBEAT"
LIVE_STATES = ("queued", "starting", "active")
MAX_METADATA_KEYS = 16
MAX_METADATA_KEY_LEN = 64
MAX_METADATA_VALUE_LEN = 512
# How often a blocked poll re-checks for items that became reclaimable by time
# alone (no write to wake it).
_POLL_RECHECK_SECONDS = 0.1


@dataclass(frozen=True)
class TokenGrant:
    """What a sessions token is bound to; `current` is False once the item was re-delivered."""

    work_id: str
    session_id: str
    environment_id: str
    generation: int
    current: bool
    state: str


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"c{seq}".encode()).decode().rstrip("=")


def decode_cursor(page: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(page + "=" * (-len(page) % 4)).decode()
        if not raw.startswith("c"):
            raise ValueError
        seq = int(raw[1:])
        if seq < 0:
            raise ValueError
        return seq
    except (ValueError, UnicodeDecodeError):
        raise bad_request("invalid page cursor") from None


def validate_metadata_patch(patch: object) -> dict[str, str | None]:
    if not isinstance(patch, dict):
        raise bad_request("metadata: expected an object of string keys to string or null values")
    out: dict[str, str | None] = {}
    for k, v in patch.items():
        if not isinstance(k, str) or not k or len(k) > MAX_METADATA_KEY_LEN:
            raise bad_request(f"metadata keys must be 1-{MAX_METADATA_KEY_LEN} character strings")
        if v is not None and (not isinstance(v, str) or len(v) > MAX_METADATA_VALUE_LEN):
            raise bad_request(f"metadata[{k!r}]: expected a string of at most {MAX_METADATA_VALUE_LEN} characters or null")
        out[k] = v
    return out


def work_json(row: sqlite3.Row, *, secret: str | None = None) -> dict[str, Any]:
    """A work row in the BetaSelfHostedWork shape; `secret` only on the poll that delivers it."""
    return {
        "type": "work",
        "id": row["id"],
        "environment_id": row["environment_id"],
        "data": {"type": "session", "id": row["session_id"]},
        "state": row["state"],
        "created_at": rfc3339(row["created_at"]),
        "acknowledged_at": rfc3339_or_none(row["acknowledged_at"]),
        "started_at": rfc3339_or_none(row["started_at"]),
        "latest_heartbeat_at": rfc3339_or_none(row["latest_heartbeat_at"]),
        "stop_requested_at": rfc3339_or_none(row["stop_requested_at"]),
        "stopped_at": rfc3339_or_none(row["stopped_at"]),
        "metadata": json.loads(row["metadata"]),
        "secret": secret,
    }


class WorkQueue:
    def __init__(self, db: Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock

    # ----------------------------------------------------------------- helpers

    def _row(self, c: sqlite3.Connection, environment_id: str, work_id: str) -> sqlite3.Row:
        row: sqlite3.Row | None = c.execute(
            "SELECT * FROM work WHERE id=? AND environment_id=?", (work_id, environment_id)
        ).fetchone()
        if row is None:
            raise not_found(f"work item {work_id!r} not found in environment {environment_id!r}")
        return row

    def _expire_leases(self, c: sqlite3.Connection, now: float) -> None:
        """Return lapsed leases to the queue (or finish a stopping item nobody is finishing)."""
        c.execute(
            "UPDATE work SET state='queued', delivered_at=NULL, delivered_to=NULL, acknowledged_at=NULL,"
            " started_at=NULL, last_heartbeat=NULL, latest_heartbeat_at=NULL, lease_expires_at=NULL"
            " WHERE state IN ('starting','active') AND lease_expires_at IS NOT NULL AND lease_expires_at < ?",
            (now,),
        )
        c.execute(
            "UPDATE work SET state='stopped', stopped_at=?, lease_expires_at=NULL"
            " WHERE state='stopping' AND lease_expires_at IS NOT NULL AND lease_expires_at < ?",
            (now, now),
        )

    def _stale(self, row: sqlite3.Row, holder_generation: int | None) -> bool:
        return holder_generation is not None and holder_generation != row["generation"]

    # ------------------------------------------------------------- producers

    def enqueue(self, c: sqlite3.Connection, environment_id: str, session_id: str) -> str:
        """Queue a work item for a session (inside the caller's transaction)."""
        work_id = new_id("work")
        c.execute(
            "INSERT INTO work(id, environment_id, session_id, state, created_at, ttl_seconds)"
            " VALUES(?, ?, ?, 'queued', ?, ?)",
            (work_id, environment_id, session_id, self._clock(), DEFAULT_TTL_SECONDS),
        )
        return work_id

    def has_live_item(self, c: sqlite3.Connection, session_id: str) -> bool:
        # Read only (every injected tool call passes here): expiring leases first would not change the
        # answer (a lapsed `starting`/`active` item goes back to `queued`, still live; a lapsed `stopping`
        # one ends `stopped`, live neither way), and every path that reads or hands out state expires them.
        row = c.execute(
            "SELECT 1 FROM work WHERE session_id=? AND state IN ('queued','starting','active') LIMIT 1", (session_id,)
        ).fetchone()
        return row is not None

    def cancel_undelivered(self, c: sqlite3.Connection, session_id: str) -> None:
        """Stop queued items nobody has picked up (the session they would serve has ended)."""
        now = self._clock()
        c.execute(
            "UPDATE work SET state='stopped', stop_requested_at=?, stopped_at=?"
            " WHERE session_id=? AND state='queued' AND delivered_at IS NULL",
            (now, now, session_id),
        )

    # -------------------------------------------------------------- Work API

    def poll(
        self,
        environment_id: str,
        *,
        block_ms: int | None,
        reclaim_older_than_ms: int | None,
        worker_id: str | None,
        api_base_url: str,
    ) -> dict[str, Any] | None:
        reclaim_s = (DEFAULT_RECLAIM_MS if reclaim_older_than_ms is None else reclaim_older_than_ms) / 1000.0
        deadline = time.monotonic() + (block_ms or 0) / 1000.0
        first = True
        with self._db.lock:
            while True:
                if self._db.closing:
                    return None
                with self._db.tx() as c:
                    now = self._clock()
                    if first and worker_id:
                        c.execute(
                            "INSERT INTO workers(environment_id, worker_id, last_poll) VALUES(?, ?, ?)"
                            " ON CONFLICT(environment_id, worker_id) DO UPDATE SET last_poll=excluded.last_poll",
                            (environment_id, worker_id, now),
                        )
                        c.execute("DELETE FROM workers WHERE last_poll < ?", (now - WORKER_ROW_RETENTION_SECONDS,))
                    first = False
                    self._expire_leases(c, now)
                    row = c.execute(
                        "SELECT * FROM work WHERE environment_id=? AND state='queued'"
                        " AND (delivered_at IS NULL OR delivered_at <= ?) ORDER BY seq LIMIT 1",
                        (environment_id, now - reclaim_s),
                    ).fetchone()
                    if row is not None:
                        return self._deliver(c, row, worker_id, now, api_base_url)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._db.changed.wait(min(remaining, _POLL_RECHECK_SECONDS))

    def _deliver(
        self, c: sqlite3.Connection, row: sqlite3.Row, worker_id: str | None, now: float, api_base_url: str
    ) -> dict[str, Any]:
        generation = int(row["generation"]) + 1
        token = keys.new_sessions_token()
        c.execute(
            "UPDATE work SET delivered_at=?, delivered_to=?, generation=?, last_heartbeat=NULL,"
            " latest_heartbeat_at=NULL, lease_expires_at=NULL WHERE id=?",
            (now, worker_id, generation, row["id"]),
        )
        c.execute(
            "INSERT INTO tokens(token_hash, work_id, generation, created_at) VALUES(?, ?, ?, ?)",
            (keys.hash_key(token), row["id"], generation, now),
        )
        fresh = c.execute("SELECT * FROM work WHERE id=?", (row["id"],)).fetchone()
        return work_json(fresh, secret=keys.encode_work_secret(token, api_base_url))

    def ack(self, environment_id: str, work_id: str, *, holder_generation: int | None) -> dict[str, Any]:
        with self._db.tx() as c:
            now = self._clock()
            self._expire_leases(c, now)
            row = self._row(c, environment_id, work_id)
            if self._stale(row, holder_generation):
                raise conflict("this work item was delivered to another worker")
            state = row["state"]
            if state in ("stopping", "stopped"):
                raise conflict(f"work item is {state}")
            if state == "queued":
                if row["delivered_at"] is None:
                    raise conflict("work item has not been delivered by a poll")
                c.execute(
                    "UPDATE work SET state='starting', acknowledged_at=?, lease_expires_at=? WHERE id=?",
                    (now, now + row["ttl_seconds"], work_id),
                )
                row = self._row(c, environment_id, work_id)
            return work_json(row)

    def heartbeat(
        self,
        environment_id: str,
        work_id: str,
        *,
        desired_ttl_seconds: int | None,
        expected_last_heartbeat: str | None,
        holder_generation: int | None,
    ) -> dict[str, Any]:
        with self._db.tx() as c:
            now = self._clock()
            self._expire_leases(c, now)
            row = self._row(c, environment_id, work_id)
            state = row["state"]
            if self._stale(row, holder_generation):
                raise self._precondition_failed(row, expected_last_heartbeat, "the lease belongs to a later delivery")
            if state == "stopped":
                return {
                    "type": "work_heartbeat",
                    "last_heartbeat": row["last_heartbeat"] or "",
                    "lease_extended": False,
                    "state": state,
                    "ttl_seconds": row["ttl_seconds"],
                }
            if state == "queued" and row["delivered_at"] is None:
                raise conflict("work item is queued and has not been delivered by a poll")
            # The SDK documents: no comparison once the item is stopping/stopped.
            if expected_last_heartbeat is not None and state != "stopping":
                actual = row["last_heartbeat"]
                ok = actual is None if expected_last_heartbeat == NO_HEARTBEAT else actual == expected_last_heartbeat
                if not ok:
                    raise self._precondition_failed(row, expected_last_heartbeat, None)
            ttl = row["ttl_seconds"] if desired_ttl_seconds is None else max(MIN_TTL_SECONDS, min(MAX_TTL_SECONDS, desired_ttl_seconds))
            # Strictly increasing, so the value the worker echoes next identifies this beat.
            beat_us = to_us(now)
            if row["latest_heartbeat_at"] is not None:
                beat_us = max(beat_us, to_us(row["latest_heartbeat_at"]) + 1)
            beat_at = beat_us / 1_000_000
            last_heartbeat = rfc3339_us(beat_us)
            new_state = "active" if state in ("queued", "starting") else state
            c.execute(
                "UPDATE work SET state=?, acknowledged_at=COALESCE(acknowledged_at, ?), started_at=COALESCE(started_at, ?),"
                " latest_heartbeat_at=?, last_heartbeat=?, lease_expires_at=?, ttl_seconds=? WHERE id=?",
                (new_state, now, now, beat_at, last_heartbeat, now + ttl, ttl, work_id),
            )
            return {
                "type": "work_heartbeat",
                "last_heartbeat": last_heartbeat,
                "lease_extended": True,
                "state": new_state,
                "ttl_seconds": ttl,
            }

    @staticmethod
    def _precondition_failed(row: sqlite3.Row, expected: str | None, why: str | None) -> ApiError:
        actual = row["last_heartbeat"]
        shown = (expected or "")[:64]
        message = f"Heartbeat precondition failed: expected {shown}, actual was {actual or 'NULL'}"
        if why:
            message += f" ({why})"
        # Shape of the TS SDK's fixture; the Python worker reads error.details.current_state.
        return ApiError(
            412,
            message,
            details={
                "error_code": "heartbeat_precondition_failed",
                "error_visibility": "user_facing",
                "current_state": {
                    "state": row["state"],
                    "last_heartbeat": actual,
                    "lease_updated_at": rfc3339_or_none(row["latest_heartbeat_at"]),
                    "lease_extended": False,
                    "ttl_seconds": row["ttl_seconds"],
                },
            },
        )

    def stop(self, environment_id: str, work_id: str, *, force: bool, holder_generation: int | None) -> dict[str, Any]:
        with self._db.tx() as c:
            now = self._clock()
            self._expire_leases(c, now)
            row = self._row(c, environment_id, work_id)
            if self._stale(row, holder_generation):
                raise conflict("this work item was delivered to another worker")
            state = row["state"]
            if state == "stopped":
                raise conflict("work item is already stopped")
            if force or state == "queued":
                c.execute(
                    "UPDATE work SET state='stopped', stop_requested_at=COALESCE(stop_requested_at, ?), stopped_at=?,"
                    " lease_expires_at=NULL WHERE id=?",
                    (now, now, work_id),
                )
            elif state in ("starting", "active"):
                c.execute("UPDATE work SET state='stopping', stop_requested_at=? WHERE id=?", (now, work_id))
            row = self._row(c, environment_id, work_id)
        self._db.notify()
        return work_json(row)

    def retrieve(self, environment_id: str, work_id: str) -> dict[str, Any]:
        with self._db.tx() as c:
            self._expire_leases(c, self._clock())
            return work_json(self._row(c, environment_id, work_id))

    def update(self, environment_id: str, work_id: str, patch: dict[str, str | None]) -> dict[str, Any]:
        with self._db.tx() as c:
            row = self._row(c, environment_id, work_id)
            metadata: dict[str, str] = json.loads(row["metadata"])
            for k, v in patch.items():
                if v is None:
                    metadata.pop(k, None)
                else:
                    metadata[k] = v
            if len(metadata) > MAX_METADATA_KEYS:
                raise bad_request(f"metadata: at most {MAX_METADATA_KEYS} keys")
            c.execute("UPDATE work SET metadata=? WHERE id=?", (json.dumps(metadata, sort_keys=True), work_id))
            return work_json(self._row(c, environment_id, work_id))

    def page(self, environment_id: str, *, limit: int, page: str | None) -> dict[str, Any]:
        """Newest first; `next_page` is an opaque cursor (the last seq returned)."""
        before = decode_cursor(page) if page else None
        with self._db.tx() as c:
            self._expire_leases(c, self._clock())
            if before is None:
                rows = c.execute(
                    "SELECT * FROM work WHERE environment_id=? ORDER BY seq DESC LIMIT ?", (environment_id, limit + 1)
                ).fetchall()
            else:
                rows = c.execute(
                    "SELECT * FROM work WHERE environment_id=? AND seq < ? ORDER BY seq DESC LIMIT ?",
                    (environment_id, before, limit + 1),
                ).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        return {
            "data": [work_json(r) for r in rows],
            "next_page": encode_cursor(rows[-1]["seq"]) if more and rows else None,
        }

    def stats(self, environment_id: str) -> dict[str, Any]:
        with self._db.tx() as c:
            now = self._clock()
            self._expire_leases(c, now)
            row = c.execute(
                "SELECT SUM(delivered_at IS NULL) AS depth, SUM(delivered_at IS NOT NULL) AS pending,"
                " MIN(created_at) AS oldest FROM work WHERE environment_id=? AND state='queued'",
                (environment_id,),
            ).fetchone()
            workers = c.execute(
                "SELECT COUNT(*) AS n FROM workers WHERE environment_id=? AND last_poll >= ?",
                (environment_id, now - WORKERS_WINDOW_SECONDS),
            ).fetchone()
        return {
            "type": "work_queue_stats",
            "depth": int(row["depth"] or 0),
            "pending": int(row["pending"] or 0),
            "oldest_queued_at": rfc3339_or_none(row["oldest"]),
            "workers_polling": int(workers["n"]),
        }

    def for_session(self, session_id: str) -> list[dict[str, Any]]:
        with self._db.tx() as c:
            self._expire_leases(c, self._clock())
            rows = c.execute("SELECT * FROM work WHERE session_id=? ORDER BY seq", (session_id,)).fetchall()
        return [work_json(r) for r in rows]

    def token_grant(self, token: str) -> TokenGrant | None:
        # Every call a worker makes for an item passes here: read only (no write transaction), the
        # item's state as `_expire_leases` would leave it now (the write itself happens on the next
        # write path; `current` does not change until a poll re-delivers the item).
        now = self._clock()
        with self._db.read() as c:
            row = c.execute(
                "SELECT t.generation AS tgen, w.id, w.session_id, w.environment_id, w.generation, w.state,"
                " w.lease_expires_at FROM tokens t JOIN work w ON w.id = t.work_id WHERE t.token_hash=?",
                (keys.hash_key(token),),
            ).fetchone()
        if row is None:
            return None
        state = row["state"]
        lapsed = row["lease_expires_at"] is not None and row["lease_expires_at"] < now
        if lapsed and state in ("starting", "active"):
            state = "queued"
        elif lapsed and state == "stopping":
            state = "stopped"
        return TokenGrant(
            work_id=row["id"],
            session_id=row["session_id"],
            environment_id=row["environment_id"],
            generation=int(row["tgen"]),
            current=int(row["tgen"]) == int(row["generation"]),
            state=state,
        )
