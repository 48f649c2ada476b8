"""Server-sent events for `GET /v1/sessions/{id}/events/stream`.

Frames are `event: <type>\\ndata: <json>\\n\\n`, the format the SDK's SSE decoder
reads. The stream carries events created after the connection opened (history
is what `GET .../events` is for; the SDK runner opens the stream first and then
lists, so nothing falls in between), a `ping` every `ping_interval` seconds so
idle connections are kept alive and dead ones get noticed, and ends cleanly
after `session.status_terminated`. A stream opened on an already terminated
session replays that one event and ends: the SDK runner stops only on a
streamed termination.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from .db import Database
from .sessions import Sessions

TERMINAL_EVENT_TYPES = frozenset({"session.status_terminated", "session.deleted"})
BATCH = 500  # events per query
PING_FRAME = b'event: ping\ndata: {"type": "ping"}\n\n'


def frame(event: dict[str, Any]) -> bytes:
    # json.dumps escapes control characters, so `data` is always one line.
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n".encode("utf-8")


def raw_frame(kind: str, body: str) -> bytes:
    """A stored event as a frame, its JSON text as stored (written by json.dumps: one line)."""
    return f"event: {kind}\ndata: {body}\n\n".encode("utf-8")


class SessionEventStream:
    def __init__(self, db: Database, sessions: Sessions, session_id: str, ping_interval: float) -> None:
        self._db = db
        self._sessions = sessions
        self._session_id = session_id
        self._ping_interval = ping_interval
        # Taken when the request is accepted, before the response starts, so an
        # event appended while headers are in flight is still delivered.
        self._last_seq = sessions.last_seq(session_id)
        self._terminal = sessions.terminal_event(session_id)

    def frames(self) -> Iterator[bytes]:
        if self._terminal is not None:
            yield frame(self._terminal)
            return
        next_ping = time.monotonic() + self._ping_interval
        # Woken only by this session's events (db.notify_session), not by every write of every session.
        # Queried again only after a notification: all writes happen under the lock, so what one query
        # returned is everything up to the version read with it (unless the batch was cut at its limit).
        seen = -2
        with self._db.session_condition(self._session_id) as changed:
            while True:
                batch: list[tuple[int, str, str]] = []
                with self._db.lock:
                    while True:
                        if self._db.closing:
                            return
                        version = self._db.session_version(self._session_id)
                        if version != seen:
                            batch = self._sessions.raw_events_after(self._session_id, self._last_seq, BATCH)
                            seen = version if len(batch) < BATCH else -2
                        now = time.monotonic()
                        if batch or now >= next_ping:
                            break
                        changed.wait(next_ping - now)
                # Write outside the lock: a slow client must not stall the server.
                if not batch:
                    yield PING_FRAME
                    next_ping = time.monotonic() + self._ping_interval
                    continue
                for seq, kind, body in batch:
                    self._last_seq = seq
                    yield raw_frame(kind, body)
                    if kind in TERMINAL_EVENT_TYPES:
                        return
