"""The environment worker: the SDK's poller and per-item flow, our sandboxes.

Protocol work is the official SDK's: its generated `work.poll` / `work.ack`
claim items (as its `poller()` does, without its 1-3 s sleep after each empty
long-poll: see `_claims`); `EnvironmentWorker.handle_item()` serves one item
(heartbeats the lease with the optimistic echo, fetches the session, runs the
`SessionToolRunner` - stream, reconcile, dedupe by event id, fail-closed
permission gating, unowned tools left pending - and force-stops the item
unless the lease was lost). What this module adds:

- concurrency: up to `max_sessions` items at once (the SDK's `run()` serves
  one at a time), each gated by admission control before it is claimed;
- a session's files for its whole life: a workspace in the session store
  (store.py), shared by the workers using it; a sandbox per run over that
  workspace (warm pool, parked, or fresh), stopped when the run ends (kept a
  while after an outage, or with `keep_idle`), re-created when work arrives;
  one run per session at a time across workers (the store's run lock); the
  entry removed when the session ends or its retention expires;
- the journal of calls (outbox.py, in the store, shared): a call whose worker
  died is answered "interrupted", never re-run; a sweeper for results nobody
  will replay;
- one audit trail per session across all its runs (reopened, chain continued);
- lifecycle: exclusive state directory, reaping sandboxes of a crashed
  worker, SIGTERM drain with a bound then hand-back, metrics and health.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import json
import logging
import os
import random
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import anyio
from anthropic import AsyncAnthropic
from anthropic.lib.environments import EnvironmentWorker
from anthropic.lib._retry import TRANSIENT_ERRORS, is_fatal_status_error
from anthropic.lib.environments._poller import POLL_BLOCK_MS
from anthropic.lib.tools.agent_toolset import AgentToolContext

from sandbox.audit.selftest import SelfTestFailed
from sandbox.audit.trail import AuditTrail
from sandbox.policy import Policy, load_policy
from sandbox.runtime import Runtime, owner_token

from . import logs
from .admission import Admission
from .checkpoints import Checkpoints
from .credentials import EnvironmentKey
from .logs import log_event
from .metrics import HealthServer, WorkerMetrics
from .middleware import CircuitBreaker, WorkerMiddleware
from .journal import Journal, open_journal
from .pool import (SessionSandboxes, WarmPool, admission_for, count_egress_denials, open_runtime,
                   startup_canaries, uses_host_workspaces)
from .store import DEFAULT_RETENTION_S, RunLock, SessionStore, StoreError
from .toolctx import open_telemetry_option
from .tools import SessionSlot, SessionToolbox

log = logging.getLogger("sandbox.worker")

OWNER_KIND = "worker"
ARCHIVE_CONCURRENCY = 2  # (CKPT) periodic workspace archives running at once, worker-wide
LOOP_BEAT_S = 1.0  # the event loop stamps a heartbeat this often; /healthz reports its age (a probe's stall check)


class WorkerError(Exception):
    """The worker cannot start (state directory busy, bad policy, ...)."""


@dataclass
class WorkerConfig:
    base_url: str
    environment_id: str
    state_dir: Path
    profile: str = "worker"
    max_sessions: int = 4
    warm: int = 0
    metrics_port: int | None = None  # None: no endpoint; 0: any free port
    metrics_host: str = "127.0.0.1"  # (CKPT) another address only when asked (a cluster's Prometheus scrapes pod IPs)
    max_idle: float | None = 60.0  # the SDK runner's idle stop after the session's turn ends
    lease_ttl: int | None = 30  # desired_ttl_seconds asked for on each heartbeat
    drain_timeout: float = 20.0  # SIGTERM: how long in-flight tool calls may take to finish
    park_grace: float = 120.0  # keep a session's sandbox this long after an outage / lost lease
    sweep_after: float = 60.0  # a stored result nobody replayed after this long is delivered by the sweeper
    worker_id: str | None = None
    admission: Admission | None = None  # tests inject one with a fake probe
    outbox_sync: str = "NORMAL"
    journal: str = "auto"  # the call journal's form: sqlite, files (a store on a network filesystem), auto
    selftest: bool = True  # attack canaries in a sandbox of the policy before serving (fail closed)
    store_dir: Path | None = None  # the session store, shared by workers; default <state_dir>/sessions
    retention_s: float = DEFAULT_RETENTION_S  # a session's workspace is kept this long after its last activity
    keep_idle: float = 0.0  # keep a session's sandbox this long after its run went idle (0: stop it, free memory)
    store_sweep_s: float = 60.0  # how often ended and expired sessions are looked for in the store
    run_lock_wait: float = 60.0  # how long a new run waits for the previous run of its session (another worker)
    # The embedded control plane's state dir: while it is unreachable, re-read its endpoint.json and follow
    # it if it came back elsewhere.
    endpoint_dir: Path | None = None
    ca_file: Path | None = None  # trust this CA bundle (PEM) for an https control plane, instead of the system's
    skills_mb: int = 64  # a run's skills (extracted archives) live in a tmpfs this big ...
    skills_inodes: int = 4096  # ... with at most this many files and directories
    checkpoints: int = 5  # checkpoints kept per session when a run goes idle (0: none)
    checkpoint_bytes: int = 1 << 30  # distinct bytes of checkpoint data per session
    archive_interval: float = 60.0  # (CKPT) cluster: a live sandbox's workspace archived this often during a run (0: off)
    extra: dict[str, Any] = field(default_factory=dict)
    # Where sandboxes come from: docker | kubernetes (None: $SANDBOX_BACKEND, else docker); see pool.open_runtime.
    backend: str | None = None


@dataclass
class _Serving:
    slot: SessionSlot
    scope: anyio.CancelScope
    done: anyio.Event
    run_lock: RunLock | None = None


class Worker:
    def __init__(self, config: WorkerConfig, key: EnvironmentKey, *, runtime: Runtime | None = None) -> None:
        self.config = config
        self._key = key
        logs.secrets.add(key.value)
        self.worker_id = config.worker_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:12]}"
        self.metrics = WorkerMetrics()
        self._runtime = runtime
        self._lock_file: IO[bytes] | None = None
        self._serving: dict[str, _Serving] = {}
        self._skills_placed: dict[str, anyio.Event] = {}  # cluster: the SDK has put a run's skills in place
        # Session id -> (done, [has skills]): the lookup started as soon as the item was polled (_claims).
        self._skills_lookups: dict[str, tuple[anyio.Event, list[bool]]] = {}
        self._stopping = anyio.Event()
        self._draining = False
        self.started = anyio.Event()
        self._slots = anyio.Semaphore(max(1, config.max_sessions))
        self._sandbox_limiter = anyio.CapacityLimiter(max(8, config.max_sessions * 2 + 4))
        self._db_limiter = anyio.CapacityLimiter(8)
        self.health_port: int | None = None
        self.policy: Policy | None = None
        self.pool: WarmPool | None = None
        self.sandboxes: SessionSandboxes | None = None
        self.outbox: Journal | None = None
        self.store: SessionStore | None = None
        self.middleware: WorkerMiddleware | None = None
        self.client: AsyncAnthropic | None = None
        self._sdk_worker: EnvironmentWorker | None = None
        self._sdk_kwargs: dict[str, Any] = {}
        self._health: HealthServer | None = None
        self._last_admission: str = ""
        self._loop_beat: float | None = None  # monotonic time the event loop last ran `_beat`
        self._outbox_pending = 0
        self.fatal_error: str | None = None
        self.startup_error: BaseException | None = None  # why run() could not start serving
        self._poll_restart = anyio.Event()

    # ------------------------------------------------------------------ public

    def request_stop(self) -> None:
        """Finish or hand back in-flight work, then return from `run()` (thread-safe via from_thread)."""
        self._stopping.set()

    async def run(self) -> None:
        try:
            self._setup()
        except BaseException as e:
            self.startup_error = e
            self.started.set()  # wake whoever waits for startup; the exception says why
            with anyio.CancelScope(shield=True):
                await self._teardown()
            raise
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._housekeeping)
                tg.start_soon(self._beat)
                tg.start_soon(self._archive_loop)  # (CKPT) periodic workspace archives of cluster sandboxes
                self.started.set()
                log_event(log, logging.INFO, "worker_started", "worker started", worker_id=self.worker_id,
                          environment_id=self.config.environment_id, base_url=self.config.base_url,
                          profile=self.config.profile, max_sessions=self.config.max_sessions, warm=self.config.warm,
                          key_source=self._key.source, health_port=self.health_port)
                async with anyio.create_task_group() as serve_tg:
                    poll_scope = anyio.CancelScope()
                    serve_tg.start_soon(self._poll_loop, serve_tg, poll_scope)
                    await self._stopping.wait()
                    poll_scope.cancel()
                    await self._drain()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._teardown()

    @property
    def sessions_in_flight(self) -> int:
        return len(self._serving)

    def health(self) -> dict[str, Any]:
        breaker = self.middleware.breaker if self.middleware else None
        at_limit = len(self._serving) >= self.config.max_sessions
        reasons = [r for r, on in (("circuit_open", bool(breaker and breaker.open)),
                                   ("at_session_limit", at_limit)) if on]
        status = "stopping" if self._draining else ("degraded" if reasons else "ok")
        return {
            "status": status,
            "reasons": reasons,
            "worker_id": self.worker_id,
            "sessions": len(self._serving),
            "max_sessions": self.config.max_sessions,
            "pool_ready": self.pool.ready if self.pool else 0,
            "outbox_pending": self._outbox_pending,
            "circuit_open": bool(breaker and breaker.open),
            "admission": self._last_admission or "ok",
            # Seconds since the event loop last ran (the health server answers from its own thread, so a
            # loop stuck in a blocking call would otherwise look alive): about LOOP_BEAT_S at most when well.
            "loop_beat_age_s": (round(time.monotonic() - self._loop_beat, 2) if self._loop_beat is not None
                                else None),
        }

    # ------------------------------------------------------------------ setup / teardown

    def _setup(self) -> None:
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._take_lock()
        try:
            self.policy = load_policy(cfg.profile)
        except Exception as e:  # noqa: BLE001 - PolicyError and friends
            raise WorkerError(f"cannot load policy {cfg.profile!r}: {e}") from None
        # Unique per worker instance (two workers may share a process in tests and benches).
        owner = f"{owner_token(OWNER_KIND)}:{uuid.uuid4().hex[:8]}"
        store = self.store = SessionStore(cfg.store_dir or cfg.state_dir / "sessions", retention_s=cfg.retention_s,
                                          host_workspaces=uses_host_workspaces(self._runtime, cfg.backend))
        store.register_owner(owner)
        try:  # SQLite on a local filesystem, plain files on a shared network one (journal.py)
            self.outbox = open_journal(store, owner, requested=cfg.journal, synchronous=cfg.outbox_sync,
                                       alive=store.owner_alive)
        except (StoreError, OSError) as e:
            raise WorkerError(f"the session store at {store.root} has no usable call journal: {e}") from None
        if self.outbox.kind == "files" and store.host_workspaces:
            # The store is shared by several hosts: an ext4 image in it mounted by two kernels at once would
            # be corrupted, so each sandbox keeps its own capped workspace and the store keeps its archive,
            # as on a cluster (pool.py: save_workspace / restore_workspace).
            store.host_workspaces = False
            log_event(log, logging.INFO, "workspaces_archived", "the session store is shared by hosts (file "
                      "journal): workspaces are kept as archives between a session's sandboxes", store=str(store.root))
        try:
            store.self_check()  # size-capped workspaces need loop mounts (root, e2fsprogs): fail closed
        except (StoreError, OSError) as e:
            raise WorkerError(f"the session store at {store.root} cannot make size-capped workspaces: {e}") from None
        recovered = self.outbox.recover()
        if recovered:
            log_event(log, logging.WARNING, "outbox_recovered",
                      f"{recovered} tool call(s) were running when the previous worker stopped; "
                      "they will be answered as interrupted, not run again", count=recovered)
        if self._runtime is None:
            self._runtime = open_runtime(cfg.backend, state_dir=cfg.state_dir / "runtime", owner_kind=OWNER_KIND)
        reaped = self._runtime.gc(owner_kind=OWNER_KIND)
        if reaped:
            log_event(log, logging.WARNING, "reaped", f"removed {len(reaped)} sandbox(es) left by a crashed worker",
                      containers=reaped)
        if cfg.selftest:
            # Fail closed: a host that looks right but lets a canary attack through serves nothing.
            try:
                rows = startup_canaries(self._runtime, self.policy)
            except SelfTestFailed as e:
                raise WorkerError(f"refusing to serve: {e}") from None
            log_event(log, logging.INFO, "selftest_passed", f"{len(rows)} attack canaries held", profile=cfg.profile)
        self.pool = WarmPool(self._runtime, self.policy, cfg.warm, worker_label=self.worker_id, store=store,
                             on_change=self._update_gauges)
        self.sandboxes = SessionSandboxes(self._runtime, self.policy, self.pool, park_grace=cfg.park_grace,
                                          store=store, worker_id=self.worker_id, on_change=self._update_gauges)
        self.pool.start()
        breaker = CircuitBreaker(on_change=self._circuit_changed)
        self.middleware = WorkerMiddleware(self.outbox, breaker, self.metrics, lease_ttl=cfg.lease_ttl)
        # The root client only carries configuration: the SDK derives Bearer-only sub-clients from it
        # (environment key for polling, the per-item sessions token for the item's calls).
        from sandbox.controlplane.tls import sdk_http_client  # verification stays on; only the trusted CA changes

        self.client = AsyncAnthropic(
            base_url=cfg.base_url, auth_token=self._key.value, api_key=None, max_retries=2,
            http_client=sdk_http_client(cfg.ca_file),
            middleware=[self.middleware], open_telemetry=open_telemetry_option(),  # type: ignore[arg-type]
        )
        workdir = cfg.state_dir / "sdk-workdir"
        workdir.mkdir(exist_ok=True, mode=0o700)
        self._sdk_kwargs = dict(
            client=self.client, environment_id=cfg.environment_id, environment_key=self._key.value,
            tools=self._tools_for, workdir=workdir, max_idle=cfg.max_idle,
            # Memory stores would be mounted on this host, not in the sandbox: off.
            memory_sync_interval=None, worker_id=self.worker_id,
        )
        self._sdk_worker = EnvironmentWorker(**self._sdk_kwargs)
        if self.config.admission is None:
            # Free disk is counted where workspaces (or their archives) are kept: the session store, which
            # may be another filesystem than the state dir (--session-store; a shared volume on a cluster).
            self.config.admission = admission_for(self._runtime, self.policy, store.root)
        if cfg.metrics_port is not None:
            self._health = HealthServer(self.metrics, self.health, cfg.metrics_port, host=cfg.metrics_host)
            self._health.start()
            self.health_port = self._health.port
        self._update_gauges()

    def _circuit_changed(self, is_open: bool, source: str) -> None:
        self.metrics.circuit_open.set(1 if is_open else 0)
        if not is_open and source != "poll":
            # The SDK poller may be deep in its exponential back-off (up to 60 s): start a fresh one.
            self._poll_restart.set()

    async def _teardown(self) -> None:
        def blocking() -> None:
            if self.sandboxes is not None:
                self.sandboxes.close()
            if self.pool is not None:
                self.pool.close()
        await anyio.to_thread.run_sync(blocking)
        if self.client is not None:
            await self.client.close()
        if self._health is not None:
            self._health.stop()
        if self.outbox is not None:
            self.outbox.close()
        if self.store is not None:
            self.store.close()
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None
        log_event(log, logging.INFO, "worker_stopped", "worker stopped; its sandboxes are destroyed")

    def _take_lock(self) -> None:
        fd = os.open(self.config.state_dir / "worker.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        f = os.fdopen(fd, "r+b")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise WorkerError(f"another worker is using {self.config.state_dir} (one worker per state directory: "
                              "its outbox must have a single writer)") from None
        self._lock_file = f

    # ------------------------------------------------------------------ claiming

    async def _poll_loop(self, tg: anyio.abc.TaskGroup, scope: anyio.CancelScope) -> None:
        assert self.client is not None
        backoff = 1.0
        with scope:
            while True:
                poller = self._claims(tg)
                try:
                    while True:
                        await self._slots.acquire()
                        try:
                            await self._wait_for_headroom()
                            item = await self._next_item(poller)
                        except BaseException:
                            self._slots.release()
                            raise
                        if item is None:  # the circuit closed: replace the backed-off poller
                            self._slots.release()
                            break
                        backoff = 1.0
                        self.metrics.work_claimed.inc()
                        tg.start_soon(self._serve, item)
                except Exception as e:  # noqa: BLE001 - a malformed poll response, or a fatal 4xx
                    status = getattr(_first_cause(e), "status_code", None)
                    if status in (401, 403):
                        self.fatal_error = f"the control plane refused the environment key ({status}): {_describe(e)}"
                        log_event(log, logging.CRITICAL, "poll_refused", self.fatal_error)
                        self._stopping.set()
                        return
                    self.metrics.work_failed.labels(reason="poll").inc()
                    log_event(log, logging.ERROR, "poll_failed",
                              f"polling failed: {_describe(e)}; retrying in {backoff:.0f}s")
                    await anyio.sleep(backoff)
                    backoff = min(60.0, backoff * 2)
                finally:
                    with anyio.CancelScope(shield=True):
                        await poller.aclose()

    async def _claims(self, tg: anyio.abc.TaskGroup | None = None) -> Any:
        """Claimed (polled and acked) work items, through the SDK's generated `work.poll` / `work.ack`.

        The SDK's `poller()` sleeps a jittered 1-3 s after every empty long-poll, so a session created
        while the worker is idle waited up to 3 s (about 1 s on average) before its first claim. Here the
        long-poll itself is the wait: an empty poll is followed by the next at once, unless the server
        answered without blocking (then the SDK's idle sleep, so a server that ignores `block_ms` is not
        hammered). Errors propagate to `_poll_loop`, which backs off (and stops on 401/403).

        With `tg`, the session GET that tells whether a polled session has skills starts in it at once,
        alongside the ack (each is a round trip to the control plane on the way to the first call)."""
        assert self.client is not None
        work = self.client.beta.environments.work
        env_id = self.config.environment_id
        attempt = 0
        while True:
            asked = time.monotonic()
            item = None
            try:
                item = await work.poll(env_id, block_ms=POLL_BLOCK_MS, anthropic_worker_id=self.worker_id)
                if item is not None:
                    if tg is not None:
                        self._look_up_skills_early(tg, item)
                    await work.ack(item.id, environment_id=env_id)
            except TRANSIENT_ERRORS as e:
                if item is not None:
                    self._skills_lookups.pop(str(getattr(getattr(item, "data", None), "id", "")), None)
                if is_fatal_status_error(e):
                    if item is None:
                        raise  # the poll itself: _poll_loop decides (a refused key stops the worker)
                    # As the SDK's poller: an item whose ack fails for good is force-stopped.
                    log_event(log, logging.ERROR, "ack_failed", f"ack refused: {_describe(e)}; stopping the item",
                              work_id=item.id)
                    await self._force_stop(item.id, env_id)
                    continue
                # As the SDK's poller: jittered exponential back-off (a closing circuit restarts us early).
                attempt += 1
                wait = min(60.0, 2.0 ** attempt) + random.uniform(0.0, 1.0)
                log_event(log, logging.WARNING, "poll_retry", f"poll/ack failed: {_describe(e)}; retrying in "
                          f"{wait:.1f}s", attempt=attempt)
                await anyio.sleep(wait)
                continue
            attempt = 0
            if item is None:
                if time.monotonic() - asked < 0.5:
                    await anyio.sleep(random.uniform(1.0, 3.0))
                continue
            yield item

    def _look_up_skills_early(self, tg: anyio.abc.TaskGroup, item: Any) -> None:
        data = getattr(item, "data", None)
        session_id = getattr(data, "id", None)
        if getattr(data, "type", None) != "session" or not isinstance(session_id, str) or not session_id \
                or session_id in self._skills_lookups:
            return
        done, answer = anyio.Event(), [True]
        self._skills_lookups[session_id] = (done, answer)

        async def look_up() -> None:
            try:
                answer[0] = await self._has_skills(session_id)
            finally:
                done.set()

        tg.start_soon(look_up)

    async def _next_item(self, poller: Any) -> Any:
        """The poller's next item, or None when the circuit closed while it waited (restart it)."""
        self._poll_restart = anyio.Event()
        got: list[Any] = []
        failed: list[BaseException] = []
        async with anyio.create_task_group() as tg:
            async def get() -> None:
                try:
                    got.append(await poller.__anext__())
                except Exception as e:  # noqa: BLE001 - re-raised below, outside the task group
                    failed.append(e)
                tg.cancel_scope.cancel()

            async def restart() -> None:
                await self._poll_restart.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(get)
            tg.start_soon(restart)
        if failed:
            raise failed[0]
        return got[0] if got else None

    async def _wait_for_headroom(self) -> None:
        admission = self.config.admission
        assert admission is not None
        while True:
            if self.pool is not None and self.pool.ready > 0:
                self._last_admission = ""
                return  # a warm sandbox already holds its resources
            decision = await anyio.to_thread.run_sync(admission.check)
            if decision.ok:
                self._last_admission = ""
                return
            self.metrics.admission_deferred.labels(resource=decision.resource).inc()
            if self._last_admission != decision.reason:
                log_event(log, logging.WARNING, "admission_deferred",
                          f"not claiming work: {decision.reason}", resource=decision.resource)
            self._last_admission = decision.reason
            await anyio.sleep(1.0)

    # ------------------------------------------------------------------ serving one item

    async def _serve(self, item: Any) -> None:
        try:
            await self._serve_item(item)
        finally:
            self._slots.release()

    async def _serve_item(self, item: Any) -> None:
        assert self._sdk_worker is not None and self.middleware is not None and self.sandboxes is not None
        work_id = getattr(item, "id", None)
        data = getattr(item, "data", None)
        work_type = getattr(data, "type", None)
        session_id = getattr(data, "id", None)
        environment_id = getattr(item, "environment_id", None) or self.config.environment_id
        secret = getattr(item, "secret", None)
        token = _sessions_token(secret)
        logs.secrets.add(secret if isinstance(secret, str) else None)
        logs.secrets.add(token)
        logs.work_id_var.set(work_id if isinstance(work_id, str) else None)
        logs.session_id_var.set(session_id if isinstance(session_id, str) else None)
        if not isinstance(work_id, str) or not work_id:
            self._skills_lookups.pop(str(session_id), None)
            self.metrics.work_failed.labels(reason="malformed").inc()
            log_event(log, logging.ERROR, "work_malformed", "claimed a work item without an id; ignoring it")
            return
        if work_type != "session" or not isinstance(session_id, str) or not session_id:
            # Healthchecks and unknown kinds: nothing to run, but stop the item so its lease doesn't sit.
            why = f"of type {str(work_type)[:40]!r}" if work_type != "session" else "without a session id"
            log_event(log, logging.INFO, "work_skipped", f"skipping a work item {why}", work_id=work_id)
            if work_type != "healthcheck":
                self.metrics.work_failed.labels(reason="malformed").inc()
            await self._force_stop(work_id, environment_id)
            return
        previous = self._serving.get(session_id)
        if previous is not None:
            # A re-delivery of a session we are still winding down: one runner per session at a time.
            with anyio.move_on_after(self.config.drain_timeout + 150):
                await previous.done.wait()
        # The session GET that tells whether it has skills runs alongside the run lock (both on the way to
        # the first call): a session without skills needs no skills tmpfs and may take a warm sandbox.
        run_lock: RunLock | None = None
        has_skills = True

        async def lock_run() -> None:
            nonlocal run_lock
            run_lock = await self._lock_run(session_id)

        async def look_up_skills() -> None:
            nonlocal has_skills
            early = self._skills_lookups.pop(session_id, None)  # started when the item was polled
            if early is not None:
                await early[0].wait()
                has_skills = early[1][0]
            else:
                has_skills = await self._has_skills(session_id)

        async with anyio.create_task_group() as first:
            first.start_soon(lock_run)
            first.start_soon(look_up_skills)
        if run_lock is None:
            # Another run of this session (another worker) still holds its workspace: let the lease lapse
            # so the item comes back, rather than run over a workspace someone else is using.
            self.metrics.work_failed.labels(reason="session_busy").inc()
            log_event(log, logging.ERROR, "session_busy", "another run of this session holds its workspace; "
                      "not serving this delivery (it will come back)", work_id=work_id, session_id=session_id)
            return
        skills_dir: Path | None = None
        trail: list[AuditTrail | None] = [None]

        async def prepare_skills() -> None:
            nonlocal skills_dir
            if not has_skills:
                # The SDK downloads nothing for an agent without skills (the session's resources cannot
                # change while it runs) and creates no `<workdir>/skills`: no tmpfs to mount and unmount.
                return
            try:
                # The SDK downloads the session agent's skills into `<workdir>/skills`: per session and run, a
                # capped tmpfs the sandbox mounts read-only at SKILLS_PATH (so it must exist before the sandbox).
                skills_dir = await anyio.to_thread.run_sync(
                    lambda: self.store.skills_dir(session_id, size_mb=self.config.skills_mb,  # type: ignore[union-attr]
                                                  inodes=self.config.skills_inodes))
            except Exception as e:  # noqa: BLE001 - served without skills, said loudly
                log_event(log, logging.ERROR, "skills_unavailable", f"cannot prepare the skills directory: {e}",
                          session_id=session_id)

        async def open_trail() -> None:
            # In a thread: opening the trail writes and fsyncs its first records (not on the event loop).
            trail[0] = await anyio.to_thread.run_sync(self._open_trail, session_id, work_id)

        # Both at once: each is a few ms of file system work on the way to the session's first call.
        async with anyio.create_task_group() as prep:
            prep.start_soon(prepare_skills)
            prep.start_soon(open_trail)
        sdk_worker = self._sdk_worker if skills_dir is None else EnvironmentWorker(
            **{**self._sdk_kwargs, "workdir": skills_dir.parent})
        slot = SessionSlot(session_id=session_id, work_id=work_id, trail=trail[0])
        slot.skills_dir = skills_dir
        slot.has_skills = has_skills
        self._skills_placed[session_id] = anyio.Event()  # set by _tools_for (or the run's end), this run only
        serving = _Serving(slot, anyio.CancelScope(), anyio.Event(), run_lock)
        self._serving[session_id] = serving
        self.middleware.track(work_id, session_id)
        self._update_gauges()
        log_event(log, logging.INFO, "work_claimed", "serving session", work_id=work_id, session_id=session_id)
        started = time.monotonic()
        clean = True
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._acquire_sandbox, slot)
                with serving.scope:
                    try:
                        await sdk_worker.handle_item(
                            work_id=work_id, environment_id=environment_id, session_id=session_id,
                            environment_key=self._key.value, work_secret=secret if isinstance(secret, str) else None,
                        )
                    finally:  # (cluster skills) a run that never got its tools must not keep _acquire_sandbox waiting
                        self._skills_gate(session_id).set()
        except Exception as e:  # noqa: BLE001 - one bad item must not take the worker down
            clean = False
            self.metrics.work_failed.labels(reason=_reason(e)).inc()
            log_event(log, logging.ERROR, "work_failed", f"work item failed: {_describe(e)}",
                      work_id=work_id, session_id=session_id)
        finally:
            view = self.middleware.leases.get(work_id)
            # Park the sandbox when the control plane, not the session, ended the run (the session will
            # come back, to us most likely), or keep it `keep_idle` seconds when told to. Otherwise stop it:
            # the files are in the store, not in the sandbox.
            in_doubt = view is not None and not self._draining and self._lease_in_doubt(view)
            park: bool | float = True if in_doubt else (self.config.keep_idle if not self._draining else 0.0)
            self.middleware.forget(work_id)
            parked, ended = False, None
            try:
                with anyio.CancelScope(shield=True):
                    ended = None if in_doubt else await self._session_ended(session_id)
                    if ended:
                        park = 0.0
                    parked = await anyio.to_thread.run_sync(
                        lambda: self.sandboxes.release(session_id, park=park, run_lock=run_lock))  # type: ignore[union-attr]
                    if not parked:
                        await anyio.to_thread.run_sync(self.store.release_skills_dir, session_id)  # type: ignore[union-attr]
                    await anyio.to_thread.run_sync(lambda: self._after_run(slot, run_lock, parked, ended))
                self._close_trail(slot, "sandbox_parked" if parked else "sandbox_stopped", clean,
                                  session_ended=ended)
            finally:
                if not parked:
                    run_lock.release()  # whatever failed above, the session can be served again
                self._serving.pop(session_id, None)
                self._skills_placed.pop(session_id, None)
                serving.done.set()
                self._update_gauges()
            log_event(log, logging.INFO, "work_done", "session run ended", work_id=work_id, session_id=session_id,
                      seconds=round(time.monotonic() - started, 3), calls=slot.calls,
                      outcome="ok" if clean else "failed", sandbox="parked" if parked else "stopped",
                      session_ended=ended, lease=view.last if view else None,
                      since_heartbeat=round(time.monotonic() - view.last_ok_at, 1) if view and view.last_ok_at else None)

    async def _lock_run(self, session_id: str) -> RunLock | None:
        """The session's run lock: taken over from our own parked sandbox, or waited for (bounded)."""
        assert self.store is not None and self.sandboxes is not None
        lock = self.sandboxes.take_parked_lock(session_id)
        if lock is not None:
            return lock
        store = self.store
        deadline = time.monotonic() + self.config.run_lock_wait
        asked = False
        while True:
            lock = await anyio.to_thread.run_sync(store.try_lock_run, session_id, limiter=self._db_limiter)
            if lock is not None:
                return lock
            if not asked:
                # A parked sandbox elsewhere lets go within a second or two when asked.
                await anyio.to_thread.run_sync(store.want, session_id)
                log_event(log, logging.INFO, "session_locked", "waiting for the previous run of this session "
                          "to release its workspace", session_id=session_id)
                asked = True
            if time.monotonic() > deadline or self._stopping.is_set():
                return None
            await anyio.sleep(0.25)

    async def _session_ended(self, session_id: str) -> str | None:
        """'terminated' / 'archived' / 'deleted' when the API says the session is over, else None."""
        assert self.client is not None
        try:
            with anyio.fail_after(10):
                sess = await self.client.beta.sessions.retrieve(session_id)
        except Exception as e:  # noqa: BLE001
            status = getattr(_first_cause(e), "status_code", None)
            return "deleted" if status == 404 else None
        if getattr(sess, "archived_at", None):
            return "archived"
        return "terminated" if getattr(sess, "status", None) == "terminated" else None

    def _after_run(self, slot: SessionSlot, run_lock: RunLock, parked: bool, ended: str | None) -> None:
        """Blocking, run lock held: record the session's activity, or remove it when it has ended."""
        assert self.store is not None
        store = self.store
        try:
            if ended:
                if store.remove_session(slot.session_id, lock=run_lock):
                    log_event(log, logging.INFO, "session_removed", f"session {ended}: workspace removed",
                              session_id=slot.session_id, reason=ended)
                return
            meta = store.meta(slot.session_id)
            if meta is None:
                return
            calls = meta.calls_since_checkpoint + slot.calls
            store.update(slot.session_id, last_activity=time.time(), state="parked" if parked else "idle",
                         runs=meta.runs + 1, calls_since_checkpoint=calls, worker=self.worker_id)
            if not parked:
                self._checkpoint(slot, calls)
        except Exception as e:  # noqa: BLE001 - the run's results are not lost over housekeeping
            log_event(log, logging.ERROR, "store_failed", f"session store update failed: {e}",
                      session_id=slot.session_id)

    def _checkpoint(self, slot: SessionSlot, calls: int) -> None:
        """The run went idle and its sandbox is stopped: record the workspace (checkpoints.py)."""
        assert self.store is not None
        if self.config.checkpoints <= 0:
            return
        meta = self.store.meta(slot.session_id)
        if meta is None:
            return
        cps = Checkpoints(self.store.session_dir(slot.session_id), max_count=self.config.checkpoints,
                          max_bytes=self.config.checkpoint_bytes)
        if not self.store.host_workspaces:
            # (CKPT) a cluster session: its workspace is the archive its sandbox wrote at the run's end (a
            # link to it, never unpacked here); no archive yet (nothing saved): no checkpoint.
            if not self.store.workspace_archive(meta.workspace).exists():
                return
            info = cps.create_from_archive(self.store.workspace_archive(meta.workspace), calls=calls)
        else:
            info = cps.create(self.store.ensure_mounted(meta.workspace), calls=calls)
        if info is None:
            log_event(log, logging.WARNING, "checkpoint_skipped", "workspace larger than the checkpoint budget; "
                      "no checkpoint", session_id=slot.session_id)
            if slot.trail is not None:
                slot.trail.lifecycle("checkpoint_skipped", reason="over the byte budget")
            return
        self.store.update(slot.session_id, calls_since_checkpoint=0)
        log_event(log, logging.INFO, "checkpoint", "workspace checkpoint recorded", session_id=slot.session_id,
                  checkpoint=info.id, digest=info.digest, files=info.files, bytes_new=info.bytes_new,
                  bytes_total=info.bytes_total, ms=info.ms, calls=calls, kind=info.kind)
        if slot.trail is not None:
            slot.trail.lifecycle("checkpoint", checkpoint=info.id, digest=info.digest, files=info.files,
                                 bytes_total=info.bytes_total, bytes_new=info.bytes_new, calls=calls, kind=info.kind)

    # ---------------------------------------------- (CKPT) periodic workspace archives of cluster sandboxes

    async def _archive_loop(self) -> None:
        """A cluster sandbox's workspace lives in its pod: if the pod dies, what changed since its last
        archive is lost. During a run, once a tool call has finished and `archive_interval` seconds have
        passed since the session's last archive began, the sandbox writes its archive again
        (SessionSandboxes.archive, in a thread; at most one per session and ARCHIVE_CONCURRENCY for the
        worker at once). Preferably between calls: with calls always in flight, after twice the interval.
        A dying pod loses at most the interval, plus one archive's time, plus a tick."""
        if self.store is None or self.store.host_workspaces:
            return
        limiter = anyio.CapacityLimiter(ARCHIVE_CONCURRENCY)
        last: dict[str, tuple[int, float]] = {}  # session -> (calls when its last archive began, when)
        running: set[str] = set()

        async def archive(session_id: str) -> None:
            assert self.sandboxes is not None
            try:
                size = await anyio.to_thread.run_sync(self.sandboxes.archive, session_id, limiter=limiter)
                self.metrics.workspace_archives.labels(outcome="ok" if size is not None else "not_taken").inc()
            except Exception as e:  # noqa: BLE001 - never takes the worker down; the previous archive stays
                self.metrics.workspace_archives.labels(outcome="not_taken").inc()
                log.warning("workspace archive failed: %s", _describe(e))
            finally:
                running.discard(session_id)

        async with anyio.create_task_group() as tg:
            while True:
                interval = self.config.archive_interval
                await anyio.sleep(min(1.0, interval / 2) if interval > 0 else 1.0)
                if interval <= 0 or self.sandboxes is None:
                    continue
                now = time.monotonic()
                for sid in [s for s in last if s not in self._serving]:
                    del last[sid]
                for sid, serving in list(self._serving.items()):
                    slot = serving.slot
                    calls, began = last.setdefault(sid, (0, now))
                    waited = now - began
                    if (sid in running or slot.calls <= calls or waited < interval
                            or (slot.in_flight and waited < 2 * interval) or slot.ready_sandbox() is None):
                        continue
                    last[sid] = (slot.calls, now)
                    running.add(sid)
                    tg.start_soon(archive, sid)

    def _open_trail(self, session_id: str, work_id: str) -> AuditTrail | None:
        assert self.store is not None and self.policy is not None
        try:
            # One trail per session for all its runs, whichever worker serves them: the chain continues.
            trail = AuditTrail(self.store.trail_path(session_id), session=session_id, reopen=True)
            trail.policy(self.policy)
            trail.lifecycle("work_claimed", work_id=work_id)
            return trail
        except Exception as e:  # noqa: BLE001 - said loudly; the session is still served
            log_event(log, logging.ERROR, "trail_failed", f"cannot open the session's audit trail: {e}",
                      session_id=session_id)
            return None

    def _close_trail(self, slot: SessionSlot, event: str, clean: bool, **details: Any) -> None:
        trail = slot.trail
        if trail is None or self._runtime is None:
            return
        try:
            for tail in slot.egress_tails:
                tail.stop()  # a last read: every decision of the run is in before the close
            trail.lifecycle(event, calls=slot.calls, outcome="ok" if clean else "failed", **details)
            trail.close("work_done", work_id=slot.work_id)
            # The head, logged outside the file, is what lets `sandbox audit verify --head` see truncation.
            log_event(log, logging.INFO, "trail_closed", "session audit trail closed", session_id=slot.session_id,
                      trail=str(trail.path), head=trail.head[1])
        except Exception as e:  # noqa: BLE001
            log_event(log, logging.ERROR, "trail_failed", f"cannot close the session's audit trail: {e}",
                      session_id=slot.session_id)

    def _lease_in_doubt(self, view: Any) -> bool:
        """Did the control plane (not the session) end this run: lost lease, outage, hand-back?"""
        if view.last in ("transient", "precondition") or view.handed_back:
            return True
        # A healthy run heartbeats every min(ttl/2, 30) s; a longer silence means the lease was given up.
        interval = min((self.config.lease_ttl or 90) / 2, 30.0)
        return view.last_ok_at is not None and time.monotonic() - view.last_ok_at > interval + 3.0

    def _skills_gate(self, session_id: str) -> anyio.Event:
        return self._skills_placed.setdefault(session_id, anyio.Event())

    def _copy_skills(self, slot: SessionSlot, sb: Any) -> None:
        """Cluster: the run's skills (placed by the SDK in slot.skills_dir) into the pod at /mnt/skills
        (sandbox.worker.pool.install_skills). A failure is said and the session served without them."""
        from .pool import install_skills

        try:
            n, left_out = install_skills(sb, slot.skills_dir, max_bytes=self.config.skills_mb << 20,
                                         max_files=self.config.skills_inodes)
            if n:
                log_event(log, logging.INFO, "skills_copied", f"{n} skill file(s) copied into the sandbox",
                          session_id=slot.session_id, files=n)
            if left_out:
                log_event(log, logging.ERROR, "skills_unavailable", "skills over the size or file cap were left "
                          "out", session_id=slot.session_id, skills=left_out)
        except Exception as e:  # noqa: BLE001 - served without skills, said loudly
            log_event(log, logging.ERROR, "skills_unavailable", f"cannot copy the skills into the sandbox: {e}",
                      session_id=slot.session_id)

    async def _acquire_sandbox(self, slot: SessionSlot) -> None:
        assert self.sandboxes is not None
        sandboxes = self.sandboxes
        # A cluster sandbox cannot mount the skills: they are copied in once the SDK has placed them
        # (_tools_for), before the sandbox is handed to the tools, and again into a replacement.
        copy_skills = slot.skills_dir is not None and self.store is not None and not self.store.host_workspaces
        mounts = [(slot.skills_dir, SKILLS_PATH)] if slot.skills_dir is not None and not copy_skills else []
        # A warm sandbox has no skills mount: only for sessions without skills.
        use_pool = bool(self.pool and self.pool.ready) and not slot.has_skills
        try:
            a = await anyio.to_thread.run_sync(
                lambda: sandboxes.acquire(slot.session_id, ro_mounts=mounts, use_pool=use_pool),
                limiter=self._sandbox_limiter)
        except Exception as e:  # noqa: BLE001
            log_event(log, logging.ERROR, "sandbox_failed", f"could not start the session's sandbox: {e}",
                      session_id=slot.session_id)
            slot.set_error(str(e))
            return

        def replace() -> Any:
            # Same workspace: the session's files survive its sandbox dying.
            sandboxes.release(slot.session_id, park=False)
            sb = sandboxes.acquire(slot.session_id, ro_mounts=mounts, use_pool=False).sandbox
            if copy_skills:
                self._copy_skills(slot, sb)
            return sb

        def replace_and_follow() -> Any:
            sb = replace()
            self._follow_egress(slot, sb)
            return sb

        slot.replace = replace_and_follow
        if copy_skills:
            gate = self._skills_gate(slot.session_id)
            await gate.wait()
            await anyio.to_thread.run_sync(lambda: self._copy_skills(slot, a.sandbox), limiter=self._sandbox_limiter)
        slot.set_sandbox(a.sandbox)
        self._follow_egress(slot, a.sandbox)

    def _follow_egress(self, slot: SessionSlot, sb: Any) -> None:
        """The sandbox's egress decisions reach the session's trail as they happen (egress_trail.py)."""
        if slot.trail is None or not getattr(sb, "egress", False) or self._runtime is None or self.store is None:
            return
        try:
            from sandbox.egress.audit import session_file

            from .egress_trail import EgressTail
            from .store import safe_id

            audit = session_file(self._runtime.egress.audit_path, sb.session_id)  # type: ignore[attr-defined]
            cursor = self.store.session_dir(slot.session_id) / f"egress-{safe_id(sb.session_id)}.cursor"
            cursor.parent.mkdir(parents=True, exist_ok=True)
            trail = slot.trail
            tail = EgressTail(audit, cursor, trail.egress,
                              lost=lambda why: trail.lifecycle("egress_records_lost", reason=why)).start()
            slot.egress_tails.append(tail)
        except Exception as e:  # noqa: BLE001 - said loudly; the session is still served
            log_event(log, logging.ERROR, "trail_failed", f"cannot follow the session's egress decisions: {e}",
                      session_id=slot.session_id)

    async def _has_skills(self, session_id: str) -> bool:
        assert self.client is not None
        try:
            with anyio.fail_after(10):
                sess = await self.client.beta.sessions.retrieve(session_id)
        except Exception:  # noqa: BLE001 - unknown: assume it has some (no warm sandbox, skills mounted)
            return True
        return bool(getattr(getattr(sess, "agent", None), "skills", None))

    def _tools_for(self, env: AgentToolContext) -> list[Any]:
        """The SDK's per-session tool factory: tools bound to that session's sandbox.

        Called once the SDK has put the session's skills in place: they become readable by the
        sandbox (the mount is read-only; the host-side tree stays root's)."""
        assert self.outbox is not None
        session = env.session
        session_id = getattr(session, "id", None) or env.session_id
        serving = self._serving.get(session_id) if session_id else None
        if serving is None or not isinstance(session_id, str):
            raise RuntimeError(f"no sandbox slot for session {session_id!r}")
        if serving.slot.skills_dir is not None:
            _open_for_reading(serving.slot.skills_dir)
            self._skills_gate(session_id).set()  # cluster: _acquire_sandbox copies them in now
        return SessionToolbox(serving.slot, self.outbox, self.metrics, sandbox_limiter=self._sandbox_limiter,
                              db_limiter=self._db_limiter).tools()

    async def _force_stop(self, work_id: str, environment_id: str) -> None:
        assert self.client is not None
        try:
            await self.client.beta.environments.work.stop(work_id, environment_id=environment_id, force=True)
        except Exception as e:  # noqa: BLE001
            log_event(log, logging.WARNING, "stop_failed", f"could not stop work item: {_describe(e)}",
                      work_id=work_id)

    # ------------------------------------------------------------------ shutdown

    async def _drain(self) -> None:
        """Let in-flight tool calls finish (bounded), then hand the items back."""
        self._draining = True
        serving = list(self._serving.values())
        log_event(log, logging.INFO, "draining", f"stopping: {len(serving)} session(s) in flight",
                  drain_timeout=self.config.drain_timeout)
        with anyio.move_on_after(self.config.drain_timeout):
            await self._settled(serving)
        # Past the bound: calls still running are answered "interrupted" (their sandbox goes away).
        for s in serving:
            s.slot.abort_calls()
        with anyio.move_on_after(5):
            await self._settled(serving)
        for s in serving:
            assert self.middleware is not None
            self.middleware.hand_back(s.slot.work_id)
            s.scope.cancel()
        with anyio.move_on_after(10):
            for s in serving:
                await s.done.wait()

    async def _settled(self, serving: list[_Serving]) -> None:
        """Until each session's calls are answered and this worker's results accepted by the control plane, or its
        run has ended (a session terminated as the worker stopped: what it left unaccepted never will be,
        and the worker used to wait its whole drain bound for it)."""
        def unsettled(s: _Serving) -> bool:
            if s.done.is_set():
                return False
            if not s.slot.idle.is_set():
                return True
            # Only this worker's results: one a killed worker left unmarked in the shared journal is the
            # sweeper's (and used to hold every later worker's stop for the whole bound).
            ob = self.outbox
            return ob is not None and any(r.owner == ob.owner for r in ob.pending(s.slot.session_id))

        while any(unsettled(s) for s in serving):
            await anyio.sleep(0.05)

    # ------------------------------------------------------------------ background

    async def _beat(self) -> None:
        """Stamp the time the event loop last got to run (nothing else: a slow sweep must not look stuck)."""
        while True:
            self._loop_beat = time.monotonic()
            await anyio.sleep(LOOP_BEAT_S)

    async def _housekeeping(self) -> None:
        last_stats = 0.0
        last_store = time.monotonic()
        while True:
            await anyio.sleep(1.0)
            try:
                if self.sandboxes is not None:
                    await anyio.to_thread.run_sync(self.sandboxes.reap_parked)
                self._update_gauges()
                now = time.monotonic()
                breaker_open = self.middleware is not None and self.middleware.breaker.open
                if now - last_stats >= (1.0 if breaker_open else 5.0):
                    last_stats = now
                    await self._refresh_stats()
                    await self._sweep_outbox()
                    await anyio.to_thread.run_sync(self._count_egress)
                if breaker_open:
                    await anyio.to_thread.run_sync(self._follow_endpoint)
                if now - last_store >= self.config.store_sweep_s:
                    last_store = now
                    await self._sweep_store()
            except Exception as e:  # noqa: BLE001 - housekeeping never kills the worker
                log.warning("housekeeping failed: %s", _describe(e))

    def _follow_endpoint(self) -> None:
        """The control plane is unreachable: if its endpoint.json names another address now, use it."""
        if self.config.endpoint_dir is None or self.client is None:
            return
        from sandbox.controlplane.endpoint import EndpointError, read_endpoint

        try:
            ep = read_endpoint(self.config.endpoint_dir)
        except EndpointError:
            return
        if ep.base_url.rstrip("/") == self.config.base_url.rstrip("/") or ep.environment_id != self.config.environment_id:
            return
        log_event(log, logging.WARNING, "endpoint_moved", "the control plane came back at another address; "
                  "following it", old=self.config.base_url, new=ep.base_url)
        self.config.base_url = ep.base_url
        self.client.base_url = ep.base_url  # the SDK derives each item's client from this one
        self._poll_restart.set()

    async def _sweep_store(self) -> None:
        """Remove store entries of sessions that ended while no run served them, or past retention."""
        store = self.store
        if store is None:
            return
        # Retention needs no control plane; asking whether a session ended does.
        reachable = not (self.middleware is not None and self.middleware.breaker.open)
        for meta in await anyio.to_thread.run_sync(store.sessions):
            sid = meta.session_id
            if sid in self._serving:
                continue
            expired = time.time() - meta.last_activity > store.retention_s
            reason = "retention expired" if expired else (await self._session_ended(sid) if reachable else None)
            if not reason:
                continue
            removed = await anyio.to_thread.run_sync(store.remove_session, sid)
            if removed:
                log_event(log, logging.INFO, "session_removed", f"{reason}: workspace removed", session_id=sid,
                          reason=reason)
        for ws in await anyio.to_thread.run_sync(store.orphan_workspaces):
            await anyio.to_thread.run_sync(store.remove_workspace, ws)
            log_event(log, logging.INFO, "workspace_removed", "removed a warm workspace of a worker that is gone",
                      workspace=ws)

    async def _refresh_stats(self) -> None:
        """Queue depth for the metrics; while the circuit is open this is also its probe."""
        assert self.client is not None and self.middleware is not None
        try:
            stats = await self.client.beta.environments.work.stats(self.config.environment_id)
        except Exception:  # noqa: BLE001 - stats may need an org key on the real service
            return
        self.metrics.queue_depth.set(stats.depth)
        self.metrics.queue_pending.set(stats.pending)

    def _count_egress(self) -> None:
        if self.sandboxes is None or self._runtime is None:
            return
        for a in self.sandboxes.assignments():
            n = count_egress_denials(self._runtime, a)
            if n:
                self.metrics.egress_denials.inc(n)

    async def _sweep_outbox(self) -> None:
        """Deliver results no runner will replay: their session is neither served nor parked here."""
        assert self.outbox is not None and self.client is not None and self.middleware is not None
        if self.middleware.breaker.open or self._draining:
            return
        outbox, client = self.outbox, self.client
        pending = await anyio.to_thread.run_sync(lambda: outbox.pending(older_than=self.config.sweep_after))
        active = set(self._serving) | (self.sandboxes.parked_sessions() if self.sandboxes else set())
        store = self.store
        assert store is not None
        for rec in pending:
            if rec.session_id in active or rec.result is None:
                continue
            # The journal is shared: leave results of live workers, and sessions some run is serving, alone.
            if rec.owner != outbox.owner and store.owner_alive(rec.owner):
                continue
            if await anyio.to_thread.run_sync(store.run_active, rec.session_id):
                continue
            try:
                answered, terminated = await _answered_in_history(client, rec.session_id, rec.tool_use_id)
            except Exception as e:  # noqa: BLE001
                status = getattr(e, "status_code", None)
                if status == 404:
                    await anyio.to_thread.run_sync(outbox.drop, rec.tool_use_id)
                    log_event(log, logging.WARNING, "outbox_dropped", "session gone; stored result dropped",
                              session_id=rec.session_id, tool_use_id=rec.tool_use_id)
                continue
            if answered or terminated:
                await anyio.to_thread.run_sync(outbox.drop, rec.tool_use_id)
                log_event(log, logging.INFO, "outbox_dropped",
                          "stored result not needed (answered elsewhere or session ended)",
                          session_id=rec.session_id, tool_use_id=rec.tool_use_id)
                continue
            event = {"type": "user.tool_result", "tool_use_id": rec.tool_use_id,
                     "is_error": rec.result.is_error, "content": session_content(rec.result.content)}
            try:
                await client.beta.sessions.events.send(rec.session_id, events=[event])  # type: ignore[list-item]
                log_event(log, logging.INFO, "outbox_delivered", "delivered a stored result",
                          session_id=rec.session_id, tool_use_id=rec.tool_use_id)
            except Exception as e:  # noqa: BLE001
                log.warning("could not deliver a stored result: %s", _describe(e))

    def _update_gauges(self) -> None:
        m = self.metrics
        m.sessions_in_flight.set(len(self._serving))
        m.at_session_limit.set(1 if len(self._serving) >= self.config.max_sessions else 0)
        ready = self.pool.ready if self.pool else 0
        m.pool_ready.set(ready)
        m.sandboxes_live.set(ready + (self.sandboxes.live_count() if self.sandboxes else 0))
        if self.outbox is not None:
            try:
                self._outbox_pending = self.outbox.pending_count()
                m.outbox_pending.set(self._outbox_pending)
            except Exception:  # noqa: BLE001 - called from pool threads too; a busy db is not fatal
                pass


# ---------------------------------------------------------------------- helpers

LOOP_ENV = "SANDBOX_WORKER_LOOP"


def loop_options() -> dict[str, Any]:
    """anyio backend options for the worker's event loop: uvloop (a declared dependency) unless
    $SANDBOX_WORKER_LOOP=asyncio or it is not importable. Measured with 16 sessions (bench_worker.py):
    the worker process's CPU per tool call 4.2 ms with uvloop, 4.8 ms without; no difference seen
    with one session."""
    if os.environ.get(LOOP_ENV, "uvloop").strip().lower() == "asyncio":
        return {"use_uvloop": False}
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {"use_uvloop": False}
    return {"use_uvloop": True}


SKILLS_PATH = "/mnt/skills"  # the session agent's skills, read-only: /mnt/skills/<name>/SKILL.md


def _open_for_reading(root: Path) -> None:
    """The SDK makes skill dirs 0700 (root's, on the host): let the sandbox's uid read and enter them."""
    for dirpath, dirnames, _files in os.walk(root, followlinks=False):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                os.chmod(p, 0o755)

async def _answered_in_history(client: AsyncAnthropic, session_id: str, tool_use_id: str) -> tuple[bool, bool]:
    answered = terminated = False
    async for ev in client.beta.sessions.events.list(session_id, limit=1000):
        kind = getattr(ev, "type", None)
        if kind == "user.tool_result" and getattr(ev, "tool_use_id", None) == tool_use_id:
            answered = True
        elif kind in ("session.status_terminated", "session.deleted"):
            terminated = True
    return answered, terminated


def session_content(content: Any) -> list[dict[str, Any]]:
    """A stored tool result as Sessions-API content blocks (what the SDK runner would send)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content or "(no output)"}]
    out: list[dict[str, Any]] = []
    for block in content or []:
        if isinstance(block, dict) and block.get("type") in ("text", "image", "document"):
            out.append(block)
        else:
            out.append({"type": "text", "text": json.dumps(block)})
    return out or [{"type": "text", "text": "(no output)"}]


def _sessions_token(secret: object) -> str | None:
    """The per-item sessions token, only to register it for log redaction (never logged or used here)."""
    if not isinstance(secret, str) or not secret:
        return None
    try:
        parsed = json.loads(base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    token = parsed.get("sessions_token") if isinstance(parsed, dict) else None
    return token if isinstance(token, str) else None


def _first_cause(e: BaseException) -> BaseException:
    inner = getattr(e, "exceptions", None)
    return _first_cause(inner[0]) if inner else e


def _describe(e: BaseException) -> str:
    cause = _first_cause(e)
    return logs.redact(f"{type(cause).__name__}: {cause}")[:500]


def _reason(e: BaseException) -> str:
    cause = _first_cause(e)
    status = getattr(cause, "status_code", None)
    if isinstance(status, int):
        return f"http_{status // 100}xx"
    return "error"
