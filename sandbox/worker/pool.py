"""Session sandboxes and the warm pool.

One sandbox per session, never shared and never reused by another session.
A new session gets, in order: its own parked sandbox (kept for a grace period
after a control-plane outage or a lost lease, in case the session comes back
to us), a warm pool sandbox, or a freshly created one.

Labels cannot change after a container is created, so a warm sandbox carries
the session label `pool-<id>` (and `org.sandbox.pool`), and the mapping from
that id to the session it serves is kept here, on the worker side, and
logged when it is made. A sandbox created on demand is labelled with its
session directly.

All methods block (they talk to Docker); the worker calls them from threads.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from sandbox.policy import Policy
from sandbox.runtime import Runtime, Sandbox, SandboxError
from sandbox.spec import LABEL_POOL

from .logs import log_event

log = logging.getLogger("sandbox.worker.pool")


@dataclass
class Assignment:
    session_id: str
    sandbox: Sandbox
    source: str  # "pool" | "fresh" | "parked"
    parked_until: float | None = None
    egress_denials_seen: int = 0
    assigned_at: float = field(default_factory=time.monotonic)


class WarmPool:
    """Keeps `size` started, unassigned sandboxes of one policy; refills in the background."""

    def __init__(self, runtime: Runtime, policy: Policy, size: int, *, worker_label: str,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.runtime = runtime
        self.policy = policy
        self.size = max(0, size)
        self.worker_label = worker_label
        self._on_change = on_change
        self._ready: list[Sandbox] = []
        self._creating = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=max(1, min(self.size, 4)), thread_name_prefix="warm-pool")
        self._thread = threading.Thread(target=self._fill_loop, name="warm-pool-filler", daemon=True)
        self.failures = 0

    def start(self) -> None:
        if self.size:
            self._thread.start()

    @property
    def ready(self) -> int:
        with self._lock:
            return len(self._ready)

    def take(self) -> Sandbox | None:
        """A ready sandbox, or None; the pool refills behind it."""
        while True:
            with self._lock:
                if not self._ready:
                    sb = None
                else:
                    sb = self._ready.pop(0)
            self._wake.set()
            if sb is None:
                return None
            if sb.alive:
                self._on_change()
                return sb
            sb.destroy()  # died while waiting (OOM-killed host, engine restart): never hand it out

    def _fill_loop(self) -> None:
        backoff = 1.0
        while not self._closed.is_set():
            with self._lock:
                missing = self.size - len(self._ready) - self._creating
                self._creating += max(0, missing)
            for _ in range(max(0, missing)):
                self._executor.submit(self._create_one)
            self._wake.wait(timeout=5.0 if self.failures == 0 else backoff)
            self._wake.clear()
            backoff = min(30.0, backoff * 2) if self.failures else 1.0

    def _create_one(self) -> None:
        pool_id = f"pool-{secrets.token_hex(6)}"
        sb: Sandbox | None = None
        try:
            if self._closed.is_set():
                return
            sb = self.runtime.create(self.policy, session_id=pool_id, extra_labels={LABEL_POOL: self.worker_label})
            self.failures = 0
        except SandboxError as e:
            self.failures += 1
            log.warning("warm pool could not start a sandbox: %s", e)
        finally:
            with self._lock:
                self._creating -= 1
                if sb is not None and not self._closed.is_set():
                    self._ready.append(sb)
                    sb = None
            if sb is not None:
                sb.destroy()
            self._on_change()

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        self._executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            ready, self._ready = self._ready, []
        for sb in ready:
            sb.destroy()
        self._on_change()


class SessionSandboxes:
    """The worker-side map session -> sandbox, with parking for sessions that may come back."""

    def __init__(self, runtime: Runtime, policy: Policy, pool: WarmPool, *, park_grace: float,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.runtime = runtime
        self.policy = policy
        self.pool = pool
        self.park_grace = park_grace
        self._on_change = on_change
        self._by_session: dict[str, Assignment] = {}
        self._lock = threading.Lock()

    def acquire(self, session_id: str) -> Assignment:
        with self._lock:
            existing = self._by_session.get(session_id)
            if existing is not None and existing.sandbox.alive:
                existing.parked_until = None
                if existing.source != "parked":
                    existing.source = "parked"
                log_event(log, logging.INFO, "sandbox_reused", "reusing the session's parked sandbox",
                          session_id=session_id, container=existing.sandbox.id[:12])
                return existing
            if existing is not None:
                self._by_session.pop(session_id, None)
        if existing is not None:
            existing.sandbox.destroy()
        sb = self.pool.take()
        source = "pool"
        if sb is None:
            sb = self.runtime.create(self.policy, session_id=session_id)
            source = "fresh"
        a = Assignment(session_id=session_id, sandbox=sb, source=source)
        with self._lock:
            self._by_session[session_id] = a
        # The pool label can't be changed to the session; this line is the record of the mapping.
        log_event(log, logging.INFO, "sandbox_assigned", f"sandbox {sb.id[:12]} ({source}) serves the session",
                  session_id=session_id, container=sb.id[:12], sandbox_label=sb.session_id, source=source)
        self._on_change()
        return a

    def get(self, session_id: str) -> Assignment | None:
        with self._lock:
            return self._by_session.get(session_id)

    def release(self, session_id: str, *, park: bool) -> None:
        """The session's work item ended: destroy its sandbox, or park it for `park_grace` seconds."""
        with self._lock:
            a = self._by_session.get(session_id)
            if a is None:
                return
            if park and a.sandbox.alive and self.park_grace > 0:
                a.parked_until = time.monotonic() + self.park_grace
                log_event(log, logging.INFO, "sandbox_parked",
                          f"keeping the sandbox for {self.park_grace:.0f}s in case the session comes back",
                          session_id=session_id, container=a.sandbox.id[:12])
                return
            self._by_session.pop(session_id, None)
        died = None if a.sandbox.alive else (a.sandbox.channel.close_reason or "gone")
        a.sandbox.destroy()
        log_event(log, logging.INFO if died is None else logging.WARNING, "sandbox_destroyed",
                  "session sandbox destroyed" if died is None else f"session sandbox had died: {died}",
                  session_id=session_id, container=a.sandbox.id[:12])
        self._on_change()

    def reap_parked(self) -> list[str]:
        now = time.monotonic()
        with self._lock:
            expired = [a for a in self._by_session.values()
                       if a.parked_until is not None and (a.parked_until <= now or not a.sandbox.alive)]
            for a in expired:
                self._by_session.pop(a.session_id, None)
        for a in expired:
            died = None if a.sandbox.alive else (a.sandbox.channel.close_reason or "gone")
            a.sandbox.destroy()
            log_event(log, logging.INFO if died is None else logging.WARNING, "sandbox_destroyed",
                      "parked sandbox expired" if died is None else f"parked sandbox had died: {died}",
                      session_id=a.session_id, container=a.sandbox.id[:12])
        if expired:
            self._on_change()
        return [a.session_id for a in expired]

    def parked_sessions(self) -> set[str]:
        with self._lock:
            return {s for s, a in self._by_session.items() if a.parked_until is not None}

    def assignments(self) -> list[Assignment]:
        with self._lock:
            return list(self._by_session.values())

    def live_count(self) -> int:
        with self._lock:
            return sum(1 for a in self._by_session.values() if a.sandbox.alive)

    def close(self) -> None:
        with self._lock:
            all_, self._by_session = list(self._by_session.values()), {}
        for a in all_:
            a.sandbox.destroy()
        self._on_change()


def count_egress_denials(runtime: Runtime, a: Assignment) -> int:
    """New proxy denials for this sandbox since the last call (read from the egress audit log)."""
    if not a.sandbox.egress:
        return 0
    try:
        records = runtime.egress.records(session=a.sandbox.session_id, limit=10_000)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - metrics must not break the worker
        return 0
    denied = sum(1 for r in records if r.get("decision") == "deny")
    new = max(0, denied - a.egress_denials_seen)
    a.egress_denials_seen = denied
    return new
