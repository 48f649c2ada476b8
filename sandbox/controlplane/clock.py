"""Time and identifiers in the wire format.

Time is injectable (a `Clock` returns epoch seconds) so lease expiry can be
tested without sleeping through a real TTL; everything the server stamps goes
through one clock. Timestamps are RFC 3339 UTC with microseconds, which also
makes successive heartbeats distinguishable for the optimistic-concurrency echo.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from datetime import datetime, timezone

Clock = Callable[[], float]

system_clock: Clock = time.time


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def rfc3339_or_none(ts: float | None) -> str | None:
    return None if ts is None else rfc3339(ts)


def parse_rfc3339(text: str) -> float:
    """Parse an RFC 3339 timestamp (`Z` or offset; naive means UTC). Raises ValueError."""
    s = text.strip()
    if s.endswith(("Z", "z")):
        s = s[:-1] + "+00:00"
    dt = datetime.fromisoformat(s)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def new_id(prefix: str) -> str:
    """`<prefix>_<24 hex>`; random, so ids are not guessable across sessions."""
    return f"{prefix}_{secrets.token_hex(12)}"
