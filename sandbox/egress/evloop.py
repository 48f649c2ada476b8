"""The egress proxy's event loop: uvloop (libuv, a declared dependency) unless told otherwise.

The proxy's per-request cost is dominated by event-loop turns (accept, wait for the
request, connect, wait for the response, wait for EOF): uvloop runs each turn in C.
``SANDBOX_EGRESS_LOOP=asyncio`` selects the standard library's loop (benchmarks compare
the two in one run; an operator can fall back if uvloop misbehaves on some host: the
manager passes this one variable on to the daemon it starts).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

ENV = "SANDBOX_EGRESS_LOOP"
KINDS = ("uvloop", "asyncio")


def kind(requested: str | None = None) -> str:
    """The loop to use: ``requested``, else $SANDBOX_EGRESS_LOOP, else uvloop when importable."""
    want = (requested or os.environ.get(ENV) or "uvloop").strip().lower()
    if want not in KINDS:
        raise ValueError(f"{ENV}={want!r}: expected one of {', '.join(KINDS)}")
    if want == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            return "asyncio"
    return want


def new_event_loop(requested: str | None = None) -> asyncio.AbstractEventLoop:
    if kind(requested) == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, T], requested: str | None = None) -> T:
    """``asyncio.run`` on the chosen loop."""
    with asyncio.Runner(loop_factory=lambda: new_event_loop(requested)) as runner:
        return runner.run(main)
