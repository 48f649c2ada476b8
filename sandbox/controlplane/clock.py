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


def to_us(ts: float) -> int:
    """Epoch seconds -> integer microseconds, the resolution of every timestamp we emit."""
    return round(ts * 1_000_000)


def rfc3339_us(us: int) -> str:
    secs, micros = divmod(us, 1_000_000)
    dt = datetime.fromtimestamp(secs, tz=timezone.utc).replace(microsecond=micros)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def rfc3339(ts: float) -> str:
    return rfc3339_us(to_us(ts))


def rfc3339_or_none(ts: float | None) -> str | None:
    return None if ts is None else rfc3339(ts)


def parse_rfc3339_us(text: str) -> int:
    """Parse an RFC 3339 timestamp (`Z` or offset; naive means UTC) to epoch microseconds. Raises ValueError."""
    s = text.strip()
    if s.endswith(("Z", "z")):
        s = s[:-1] + "+00:00"
    dt = datetime.fromisoformat(s)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    # Exact integer arithmetic: float seconds would make `gt`/`gte` on an
    # echoed processed_at ambiguous.
    delta = dt - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def new_id(prefix: str) -> str:
    """`<prefix>_<24 hex>`; random, so ids are not guessable across sessions."""
    return f"{prefix}_{secrets.token_hex(12)}"
