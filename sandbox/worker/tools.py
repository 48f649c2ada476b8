"""The SDK-facing tools: same names and input schemas as the SDK's reference
toolset (`agent_toolset_20260401`), executed inside the session's sandbox.

Each tool is built with the SDK's `beta_async_tool` and the SDK's own input
models as `input_schema`, so the tool definitions are byte-for-byte the
reference's; only where the work happens changes (`Sandbox.call` into the
in-sandbox agent's ops in `sandbox/agent/tools.py`). The functions take
`**kwargs` and validate against the same models themselves, so a malformed
input yields an error naming the bad field instead of the SDK's generic
"Invalid arguments".

Every call goes through the durable outbox keyed by the `tool_use_id` (read
from the SDK's tool span, see `toolctx`): a call already answered is replayed,
never re-run; the result is stored before the SDK posts it.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import anyio
import pydantic
from anthropic.lib.tools import ToolError, beta_async_tool
from anthropic.lib.tools._beta_functions import BetaAsyncFunctionTool
from anthropic.types.beta import (
    BetaManagedAgentsAgentToolset20260401BashInput,
    BetaManagedAgentsAgentToolset20260401EditInput,
    BetaManagedAgentsAgentToolset20260401GlobInput,
    BetaManagedAgentsAgentToolset20260401GrepInput,
    BetaManagedAgentsAgentToolset20260401ReadInput,
    BetaManagedAgentsAgentToolset20260401WriteInput,
)

from sandbox.channel import ChannelClosed
from sandbox.runtime import HOST_GRACE_S, Sandbox, SandboxError, ToolOpError

from .logs import log_event
from .metrics import WorkerMetrics, tool_label
from .outbox import Begin, Outbox
from .toolctx import current_tool_call

log = logging.getLogger("sandbox.worker.tools")

BASH_DEFAULT_TIMEOUT = 120.0
# Below the SDK runner's 150 s per-call deadline, so the sandbox (not a cancel
# from outside) ends a long command and reports it like the reference does.
BASH_MAX_TIMEOUT = 140.0
MAX_COMMAND_CHARS = 1 << 20
MAX_WRITE_BYTES = 10 << 20
MAX_EDIT_STRING_CHARS = 256 * 1024
OP_GRACE_S = 15.0
_FAILURE_PREFIX = "ToolFailure: "

INPUT_MODELS: dict[str, type[pydantic.BaseModel]] = {
    "bash": BetaManagedAgentsAgentToolset20260401BashInput,
    "read": BetaManagedAgentsAgentToolset20260401ReadInput,
    "write": BetaManagedAgentsAgentToolset20260401WriteInput,
    "edit": BetaManagedAgentsAgentToolset20260401EditInput,
    "glob": BetaManagedAgentsAgentToolset20260401GlobInput,
    "grep": BetaManagedAgentsAgentToolset20260401GrepInput,
}
# The reference tools' descriptions (their docstrings), so the definitions match.
DESCRIPTIONS = {
    "bash": "Run a command in a persistent bash shell.",
    "read": "Read a file rooted at the working directory.",
    "write": "Write a file, creating parent directories as needed.",
    "edit": "Replace text in a file by exact string match.",
    "glob": "List files matching a glob pattern, newest first.",
    "grep": "Search file contents for a regular expression.",
}

Content = Any  # str or a list of content blocks


class SandboxUnavailable(Exception):
    pass


@dataclass
class SessionSlot:
    """One session being served: its ids and (once started) its sandbox."""

    session_id: str
    work_id: str
    _ready: anyio.Event = field(default_factory=anyio.Event)
    _sandbox: Sandbox | None = None
    _error: str | None = None
    replace: Callable[[], Sandbox] | None = None  # starts a fresh sandbox if the first one died
    in_flight: int = 0
    idle: anyio.Event = field(default_factory=anyio.Event)
    # Set on shutdown once the drain bound has passed: in-flight calls stop waiting and answer "interrupted".
    abort: anyio.Event = field(default_factory=anyio.Event)
    calls: int = 0
    trail: Any = None  # the session's AuditTrail (sandbox.audit.trail), when one could be opened
    skills_dir: Any = None  # host dir of this run's skills (mounted read-only in the sandbox)
    has_skills: bool = True  # the session's agent has skills (or it could not be told): no warm sandbox
    egress_tails: list[Any] = field(default_factory=list)  # EgressTail per sandbox of this run (egress_trail.py)

    # The cancel scopes of the calls in flight: `abort_calls()` ends their waits (the SDK runs tools shielded).
    _scopes: set[anyio.CancelScope] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.idle.set()

    def abort_calls(self) -> None:
        """Past the drain bound: in-flight calls stop waiting and answer "interrupted"."""
        self.abort.set()
        for scope in list(self._scopes):
            scope.cancel()

    def ready_sandbox(self) -> Sandbox | None:
        """The sandbox, when it is started and alive (no wait, no replacement)."""
        sb = self._sandbox
        return sb if sb is not None and self._ready.is_set() and sb.alive else None

    def set_sandbox(self, sb: Sandbox) -> None:
        self._sandbox = sb
        self._ready.set()

    def set_error(self, message: str) -> None:
        self._error = message
        self._ready.set()

    async def sandbox(self, limiter: anyio.CapacityLimiter) -> Sandbox:
        await self._ready.wait()
        if self._sandbox is None:
            raise SandboxUnavailable(self._error or "no sandbox")
        if not self._sandbox.alive and self.replace is not None:
            # The sandbox died (e.g. its agent was OOM-killed): the session continues in a new one.
            self._sandbox = await anyio.to_thread.run_sync(self.replace, limiter=limiter)
        return self._sandbox

    def enter(self) -> None:
        self.in_flight += 1
        self.calls += 1
        self.idle = anyio.Event() if self.idle.is_set() else self.idle

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()


class SessionToolbox:
    """The six tools bound to one session's slot."""

    def __init__(self, slot: SessionSlot, outbox: Outbox, metrics: WorkerMetrics, *,
                 sandbox_limiter: anyio.CapacityLimiter, db_limiter: anyio.CapacityLimiter) -> None:
        self.slot = slot
        self.outbox = outbox
        self.metrics = metrics
        self._sandbox_limiter = sandbox_limiter
        self._db_limiter = db_limiter

    def tools(self) -> list[BetaAsyncFunctionTool[Any]]:
        return [self._make(name) for name in ("bash", "read", "write", "edit", "glob", "grep")]

    def _make(self, name: str) -> BetaAsyncFunctionTool[Any]:
        box = self

        async def tool(**kwargs: Any) -> Any:
            return await box.call(name, kwargs)

        tool.__name__ = name
        tool.__doc__ = DESCRIPTIONS[name]
        # The model's JSON schema, as the SDK would derive it from the model, computed once per process
        # (deriving it is ~1 ms per tool, six tools at every session start); each tool gets its own copy.
        return beta_async_tool(name=name, description=DESCRIPTIONS[name],
                               input_schema=copy.deepcopy(input_schema(name)))(tool)

    # ------------------------------------------------------------------ one call

    async def call(self, name: str, raw: dict[str, Any]) -> Content:
        started = time.perf_counter()
        outcome = "error"
        is_error = True
        # One trail record per call, written by whoever takes this token first (list.pop is atomic): the
        # fast path writes it in its thread; an abandoned thread that finishes late writes none.
        record_token = [True]
        self.slot.enter()
        try:
            content, is_error, outcome = await self._dedupe_and_run(name, raw, started, record_token)
        finally:
            self.slot.leave()
            elapsed = time.perf_counter() - started
            self.metrics.tool_seconds.labels(tool=tool_label(name)).observe(elapsed)
            self.metrics.tool_calls.labels(tool=tool_label(name), outcome=outcome).inc()
            if _take(record_token):
                self._record(name, raw, outcome, is_error, elapsed)
        if is_error:
            raise ToolError(content)
        return content

    def _record(self, name: str, raw: dict[str, Any], outcome: str, is_error: bool, elapsed: float,
                call: Any = None) -> None:
        """One trail record per call: the input only as a digest, never content or output."""
        if self.slot.trail is None:
            return
        call = call or current_tool_call()
        try:
            self.slot.trail.tool_call(name, raw, exit_status=1 if is_error else 0, duration_s=elapsed,
                                      error=outcome if is_error else None,
                                      call_id=call.tool_use_id if call is not None else None)
        except Exception as e:  # noqa: BLE001 - the call's result is not lost over its audit record
            log_event(log, logging.ERROR, "trail_failed", f"cannot append to the audit trail: {e}",
                      session_id=self.slot.session_id)

    async def _db(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._db_limiter)

    async def _dedupe_and_run(self, name: str, raw: dict[str, Any], started: float,
                              record_token: list[bool]) -> tuple[Content, bool, str]:
        call = current_tool_call()
        try:
            args = validate_input(name, raw)
        except ToolError as e:
            # Deterministic and side-effect free: not recorded, the same input always gets the same answer.
            return e.content, True, "invalid_input"
        if call is None:
            # Only if the SDK stopped giving tool runs a span: run, but say the dedupe is off.
            log_event(log, logging.ERROR, "no_tool_use_id", "tool call without a tool_use_id; not deduplicated",
                      tool=name, session_id=self.slot.session_id)
            content, is_error = await self._execute(name, args)
            return content, is_error, "error" if is_error else "ok"
        tid = call.tool_use_id
        sb = self.slot.ready_sandbox()
        if sb is not None and hasattr(sb, "start_call") and not self.slot.abort.is_set():
            # The common case without a thread blocked on the sandbox: see `_call_on_loop`.
            op_args, timeout = op_request(name, args)
            done = await self._call_on_loop(sb, name, raw, op_args, timeout, call, started, record_token)
            if isinstance(done, tuple):
                return done
            decision = done  # not run here: answered from the journal, or someone else is running it
        elif sb is not None:
            # In one trip to a thread: journal `running`, the op in the sandbox, journal the result, the trail
            # record. (Four trips before: each a wake-up of the loop and a hand-over of the GIL.)
            op_args, timeout = op_request(name, args)
            claimed: list[bool] = []  # the thread appends once the journal gave this call to us to run
            try:
                done = await self._call_unless_aborted(
                    lambda: self._journalled_call(sb, name, raw, op_args, timeout, call, started, record_token,
                                                  claimed))
            except BaseException as e:
                # Given up while the thread runs on (shutdown, or the SDK's deadline): the call's effects are
                # unknown. Only a row this call claimed is marked; another worker's running row is not ours.
                if claimed:
                    with anyio.CancelScope(shield=True):
                        await self._db(self.outbox.abandon, tid)
                if isinstance(e, _Aborted):
                    return f"{name}: {SHUTDOWN_TEXT}", True, "interrupted"
                raise
            if isinstance(done, tuple):
                return done
            decision = done  # not run here: answered from the journal, or someone else is running it
        else:
            decision = await self._db(self.outbox.begin, tid, self.slot.session_id, self.slot.work_id, name)
        waited = False
        while decision.wait:
            # Another live worker is running this very call (it lost the lease mid-call): never run it
            # a second time; wait for its result (or for that worker to die: then it is "interrupted").
            if not waited:
                log_event(log, logging.WARNING, "tool_waiting", "another worker is running this call; waiting for "
                          "its result", tool=name, tool_use_id=tid, session_id=self.slot.session_id)
                waited = True
            if self.slot.abort.is_set():
                return f"{name}: {SHUTDOWN_TEXT}", True, "interrupted"
            await anyio.sleep(0.5)
            decision = await self._db(self.outbox.begin, tid, self.slot.session_id, self.slot.work_id, name)
        if not decision.run:
            rec = decision.record
            assert rec is not None
            log_event(log, logging.INFO, "tool_replayed", "tool call already ran; replaying its stored result",
                      tool=name, tool_use_id=tid, session_id=self.slot.session_id, state=rec.state)
            if rec.result is None:  # delivered already: the control plane keeps the first result anyway
                return "(already answered)", False, "replayed"
            return rec.result.content, rec.result.is_error, "replayed"
        log_event(log, logging.INFO, "tool_exec", f"executing {name}", tool=name, tool_use_id=tid,
                  session_id=self.slot.session_id, work_id=self.slot.work_id)
        try:
            content, is_error = await self._execute(name, args)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._db(self.outbox.abandon, tid)
            raise
        # Stored before the SDK posts it: a crash after this line replays instead of re-running.
        await self._db(self.outbox.finish, tid, content, is_error)
        return content, is_error, "error" if is_error else "ok"

    async def _call_on_loop(self, sb: Sandbox, name: str, raw: dict[str, Any], op_args: dict[str, Any],
                            timeout: float, call: Any, started: float,
                            record_token: list[bool]) -> tuple[Content, bool, str] | Begin:
        """The call with no thread trip: the journal claims it here (`Outbox.try_begin`: one statement that
        never waits for a lock), the op goes to the sandbox (`Sandbox.start_call`), and the sandbox's channel,
        read on this event loop (`AgentChannel.read_on_loop`), brings the result back to this thread, which
        stores it in the journal (`try_finish`, never waiting; else in a thread) and writes the trail record
        before it wakes this task: the result is stored before the SDK can post it, as on the thread path.
        (A journal that cannot store a result without waiting - a FULL commit fsyncs, the files journal
        talks to a file server - leaves the channel on the hub's thread, which stores it there.)
        When the journal cannot answer at once (another thread is writing it, or the call has a row),
        `begin` decides in a thread; its decision is returned when the call is not to be run here.

        Whoever takes `stored` first gives the call its result: the channel's reader with the op's outcome,
        or this task when the deadline passes (a timeout) or the call is given up (interrupted)."""
        tid = call.tool_use_id
        decision = self.outbox.try_begin(tid, self.slot.session_id, self.slot.work_id, name)
        if decision is None:
            decision = await self._db(self.outbox.begin, tid, self.slot.session_id, self.slot.work_id, name)
        if not decision.run:
            return decision
        if self.slot.abort.is_set():  # shut down while the journal answered: claimed, never sent
            with anyio.CancelScope(shield=True):
                await self._db(self.outbox.abandon, tid)
            return f"{name}: {SHUTDOWN_TEXT}", True, "interrupted"
        log_event(log, logging.INFO, "tool_exec", f"executing {name}", tool=name, tool_use_id=tid,
                  session_id=self.slot.session_id, work_id=self.slot.work_id)
        loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()
        if self.outbox.finishes_on_loop:
            # The result then arrives on this thread: no hop from a reader thread (once per sandbox: a
            # channel already read on this loop stays there).
            sb.channel.read_on_loop(loop)
        fut: asyncio.Future[tuple[Content, bool, str, bool]] = loop.create_future()
        stored = [True]

        def settle(result: tuple[Content, bool, str, bool] | None, error: BaseException | None) -> None:
            if not fut.done():
                if error is not None:
                    fut.set_exception(error)
                else:
                    fut.set_result(result)  # type: ignore[arg-type]

        def wake(result: tuple[Content, bool, str, bool] | None, error: BaseException | None) -> None:
            if threading.get_ident() == loop_thread:
                settle(result, error)
            else:
                loop.call_soon_threadsafe(settle, result, error)

        def give(content: Content, is_error: bool, lost: bool) -> None:
            """Store the result, then the trail record, then wake the task (any thread). On the loop (the
            result came through the loop's channel reader) the journal stores it only if it can at once;
            else this runs again in a thread, so the loop never waits for the journal."""
            try:
                if threading.get_ident() != loop_thread:
                    self.outbox.finish(tid, content, is_error)
                elif not self.outbox.try_finish(tid, content, is_error):
                    loop.run_in_executor(None, give, content, is_error, lost)
                    return
            except BaseException as e:  # noqa: BLE001 - raised in the task: not posted, the row stays running
                wake(None, e)
                return
            outcome = "error" if is_error else "ok"
            if _take(record_token):
                self._record(name, raw, outcome, is_error, time.perf_counter() - started, call)
            wake((content, is_error, outcome, lost), None)

        def on_done(value: Any, error: BaseException | None) -> None:  # where the channel is read
            if error is None:
                content, is_error = result_content(name, value)
            elif isinstance(error, ToolOpError):
                content, is_error = failure_text(name, str(error)), True
            else:
                log_event(log, logging.WARNING, "sandbox_failed", f"sandbox failed during {name}: {error}", tool=name,
                          session_id=self.slot.session_id)
                content, is_error = _stopped_text(name, error), True
            if _take(stored):
                give(content, is_error, isinstance(error, SandboxError))

        try:
            forget = sb.start_call(name, on_done, **op_args)
        except (ChannelClosed, SandboxError) as e:  # the channel was gone before the op could be sent
            forget = _nothing
            if _take(stored):
                await anyio.to_thread.run_sync(give, _stopped_text(name, e), True, True)
        scope = anyio.CancelScope()
        self.slot._scopes.add(scope)
        try:
            with scope, anyio.move_on_after(timeout + HOST_GRACE_S):
                content, is_error, outcome, lost = await asyncio.shield(fut)
                if lost:
                    await anyio.to_thread.run_sync(sb.after_channel_loss)  # as Sandbox.call does
                return content, is_error, outcome
        except BaseException:
            forget()
            if _take(stored):  # given up before the result came: its effects are unknown
                with anyio.CancelScope(shield=True):
                    await self._db(self.outbox.abandon, tid)
            raise
        finally:
            self.slot._scopes.discard(scope)
        forget()
        if _take(stored):
            if scope.cancel_called:  # aborted (shutdown past the drain bound)
                with anyio.CancelScope(shield=True):
                    await self._db(self.outbox.abandon, tid)
                return f"{name}: {SHUTDOWN_TEXT}", True, "interrupted"
            # The deadline passed: answered as `Sandbox.call` would have (its own deadline).
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(give, _stopped_text(name, SandboxError(f"sandbox op {name} timed out")),
                                               True, False)
        with anyio.CancelScope(shield=True):  # the reader thread is storing the result: moments away
            content, is_error, outcome, _lost = await asyncio.shield(fut)
        return content, is_error, outcome

    def _journalled_call(self, sb: Sandbox, name: str, raw: dict[str, Any], op_args: dict[str, Any],
                         timeout: float, call: Any, started: float, record_token: list[bool],
                         claimed: list[bool]) -> tuple[Content, bool, str] | Begin:
        """Blocking (a worker thread): begin in the journal; if this call is ours to run, run it in the
        sandbox, store its result before anyone posts it, and write its trail record. Returns the
        journal's decision when the call is not to be run here."""
        tid = call.tool_use_id
        decision = self.outbox.begin(tid, self.slot.session_id, self.slot.work_id, name)
        if not decision.run:
            return decision
        claimed.append(True)
        log_event(log, logging.INFO, "tool_exec", f"executing {name}", tool=name, tool_use_id=tid,
                  session_id=self.slot.session_id, work_id=self.slot.work_id)
        try:
            content, is_error = result_content(name, sb.call(name, timeout=timeout, **op_args))
        except ToolOpError as e:
            content, is_error = failure_text(name, str(e)), True
        except SandboxError as e:
            log_event(log, logging.WARNING, "sandbox_failed", f"sandbox failed during {name}: {e}", tool=name,
                      session_id=self.slot.session_id)
            content, is_error = (f"{name}: the sandbox stopped while running this call ({e}); the next call "
                                 "starts a new sandbox and earlier files are gone"), True
        # Stored before the SDK posts it: a crash after this line replays instead of re-running.
        self.outbox.finish(tid, content, is_error)
        if _take(record_token):
            self._record(name, raw, "error" if is_error else "ok", is_error, time.perf_counter() - started, call)
        return content, is_error, "error" if is_error else "ok"

    async def _execute(self, name: str, args: dict[str, Any]) -> tuple[Content, bool]:
        try:
            sb = await self.slot.sandbox(self._sandbox_limiter)
        except (SandboxUnavailable, SandboxError) as e:
            return f"{name}: this session's sandbox could not be started: {e}", True
        op_args, timeout = op_request(name, args)
        try:
            value = await self._call_unless_aborted(lambda: sb.call(name, timeout=timeout, **op_args))
        except _Aborted:
            return f"{name}: {SHUTDOWN_TEXT}", True
        except ToolOpError as e:
            return failure_text(name, str(e)), True
        except SandboxError as e:
            log_event(log, logging.WARNING, "sandbox_failed", f"sandbox failed during {name}: {e}", tool=name,
                      session_id=self.slot.session_id)
            return (f"{name}: the sandbox stopped while running this call ({e}); the next call starts "
                    "a new sandbox and earlier files are gone"), True
        return result_content(name, value)

    async def _call_unless_aborted(self, fn: Callable[[], Any]) -> Any:
        """Run the blocking sandbox call in a thread; give up if the worker aborts in-flight calls.

        The SDK runs tools inside a shielded scope, so only our own scope, cancelled by
        `SessionSlot.abort_calls()`, can end the wait (no watcher task per call).
        """
        if self.slot.abort.is_set():
            raise _Aborted
        with anyio.CancelScope() as scope:
            self.slot._scopes.add(scope)
            try:
                return await anyio.to_thread.run_sync(fn, limiter=self._sandbox_limiter, abandon_on_cancel=True)
            finally:
                self.slot._scopes.discard(scope)
        raise _Aborted  # only reached when the scope was cancelled


class _Aborted(Exception):
    pass


def _nothing() -> None:
    pass


def _stopped_text(name: str, e: BaseException) -> str:
    return (f"{name}: the sandbox stopped while running this call ({e}); the next call starts a new sandbox "
            "and earlier files are gone")


def _take(token: list[bool]) -> bool:
    """Take a one-shot token (atomic under the GIL: list.pop)."""
    try:
        return token.pop()
    except IndexError:
        return False


SHUTDOWN_TEXT = ("interrupted: the worker shut down while this call was running and its sandbox was removed. "
                 "The call was not completed and will not be run again; check the state and retry if needed.")


# ---------------------------------------------------------------------- pure helpers (unit-tested)

@functools.cache
def input_schema(name: str) -> dict[str, Any]:
    """The JSON schema of the reference tool's input model (what `beta_async_tool` derives from it)."""
    return INPUT_MODELS[name].model_json_schema()


def validate_input(name: str, raw: object) -> dict[str, Any]:
    """Check `raw` against the SDK's input model; return the fields that were given."""
    if not isinstance(raw, dict):
        raise ToolError(f"{name}: input must be an object")
    try:
        INPUT_MODELS[name].model_validate(raw)
    except pydantic.ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc']) or 'input'}: {err['msg']}" for err in e.errors()[:5]
        )
        raise ToolError(f"{name}: invalid input: {problems}") from None
    if name == "bash":
        cmd = raw.get("command")
        if isinstance(cmd, str) and len(cmd) > MAX_COMMAND_CHARS:
            raise ToolError(f"bash: command is {len(cmd)} characters, over the {MAX_COMMAND_CHARS}-character limit")
    if name == "write":
        size = len(raw["content"].encode("utf-8", "replace"))
        if size > MAX_WRITE_BYTES:
            raise ToolError(f"write: content is {size} bytes, over the {MAX_WRITE_BYTES}-byte limit of one write")
    if name == "edit":
        for key in ("old_string", "new_string"):
            if len(raw[key]) > MAX_EDIT_STRING_CHARS:
                raise ToolError(f"edit: {key} is {len(raw[key])} characters, over the "
                                f"{MAX_EDIT_STRING_CHARS}-character limit (edit works on files up to 256 KiB)")
    known = set(INPUT_MODELS[name].model_fields)
    return {k: v for k, v in raw.items() if k in known and v is not None}


def op_request(name: str, args: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """The in-sandbox op's arguments and the host-side deadline for it."""
    if name == "bash":
        timeout_ms = args.get("timeout_ms")
        t = timeout_ms / 1000.0 if timeout_ms else BASH_DEFAULT_TIMEOUT
        t = min(max(t, 0.001), BASH_MAX_TIMEOUT)
        req = {"shell": "default", "_max_timeout": BASH_MAX_TIMEOUT}
        req.update({k: args[k] for k in ("command", "restart", "timeout_ms") if k in args})
        return req, t + OP_GRACE_S
    return dict(args), 60.0


def failure_text(name: str, message: str) -> str:
    """The in-sandbox op's error as the model should read it."""
    text = message[len(_FAILURE_PREFIX):] if message.startswith(_FAILURE_PREFIX) else f"{name}: {message}"
    return text


def result_content(name: str, value: object) -> tuple[Content, bool]:
    """Map an op's return value to (content, is_error), as the reference tools would."""
    if not isinstance(value, dict):
        return f"{name}: the sandbox returned a malformed result", True
    if name == "bash":
        out = value.get("output")
        code = value.get("exit_code")
        if not isinstance(out, str) or not isinstance(code, int):
            return "bash: the sandbox returned a malformed result", True
        return out, code != 0
    blocks = value.get("blocks")
    if isinstance(blocks, list):
        clean = []
        for b in blocks:
            src = b.get("source") if isinstance(b, dict) else None
            if not (isinstance(b, dict) and b.get("type") in ("image", "document") and isinstance(src, dict)
                    and src.get("type") == "base64" and isinstance(src.get("data"), str)
                    and isinstance(src.get("media_type"), str)):
                return f"{name}: the sandbox returned a malformed content block", True
            clean.append({"type": b["type"], "source": {"type": "base64", "media_type": src["media_type"],
                                                        "data": src["data"]}})
        return clean, False
    text = value.get("text")
    if not isinstance(text, str):
        return f"{name}: the sandbox returned a malformed result", True
    return text, False
