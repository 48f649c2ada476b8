"""Sessions and their event logs.

A session belongs to one environment and owns an append-only event log
(ordered by an internal sequence number; ids are `sevt_...`). Appending an
event that needs the worker (a tool call, a user message) to a session with no
live work item queues a new one: "work items are queued when sessions are
created or when long-dormant sessions receive new messages".
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from .clock import Clock, new_id, rfc3339, rfc3339_us, to_us
from .db import Database
from .errors import bad_request, conflict, not_found
from .events import ACTIVITY_EVENT_TYPES, WAKING_EVENT_TYPES, clean_agent_event, clean_client_event
from .work import WorkQueue, decode_cursor, encode_cursor, validate_metadata_patch

MAX_LIST_LIMIT = 1000
SANDBOX_TOOLS = ("bash", "edit", "read", "write", "glob", "grep")


def default_agent(agent_ref: str | None) -> dict[str, Any]:
    """The agent snapshot a session reports: the sandbox toolset, no MCP, no skills unless the
    session was created with some (skills.py).

    The worker reads `agent.skills` (downloads each, from the skills this
    control plane was given) and `resources` (memory stores: always empty).
    """
    allow = {"type": "always_allow"}
    return {
        "type": "agent",
        "id": agent_ref or "agent_local",
        "name": "local",
        "description": "Stand-in agent of the local control plane; tool calls are injected by the local admin.",
        "version": 1,
        "execution_identity": {"type": "service_account"},
        "mcp_servers": [],
        "model": {"id": "claude-local"},
        "multiagent": None,
        "skills": [],
        "system": None,
        "tools": [
            {
                "type": "agent_toolset_20260401",
                "default_config": {"enabled": True, "permission_policy": allow},
                "configs": [{"type": t, "name": t, "enabled": True, "permission_policy": allow} for t in SANDBOX_TOOLS],
            }
        ],
    }


class Sessions:
    def __init__(self, db: Database, clock: Clock, work: WorkQueue) -> None:
        self._db = db
        self._clock = clock
        self._work = work

    # --------------------------------------------------------------- sessions

    def _row(self, c: sqlite3.Connection, session_id: str) -> sqlite3.Row:
        row: sqlite3.Row | None = c.execute("SELECT * FROM sessions WHERE id=?", (session_id,)).fetchone()
        if row is None:
            raise not_found(f"session {session_id!r} not found")
        return row

    def environment_of(self, session_id: str) -> str | None:
        with self._db.read() as c:
            row = c.execute("SELECT environment_id FROM sessions WHERE id=?", (session_id,)).fetchone()
        return None if row is None else str(row["environment_id"])

    def _json(self, row: sqlite3.Row) -> dict[str, Any]:
        now = self._clock()
        return {
            "type": "session",
            "id": row["id"],
            "environment_id": row["environment_id"],
            "status": row["status"],
            "title": row["title"],
            "metadata": json.loads(row["metadata"]),
            "agent": json.loads(row["agent"]),
            "resources": [],
            "vault_ids": [],
            "outcome_evaluations": [],
            "archived_at": None,
            "created_at": rfc3339(row["created_at"]),
            "updated_at": rfc3339(row["updated_at"]),
            "stats": {"active_seconds": None, "duration_seconds": max(0.0, now - row["created_at"])},
            "usage": {},
        }

    def create(
        self,
        environment_id: str,
        *,
        title: str | None = None,
        metadata: dict[str, str] | None = None,
        agent_ref: str | None = None,
        skills: list[dict[str, str]] | None = None,
    ) -> dict[str, Any]:
        clean_meta = {k: v for k, v in validate_metadata_patch(metadata or {}).items() if v is not None}
        with self._db.tx() as c:
            if c.execute("SELECT 1 FROM environments WHERE id=?", (environment_id,)).fetchone() is None:
                raise not_found(f"environment {environment_id!r} not found")
            now = self._clock()
            session_id = new_id("session")
            # Sessions start idle (BetaManagedAgentsSession.status docs) with an empty log.
            c.execute(
                "INSERT INTO sessions(id, environment_id, status, title, metadata, agent, created_at, updated_at)"
                " VALUES(?, ?, 'idle', ?, ?, ?, ?, ?)",
                (session_id, environment_id, title, json.dumps(clean_meta),
                 json.dumps({**default_agent(agent_ref), "skills": list(skills or [])}), now, now),
            )
            self._work.enqueue(c, environment_id, session_id)
            row = self._row(c, session_id)
        self._db.notify_session(session_id, work=True)
        return self._json(row)

    def retrieve(self, session_id: str) -> dict[str, Any]:
        with self._db.read() as c:
            return self._json(self._row(c, session_id))

    # ----------------------------------------------------------------- events

    def _insert(self, c: sqlite3.Connection, session_id: str, ev: dict[str, Any], ref: str | None) -> dict[str, Any]:
        now_us = to_us(self._clock())
        stamped = {**ev, "id": new_id("sevt"), "processed_at": rfc3339_us(now_us)}
        c.execute(
            "INSERT INTO events(id, session_id, type, processed_us, ref_id, body) VALUES(?, ?, ?, ?, ?, ?)",
            (stamped["id"], session_id, stamped["type"], now_us, ref, json.dumps(stamped)),
        )
        return stamped

    def _set_status(self, c: sqlite3.Connection, session_id: str, status: str) -> None:
        c.execute("UPDATE sessions SET status=?, updated_at=? WHERE id=?", (status, self._clock(), session_id))

    def _event_by_id(self, c: sqlite3.Connection, session_id: str, event_id: str) -> dict[str, Any] | None:
        row = c.execute("SELECT body FROM events WHERE session_id=? AND id=?", (session_id, event_id)).fetchone()
        return None if row is None else json.loads(row["body"])

    def _existing_answer(self, c: sqlite3.Connection, session_id: str, kind: str, ref: str) -> dict[str, Any] | None:
        row = c.execute(
            "SELECT body FROM events WHERE session_id=? AND ref_id=? AND type=? ORDER BY seq LIMIT 1",
            (session_id, ref, kind),
        ).fetchone()
        return None if row is None else json.loads(row["body"])

    def _wake(self, c: sqlite3.Connection, row: sqlite3.Row) -> bool:
        """Queue work for the session unless it has a live item; True when an item was queued."""
        if not self._work.has_live_item(c, row["id"]):
            self._work.enqueue(c, row["environment_id"], row["id"])
            return True
        return False

    def append_client_events(self, session_id: str, raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`POST /v1/sessions/{id}/events`: all-or-nothing, returns the stored events.

        A second result for a tool call that already has one is not stored
        again; the first is returned. The SDK retries a post whose response was
        lost, and a 409 there would be retried until the lease window closes.
        """
        cleaned = [clean_client_event(ev, f"events[{i}]") for i, ev in enumerate(raw)]
        out: list[dict[str, Any]] = []
        with self._db.tx() as c:
            row = self._row(c, session_id)
            if row["status"] == "terminated":
                raise conflict(f"session {session_id!r} is terminated")
            wakes = False
            for i, (ev, ref) in enumerate(cleaned):
                kind = ev["type"]
                if ref is not None:
                    self._check_reference(c, session_id, kind, ref, f"events[{i}]")
                    if kind in ("user.tool_result", "user.custom_tool_result", "user.tool_confirmation"):
                        prior = self._existing_answer(c, session_id, kind, ref)
                        if prior is not None:
                            out.append(prior)
                            continue
                out.append(self._insert(c, session_id, ev, ref))
                wakes = wakes or kind in WAKING_EVENT_TYPES
                if kind == "user.message":
                    self._set_status(c, session_id, "running")
            queued = self._wake(c, row) if wakes else False
        # Long-polls are woken only when work was queued (not on every call of a session already served).
        self._db.notify_session(session_id, work=queued)
        return out

    def _check_reference(self, c: sqlite3.Connection, session_id: str, kind: str, ref: str, where: str) -> None:
        target = self._event_by_id(c, session_id, ref)
        want = "agent.custom_tool_use" if kind == "user.custom_tool_result" else "agent.tool_use"
        if target is None or target.get("type") != want:
            raise bad_request(f"{where}: {ref[:64]!r} is not an {want} event of this session")
        if kind == "user.tool_confirmation" and target.get("evaluated_permission") != "ask":
            raise bad_request(f"{where}: tool call {ref!r} does not await confirmation")
        if kind == "user.tool_result":
            denied = target.get("evaluated_permission") == "deny" or c.execute(
                "SELECT 1 FROM events WHERE session_id=? AND ref_id=? AND type='user.tool_confirmation'"
                " AND json_extract(body, '$.result')='deny' LIMIT 1",
                (session_id, ref),
            ).fetchone()
            if denied:
                raise conflict(f"{where}: tool call {ref!r} was denied and takes no result")

    def append_agent_events(self, session_id: str, raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Local admin: inject what the model / service would emit."""
        cleaned = [clean_agent_event(ev, f"events[{i}]") for i, ev in enumerate(raw)]
        out: list[dict[str, Any]] = []
        with self._db.tx() as c:
            row = self._row(c, session_id)
            status = row["status"]
            if status == "terminated":
                raise conflict(f"session {session_id!r} is terminated")
            wakes = False
            for ev in cleaned:
                kind = ev["type"]
                if status == "terminated":
                    raise conflict("no events may follow session.status_terminated")
                if kind in ACTIVITY_EVENT_TYPES and status != "running":
                    out.append(self._insert(c, session_id, {"type": "session.status_running"}, None))
                    status = "running"
                if kind == "session.status_idle" and ev["stop_reason"]["type"] == "requires_action":
                    ev["stop_reason"].setdefault("event_ids", self._unanswered(c, session_id))
                out.append(self._insert(c, session_id, ev, None))
                wakes = wakes or kind in WAKING_EVENT_TYPES
                status = {
                    "session.status_running": "running",
                    "session.status_idle": "idle",
                    "session.status_terminated": "terminated",
                }.get(kind, status)
            self._set_status(c, session_id, status)
            queued = False
            if status == "terminated":
                self._work.cancel_undelivered(c, session_id)
            elif wakes:
                queued = self._wake(c, row)
        self._db.notify_session(session_id, work=queued)
        return out

    def _unanswered(self, c: sqlite3.Connection, session_id: str) -> list[str]:
        rows = c.execute(
            "SELECT e.id FROM events e WHERE e.session_id=? AND e.type IN ('agent.tool_use','agent.custom_tool_use')"
            " AND NOT EXISTS (SELECT 1 FROM events r WHERE r.session_id=e.session_id AND r.ref_id=e.id"
            " AND r.type IN ('user.tool_result','user.custom_tool_result')) ORDER BY e.seq",
            (session_id,),
        ).fetchall()
        return [str(r["id"]) for r in rows]

    def list_events(
        self,
        session_id: str,
        *,
        limit: int,
        order: str,
        page: str | None,
        types: list[str] | None,
        created_after: tuple[int, bool] | None,
        created_before: tuple[int, bool] | None,
    ) -> dict[str, Any]:
        """One page of the log. Bounds are (epoch microseconds, inclusive)."""
        where = ["session_id=?"]
        args: list[Any] = [session_id]
        if page:
            where.append("seq > ?" if order == "asc" else "seq < ?")
            args.append(decode_cursor(page))
        if types:
            where.append(f"type IN ({','.join('?' * len(types))})")
            args.extend(types)
        if created_after is not None:
            where.append("processed_us >= ?" if created_after[1] else "processed_us > ?")
            args.append(created_after[0])
        if created_before is not None:
            where.append("processed_us <= ?" if created_before[1] else "processed_us < ?")
            args.append(created_before[0])
        sql = f"SELECT seq, body FROM events WHERE {' AND '.join(where)} ORDER BY seq {'ASC' if order == 'asc' else 'DESC'} LIMIT ?"
        args.append(limit + 1)
        with self._db.read() as c:
            self._row(c, session_id)
            rows = c.execute(sql, args).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        return {
            "data": [json.loads(r["body"]) for r in rows],
            "next_page": encode_cursor(rows[-1]["seq"]) if more and rows else None,
        }

    def last_seq(self, session_id: str) -> int:
        with self._db.read() as c:
            self._row(c, session_id)
            row = c.execute("SELECT MAX(seq) AS s FROM events WHERE session_id=?", (session_id,)).fetchone()
        return int(row["s"] or 0)

    def events_after(self, session_id: str, seq: int, limit: int = 500) -> list[tuple[int, dict[str, Any]]]:
        return [(s, json.loads(body)) for s, _kind, body in self.raw_events_after(session_id, seq, limit)]

    def raw_events_after(self, session_id: str, seq: int, limit: int = 500) -> list[tuple[int, str, str]]:
        """(seq, type, stored JSON text) of the events after `seq`: the stream frames them unparsed."""
        with self._db.read() as c:
            rows = c.execute(
                "SELECT seq, type, body FROM events WHERE session_id=? AND seq > ? ORDER BY seq LIMIT ?",
                (session_id, seq, limit),
            ).fetchall()
        return [(int(r[0]), str(r[1]), str(r[2])) for r in rows]

    def terminal_event(self, session_id: str) -> dict[str, Any] | None:
        """The `session.status_terminated` event, if the session has ended."""
        with self._db.read() as c:
            row = c.execute(
                "SELECT body FROM events WHERE session_id=? AND type='session.status_terminated' ORDER BY seq DESC LIMIT 1",
                (session_id,),
            ).fetchone()
        return None if row is None else json.loads(row["body"])
