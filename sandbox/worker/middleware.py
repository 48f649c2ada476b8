"""What the worker adds to the SDK's requests, as a client middleware.

The SDK drives the protocol; this middleware (the SDK's public `middleware=`
client option, inherited by every scoped sub-client the SDK makes) sees each
HTTP attempt and adds what is ours:

- outbox: a `POST /v1/sessions/{id}/events` carrying `user.tool_result`s that
  the control plane accepted (2xx) marks those results delivered (applied by
  the journal's next write, so the loop does no file I/O here);
- circuit breaker: after repeated connection failures / 5xx the breaker opens
  and requests fail fast (as a connection error, which the SDK's loops already
  back off on) until a probe gets through. Heartbeats and stops bypass it:
  they are few and lease-critical;
- lease TTL: heartbeats ask for `desired_ttl_seconds` (the SDK sends none), so
  a crashed worker's lease lapses in seconds, not the server default;
- fencing: after a 412 on a heartbeat the lease belongs to someone else, so no
  further result for that session is posted by us until we claim it again
  (the result stays in the outbox and is replayed by whoever serves it);
- hand back: on shutdown the SDK's final force-stop of an item we are handing
  back is answered locally, so the item's lease lapses and the queue
  re-delivers it instead of stopping it;
- metrics: heartbeat failures by reason, results posted.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import httpx2
from anthropic import APIConnectionError, APIStatusError
from anthropic._middleware import AsyncCallNext, Middleware
from anthropic._request import APIRequest
from anthropic.types.beta.environments import BetaSelfHostedWork

from .logs import log_event
from .metrics import WorkerMetrics
from .outbox import Outbox

log = logging.getLogger("sandbox.worker.middleware")

_WORK_RE = re.compile(r"^/v1/environments/[^/]+/work/(?P<work>[^/]+)/(?P<op>heartbeat|stop|ack)$")
_EVENTS_RE = re.compile(r"^/v1/sessions/(?P<sid>[^/]+)/events$")


class CircuitBreaker:
    """Closed -> (threshold consecutive failures) -> open -> (cooldown) -> half-open probe -> closed/open."""

    def __init__(self, threshold: int = 5, base_cooldown: float = 0.5, max_cooldown: float = 5.0,
                 on_change: Callable[[bool, str], None] = lambda _open, _by: None) -> None:
        self.threshold = threshold
        self.base_cooldown = base_cooldown
        self.max_cooldown = max_cooldown
        self._on_change = on_change
        self.failures = 0
        self.open = False
        self._cooldown = base_cooldown
        self._open_until = 0.0
        self._probe_started: float | None = None
        self.opened_at: float | None = None

    def allow(self) -> bool:
        if not self.open:
            return True
        now = time.monotonic()
        if now < self._open_until:
            return False
        # Half-open: one probe at a time; a probe stuck longer than the max cooldown frees the slot.
        if self._probe_started is not None and now - self._probe_started < self.max_cooldown:
            return False
        self._probe_started = now
        return True

    def success(self, source: str = "") -> None:
        """`source` names the kind of request that got through (the poller restarts unless it was a poll)."""
        self.failures = 0
        self._probe_started = None
        if self.open:
            self.open = False
            self.opened_at = None
            self._cooldown = self.base_cooldown
            log_event(log, logging.INFO, "circuit_closed", "control plane reachable again; circuit closed")
            self._on_change(False, source)

    def failure(self) -> None:
        self.failures += 1
        now = time.monotonic()
        if self.open:
            if self._probe_started is not None:
                self._probe_started = None
                self._cooldown = min(self.max_cooldown, self._cooldown * 2)
                self._open_until = now + self._cooldown
            return
        if self.failures >= self.threshold:
            self.open = True
            self.opened_at = now
            self._open_until = now + self._cooldown
            log_event(log, logging.WARNING, "circuit_open",
                      f"control plane unreachable ({self.failures} failures in a row); circuit open")
            self._on_change(True, "")


@dataclass
class LeaseView:
    """What this worker last heard about one work item's lease."""

    session_id: str
    last: str = "none"  # none | ok | precondition | transient | rejected
    last_ok_at: float | None = None
    handed_back: bool = False


@dataclass
class WorkerMiddleware(Middleware):
    outbox: Outbox
    breaker: CircuitBreaker
    metrics: WorkerMetrics
    lease_ttl: int | None = None
    leases: dict[str, LeaseView] = field(default_factory=dict)
    fenced_sessions: set[str] = field(default_factory=set)

    # -- registry the worker maintains

    def track(self, work_id: str, session_id: str) -> LeaseView:
        view = self.leases[work_id] = LeaseView(session_id)
        self.fenced_sessions.discard(session_id)  # we hold this session's lease again
        return view

    def forget(self, work_id: str) -> None:
        self.leases.pop(work_id, None)

    def hand_back(self, work_id: str) -> None:
        view = self.leases.get(work_id)
        if view is not None:
            view.handed_back = True

    # -- the middleware

    async def handle_async(self, request: APIRequest, call_next: AsyncCallNext) -> Any:
        path = request.url.split("?", 1)[0]
        m = _WORK_RE.match(path)
        op = m.group("op") if m else None
        work_id = m.group("work") if m else None
        events = _EVENTS_RE.match(path) if request.method.lower() == "post" else None

        if op == "heartbeat" and self.lease_ttl:
            params = dict(request.query_params or {})
            params.setdefault("desired_ttl_seconds", self.lease_ttl)
            request = request.copy(params=params)
        if op == "stop" and work_id is not None:
            view = self.leases.get(work_id)
            if view is not None and view.handed_back:
                log_event(log, logging.INFO, "handed_back", "work item handed back: not stopped, its lease will lapse",
                          work_id=work_id, session_id=view.session_id)
                self.metrics.handed_back.inc()
                return BetaSelfHostedWork.model_construct(id=work_id, type="work", state="active")
        result_ids = self._result_ids(request) if events else []
        if events is not None and result_ids and events.group("sid") in self.fenced_sessions:
            raise _fenced_error(request, events.group("sid"))

        bypass = op in ("heartbeat", "stop")
        if not bypass and not self.breaker.allow():
            raise APIConnectionError(message="control plane circuit open; not sending", request=_httpx_request(request))
        try:
            response = await call_next(request)
        except (APIConnectionError, httpx2.HTTPError) as e:
            self.breaker.failure()
            if op == "heartbeat" and work_id is not None:
                self._heartbeat_failed(work_id, "transient")
            raise e
        status = response.status_code
        if status >= 500:
            self.breaker.failure()
        else:
            self.breaker.success(source=op or ("poll" if path.endswith("/work/poll") else "other"))
        if op == "heartbeat" and work_id is not None:
            if 200 <= status < 300:
                view = self.leases.get(work_id)
                if view is not None:
                    view.last, view.last_ok_at = "ok", time.monotonic()
            elif status == 412:
                self._heartbeat_failed(work_id, "precondition")
            elif status in (408, 409, 429) or status >= 500:
                self._heartbeat_failed(work_id, "transient")
            else:
                self._heartbeat_failed(work_id, "rejected")
        if events is not None and result_ids and 200 <= status < 300:
            # Marked in the journal by its next write (no thread trip per result on the loop): outbox.py.
            self.outbox.delivered_later(result_ids)
            self.metrics.results_posted.inc(len(result_ids))
        return response

    def _heartbeat_failed(self, work_id: str, reason: str) -> None:
        self.metrics.heartbeat_failures.labels(reason=reason).inc()
        view = self.leases.get(work_id)
        if view is None:
            return
        view.last = reason
        if reason == "precondition":
            # The lease is someone else's: post nothing more for this session until we hold it again.
            self.fenced_sessions.add(view.session_id)
            log_event(log, logging.WARNING, "lease_lost",
                      "heartbeat precondition failed (412): the lease is someone else's; results are held",
                      work_id=work_id, session_id=view.session_id)

    @staticmethod
    def _result_ids(request: APIRequest) -> list[str]:
        body = request.json
        if not isinstance(body, dict):
            return []
        events = body.get("events")
        if not isinstance(events, list):
            return []
        return [ev["tool_use_id"] for ev in events
                if isinstance(ev, dict) and ev.get("type") == "user.tool_result" and isinstance(ev.get("tool_use_id"), str)]


def _httpx_request(request: APIRequest) -> httpx2.Request:
    return httpx2.Request(request.method.upper(), "http://control-plane" + request.url.split("?", 1)[0])


class LeaseFenced(APIStatusError):
    """Raised instead of posting a result after this worker lost the lease (a 412: not retried)."""


def _fenced_error(request: APIRequest, session_id: str) -> LeaseFenced:
    req = _httpx_request(request)
    resp = httpx2.Response(412, request=req)
    return LeaseFenced(
        f"not posting: this worker lost the lease of session {session_id}; the result is kept in the outbox",
        response=resp, body=None,
    )
