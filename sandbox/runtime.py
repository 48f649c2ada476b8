"""The runtime: one hardened container per session, driven through the Docker SDK.

create -> (lease a uid, attach, start, hello, agent ready) -> exec / call ... -> destroy.
Every container carries labels naming its session, the managing host, the owning
process and its uid. A sandbox dies with the process that created it (its
agent exits when that process's end of the attach stream closes) and at its
session time limit (inside the sandbox, with a host timer as a second line);
:func:`Runtime.gc` removes anything left. Containers are cattle: never reused
across sessions.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import select
import signal
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Protocol, Union

from sandbox import lazylog
from sandbox import spec as specmod
from sandbox.channel import AgentChannel, ChannelClosed
from sandbox.engine import Engine, EngineError, NotFound, engine_socket_path
from sandbox.hogs import CGROUP_V2 as _CGROUP_V2
from sandbox.hogs import HogDemoter, cpu_cgroup
from sandbox.identity import Identity, IdentityAllocator, IdentityError
from sandbox.policycache import CompiledPolicy

if TYPE_CHECKING:
    from sandbox.egress.rules import EgressPolicy
    from sandbox.policy import Policy

# What create() takes: a Policy, or the same policy compiled (sandbox.policycache). Either way the
# sandbox is made from sandbox.spec.policy_facts() by sandbox.spec.body_from_facts().
PolicyLike = Union["Policy", CompiledPolicy]

log = lazylog.get(__name__)  # logging is imported when something is logged

# Distinct exit statuses of `sandbox exec` when a limit stopped the command.
LIMIT_EXIT_CODES: dict[str, int] = {
    "timeout": 241, "memory": 242, "pids": 243, "output": 244, "fsize": 245, "cpu": 246,
}
SANDBOX_ERROR_EXIT = 240
LIMIT_WORDS: dict[str, str] = {
    "timeout": "the command ran past its time limit and was killed",
    "memory": "the sandbox ran out of memory (cgroup limit) and the kernel killed the command",
    "pids": "the sandbox reached its process limit (pids cgroup); forks failed",
    "output": "the command's output exceeded the output cap; it was stopped and the output truncated",
    "fsize": "the command tried to write a file larger than the file size limit (RLIMIT_FSIZE)",
    "cpu": "the command used up its CPU time limit (RLIMIT_CPU)",
}
_LIMIT_ORDER = ("memory", "pids", "fsize", "cpu", "output", "timeout")
HOST_GRACE_S = 5.0
READY_TIMEOUT_S = 60.0
# Under gVisor a workload can open the agent's stdin through /proc and keep it open, so the
# owner's death would not reach the agent as EOF: there the host also sends a beat every
# BEAT_S and the agent exits when it has heard nothing authentic for WATCHDOG_S.
BEAT_S = 1.0
WATCHDOG_S = 5.0
EOF_TEARDOWN_S = 2.0  # how long destroy() waits for the agent to exit on stdin EOF before it kills
STDIN_CHUNK = 64 << 10
STDIN_WINDOW = 1 << 20  # streamed stdin in flight (sent, not yet written into the command)

OutputCallback = Callable[[int, bytes], None]


class SandboxError(RuntimeError):
    """The sandbox could not be created or stopped working."""


class EgressProvider(Protocol):
    def register(self, session_id: str, policy: EgressPolicy) -> Path: ...
    def unregister(self, session_id: str) -> None: ...
    def status(self) -> dict[str, Any] | None: ...
    def prune(self, keep: Any) -> list[str]: ...


class ExecResult:
    """What one command did, as the runtime saw it (a plain class: `dataclasses` imports `inspect`,
    ~8 ms of a cold `sandbox exec`)."""

    __slots__ = ("exit_code", "stdout", "stderr", "signal", "limit", "limits", "truncated", "duration", "error")

    def __init__(self, exit_code: int, stdout: bytes = b"", stderr: bytes = b"", signal: int | None = None,
                 limit: str | None = None, limits: list[str] | None = None, truncated: bool = False,
                 duration: float = 0.0, error: str | None = None):
        self.exit_code, self.stdout, self.stderr, self.signal = exit_code, stdout, stderr, signal
        self.limit, self.limits, self.truncated = limit, list(limits) if limits is not None else [], truncated
        self.duration, self.error = duration, error

    def _fields(self) -> tuple[Any, ...]:
        return tuple(getattr(self, k) for k in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ExecResult) and self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]  # mutable, as the dataclass was

    def __repr__(self) -> str:
        return "ExecResult(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"

    def to_json(self) -> dict[str, Any]:
        return {"exit_code": self.exit_code, "signal": self.signal, "limit": self.limit, "limits": self.limits,
                "limit_message": LIMIT_WORDS.get(self.limit or ""), "truncated": self.truncated,
                "duration": round(self.duration, 4), "error": self.error,
                "stdout": self.stdout.decode("utf-8", "replace"), "stderr": self.stderr.decode("utf-8", "replace")}


def default_state_dir() -> Path:
    """The runtime's state directory: one layout for every part (:mod:`sandbox.paths`)."""
    from sandbox.paths import runtime_dir

    return runtime_dir()


def _start_ticks(pid: int | str) -> int:
    """Process start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[19])


def owner_token(kind: str) -> str:
    """Identifies this process across pid reuse: kind, pid and process start time."""
    return f"{kind}:{os.getpid()}:{_start_ticks('self')}"


def owner_alive(token: str) -> bool:
    try:
        _, pid, started = token.rsplit(":", 2)
        return _start_ticks(int(pid)) == int(started)
    except (ValueError, OSError, IndexError):
        return False


def _compiled(policy: PolicyLike) -> CompiledPolicy:
    return policy if isinstance(policy, CompiledPolicy) else CompiledPolicy.from_policy(policy)


def check_host_path(path: str) -> str:
    """:func:`sandbox.policy.check_host_path` (imported when a host path is actually given)."""
    from sandbox.policy import check_host_path as check

    return check(path)


def _agent_pidfd(sb: "Sandbox") -> int | None:
    """A pidfd of the sandbox's PID 1, if that process is still the one create() saw (its start time
    matches: not a reused pid); None without pidfds (Linux < 5.3) or when it is gone."""
    if sb.agent_pid is None:
        return None
    pid, started = sb.agent_pid
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None
    try:
        if _start_ticks(pid) == started:
            return fd
    except (OSError, ValueError, IndexError):
        pass
    os.close(fd)
    return None


def _readable_within(fd: int, timeout_s: float) -> bool:
    """poll(2), not select(2): select refuses a descriptor numbered 1024 or more, which a process holding
    hundreds of sandboxes' channels and pidfds reaches (destroy then fell back to the engine's kill)."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(timeout_s * 1000))


def _safe_name(session_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", session_id)[:48]


# ----------------------------------------------------------------- cgroups

class StartupBoost:
    """A new sandbox's CPU weight, raised while it starts and put back once its agent is ready.

    Sandboxes share the host's CPUs by weight: with many neighbours busy, a new sandbox's start
    (runc's init setting up the container, then the agent's interpreter and imports, all in the
    sandbox's own cgroup) got 1/N of the CPU and a create took 7-11x longer
    (bench/bench_neighbours.py --storm). The host raises the weight of the new cgroup from outside
    before the workload exists and restores the value a new cgroup has (what the engine leaves
    when the policy sets no weight) when the agent says ready, so no workload ever runs with it.

    ``before_start(cid)`` makes the container's CPU cgroup itself, boosted, between the engine's
    create and start (the engine's cgroupfs driver then uses it as it finds it, so runc's init
    runs boosted too); ``StartupBoost(pid)`` boosts a started container's cgroup (any driver, but
    runc's init has already run by then). Best effort: no cgroup file, no boost."""

    FACTOR = 16

    def __init__(self, pid: int | None = None):
        self.file: Path | None = None
        self.original = ""
        self.made: Path | None = None  # a cgroup directory before_start() created
        if pid is None:
            return
        base = cpu_cgroup(pid)
        if base is not None:
            self._apply(base / ("cpu.weight" if _CGROUP_V2 else "cpu.shares"))

    @classmethod
    def before_start(cls, cid: str, parent: str = "docker") -> "StartupBoost":
        """The cgroup the engine's cgroupfs driver will put container ``cid`` in, made now and boosted."""
        b = cls()
        if not re.fullmatch(r"[0-9a-f]{64}", cid):
            return b
        root = Path("/sys/fs/cgroup") if _CGROUP_V2 else Path("/sys/fs/cgroup/cpu")
        d = root / parent / cid
        if not d.parent.is_dir():
            return b  # not the cgroupfs driver's layout (systemd driver, another parent)
        try:
            d.mkdir()
        except OSError:
            return b
        b.made = d
        b._apply(d / ("cpu.weight" if _CGROUP_V2 else "cpu.shares"))
        if b.file is None:
            b.discard()
        return b

    def confirm(self, pid: int) -> bool:
        """True if the started container really runs in the cgroup before_start() made."""
        return self.made is not None and self.made == cpu_cgroup(pid)

    def _apply(self, file: Path) -> None:
        cap = 10000 if file.name == "cpu.weight" else 262144
        try:
            self.original = file.read_text().strip()
            file.write_text(str(min(cap, int(self.original) * self.FACTOR)))
            self.file = file
        except (OSError, ValueError):
            self.file = None

    def end(self) -> None:
        if self.file is not None:
            try:
                self.file.write_text(self.original)
            except OSError:
                log.warning("could not restore the CPU weight in %s", self.file)
            self.file = None

    def discard(self) -> None:
        """Undo before_start() for a container that did not start in it (the directory is empty)."""
        self.end()
        if self.made is not None:
            try:
                self.made.rmdir()
            except OSError:
                pass
            self.made = None



def _only_init(cgroup_dir: Path) -> int | None:
    """The pid of the one process in a cgroup directory if it is PID 1 of its own PID namespace
    (a container's init), else None (none, several, another kind of process, unreadable)."""
    try:
        pids = (cgroup_dir / "cgroup.procs").read_bytes().split()
        if len(pids) != 1 or not pids[0].isdigit():
            return None
        for line in Path(f"/proc/{int(pids[0])}/status").read_bytes().splitlines():
            if line.startswith(b"NSpid:"):
                ns = line.split()[1:]
                return int(pids[0]) if len(ns) > 1 and ns[-1] == b"1" else None
    except (OSError, ValueError):
        pass
    return None


MEMORY_HIGH_FRACTION = 0.9


def set_memory_high(cgroup_dir: Path, memory_max: int) -> bool:
    """cgroup v2: throttle a sandbox's reclaim inside its own cgroup before its OOM limit.

    With only memory.max, an allocate-until-OOM loop drives direct reclaim that stalls the
    whole host; with memory.high below it, the kernel throttles and reclaims in the offending
    cgroup first. The engine has no setting for it, so the host writes it into the cgroup
    before_start() made (runc then sets memory.max and leaves memory.high alone)."""
    try:
        (cgroup_dir / "memory.high").write_text(str(int(memory_max * MEMORY_HIGH_FRACTION)))
        return True
    except OSError:
        return False


class CgroupCounters:
    """Reads the container's limit counters from the host (the agent is not trusted to report them)."""

    def __init__(self, pid: int):
        self.paths: dict[str, Path] = {}
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except OSError:
            return
        unified = Path("/sys/fs/cgroup/cgroup.controllers").exists()  # pure v2, not hybrid
        for line in lines:
            _, controllers, path = line.split(":", 2)
            if controllers == "" and unified:
                base = Path("/sys/fs/cgroup") / path.lstrip("/")
                self.paths = {"memory": base, "pids": base, "v2": base}
            for c in controllers.split(","):
                if c in ("memory", "pids") and not unified:
                    self.paths[c] = Path("/sys/fs/cgroup") / c / path.lstrip("/")

    @staticmethod
    def _field(path: Path, name: str) -> int | None:
        try:
            for line in path.read_text().splitlines():
                k, _, v = line.partition(" ")
                if k == name:
                    return int(v)
        except (OSError, ValueError):
            return None
        return None

    def empty(self) -> bool:
        """No task left in the sandbox's pids cgroup (or the cgroup is gone, or unknown)."""
        pids = self.paths.get("pids")
        if pids is None:
            return True
        try:
            return not (pids / "cgroup.procs").read_text().strip()
        except OSError:
            return True

    def snapshot(self) -> dict[str, int | None]:
        mem, pids = self.paths.get("memory"), self.paths.get("pids")
        oom = None
        if mem is not None:
            oom = self._field(mem / ("memory.events" if "v2" in self.paths else "memory.oom_control"), "oom_kill")
        return {"oom_kill": oom, "pids_max": self._field(pids / "pids.events", "max") if pids else None}


# ----------------------------------------------------------------- workspaces

def make_disk_workspace(root: Path, session: str, size_mb: int, uid: int, gid: int) -> Path:
    """A size-capped ext4 filesystem in a sparse file, loop-mounted: writes past the cap get ENOSPC."""
    import shutil
    import subprocess  # here, not at the top: the cold `sandbox exec` path never needs them
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    img, mnt = root / f"{session}.img", root / session
    mnt.mkdir(mode=0o700)
    with open(img, "wb") as f:
        f.truncate(size_mb << 20)
    subprocess.run(["mkfs.ext4", "-q", "-m", "0", "-E", f"root_owner={uid}:{gid}", str(img)],
                   check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop,nosuid,nodev", str(img), str(mnt)], check=True, capture_output=True)
    shutil.rmtree(mnt / "lost+found", ignore_errors=True)
    os.chmod(mnt, 0o700)
    return mnt


def remove_disk_workspace(root: Path, session: str) -> None:
    import shutil
    import subprocess

    mnt, img = root / session, root / f"{session}.img"
    if os.path.ismount(mnt):
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    shutil.rmtree(mnt, ignore_errors=True)
    img.unlink(missing_ok=True)


# ----------------------------------------------------------------- sandbox

class Sandbox:
    """A running sandbox. Thread-safe: several calls may run at once."""

    def __init__(self, runtime: "Runtime", policy: PolicyLike, session_id: str, container_id: str,
                 channel: AgentChannel, counters: CgroupCounters, workspace_dir: Path | None, egress: bool,
                 identity: Identity | None = None, owns_identity: bool = True):
        self.runtime = runtime
        self.compiled = _compiled(policy)
        self.identity = identity
        self._owns_identity = owns_identity
        self.uid = identity.uid if identity else None
        self.gid = identity.gid if identity else None
        self.session_id = session_id
        self.id = container_id
        self.channel = channel
        self.counters = counters
        self.workspace_dir = workspace_dir
        self.egress = egress
        self.host_workspace = False  # a host directory is mounted as the workspace (set by create)
        self.agent_pid: tuple[int, int] | None = None  # host pid and start time of its PID 1 (the agent)
        self.created = time.monotonic()
        self._destroyed = False
        self._lock = threading.Lock()
        # A sandbox never outlives its policy's session limit, whoever forgets to destroy it.
        self._deadline = threading.Timer(self.compiled.session_s, self._expire)
        self._deadline.daemon = True
        self._deadline.start()
        self.expired = False
        if self.compiled.runtime == "runsc":
            threading.Thread(target=self._beat, name=f"beat-{container_id[:12]}", daemon=True).start()

    def _beat(self) -> None:
        while not self._destroyed and not self.channel.closed.wait(BEAT_S):
            try:
                self.channel.send({"op": "beat"})
            except ChannelClosed:
                return

    def _expire(self) -> None:
        self.expired = True
        self.runtime.log_event("session time limit reached; sandbox destroyed", self)
        self.destroy()

    @property
    def policy(self) -> Policy:
        """The full policy model (loaded on first use when the sandbox came from a cached policy)."""
        return self.compiled.policy()

    @property
    def alive(self) -> bool:
        return not self._destroyed and not self.channel.closed.is_set()

    def exec(self, argv: list[str], *, timeout: float | None = None, env: dict[str, str] | None = None,
             cwd: str | None = None, stdin: bytes | BinaryIO | None = None, max_output: int | None = None,
             on_output: OutputCallback | None = None) -> ExecResult:
        """Run argv inside the sandbox; stream output to ``on_output`` or collect it.

        ``stdin``: bytes, or a binary file object streamed in chunks with flow control
        (at most STDIN_WINDOW bytes in flight: memory stays bounded on both sides)."""
        timeout = float(timeout or self.compiled.call_s)
        cap = int(max_output or self.compiled.output_max)
        before = self.counters.snapshot()
        started = time.monotonic()
        try:
            rid, q = self.channel.open_request()
        except ChannelClosed as e:
            return ExecResult(exit_code=SANDBOX_ERROR_EXIT, error=f"sandbox is not running: {e}")
        req: dict[str, Any] = {"id": rid, "op": "exec", "argv": argv, "timeout": timeout, "max_output": cap}
        if env:
            req["env"] = env
        if cwd:
            req["cwd"] = cwd
        stream: _StdinStream | None = None
        if isinstance(stdin, (bytes, bytearray, memoryview)):
            req["stdin"] = base64.b64encode(bytes(stdin)).decode()
        elif stdin is not None:
            req["stdin_stream"] = True
            stream = _StdinStream(self.channel, rid, stdin)
        out, err = bytearray(), bytearray()
        received = 0
        host_limits: list[str] = []
        exit_ev: dict[str, Any] | None = None
        try:
            self.channel.send(req)
            if stream is not None:
                stream.start()
            deadline = started + timeout + HOST_GRACE_S
            while exit_ev is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    host_limits.append("timeout")
                    self.runtime.log_event("host_timeout", self)
                    self.destroy()  # the agent did not enforce the timeout: nothing inside is trusted now
                    break
                try:
                    ev = q.get(timeout=min(remaining, 1.0))
                except Exception:  # queue.Empty
                    continue
                if ev is None:
                    self._after_channel_loss()
                    return self._finish(ExecResult(exit_code=SANDBOX_ERROR_EXIT, stdout=bytes(out), stderr=bytes(err),
                                                   error=f"sandbox agent stopped: {self.channel.close_reason}",
                                                   duration=time.monotonic() - started), before)
                kind = ev.get("ev")
                if kind == "stdin_ack":
                    if stream is not None:
                        stream.ack(ev.get("n"))
                    continue
                if kind == "out":
                    try:
                        data = base64.b64decode(ev.get("data", ""), validate=True)
                    except (ValueError, TypeError):
                        continue
                    room = cap - received
                    if room <= 0:
                        if "output" not in host_limits:
                            host_limits.append("output")
                            self._cancel(rid)
                        continue
                    data = data[:room]
                    received += len(data)
                    fd = 2 if ev.get("fd") == 2 else 1
                    if on_output is not None:
                        on_output(fd, data)
                    else:
                        (err if fd == 2 else out).extend(data)
                elif kind in ("exit", "error"):
                    exit_ev = ev
        finally:
            if stream is not None:
                stream.stop()
            self.channel.finish_request(rid)
        duration = time.monotonic() - started
        if exit_ev is None:
            res = ExecResult(exit_code=SANDBOX_ERROR_EXIT, stdout=bytes(out), stderr=bytes(err), duration=duration)
        elif exit_ev.get("ev") == "error":
            res = ExecResult(exit_code=SANDBOX_ERROR_EXIT, stdout=bytes(out), stderr=bytes(err), duration=duration,
                             error=str(exit_ev.get("message", "agent error"))[:500])
        else:
            code = exit_ev.get("code")
            sig = exit_ev.get("signal")
            res = ExecResult(exit_code=code if isinstance(code, int) else SANDBOX_ERROR_EXIT, stdout=bytes(out),
                             stderr=bytes(err), signal=sig if isinstance(sig, int) else None, duration=duration,
                             error=str(exit_ev["error"])[:500] if exit_ev.get("error") else None)
            agent_limit = exit_ev.get("limit")
            # Trust the agent's word only where the host can confirm it.
            if agent_limit == "timeout" and duration >= timeout * 0.99:
                host_limits.append("timeout")
            if agent_limit == "output" and received >= cap:
                host_limits.append("output")
            if duration > timeout + HOST_GRACE_S and "timeout" not in host_limits:
                host_limits.append("timeout")  # the host's own clock says it ran past its limit
        res.limits = host_limits
        return self._finish(res, before)

    def _after_channel_loss(self) -> None:
        """A forged frame or an expired session: nothing from inside is trusted; the sandbox goes."""
        if self.channel.violation:
            self.runtime.log_event("channel integrity violation (a frame failed authentication); sandbox destroyed", self)
            self.destroy()
        elif self.channel.expired:
            self.expired = True
            self.destroy()

    def _cancel(self, rid: int) -> None:
        try:
            rid2, _ = self.channel.open_request()
            self.channel.send({"id": rid2, "op": "cancel", "target": rid})
            self.channel.finish_request(rid2)
        except ChannelClosed:
            pass

    def _finish(self, res: ExecResult, before: dict[str, int | None]) -> ExecResult:
        after = self.counters.snapshot()
        found = set(res.limits)
        for key, name in (("oom_kill", "memory"), ("pids_max", "pids")):
            b, a = before.get(key), after.get(key)
            if a is not None and b is not None and a > b:
                found.add(name)
        if res.signal == signal.SIGXFSZ or res.exit_code == 128 + signal.SIGXFSZ:
            found.add("fsize")
        if res.signal == signal.SIGXCPU or res.exit_code == 128 + signal.SIGXCPU:
            found.add("cpu")
        res.limits = [n for n in _LIMIT_ORDER if n in found]
        res.limit = res.limits[0] if res.limits else None
        res.truncated = "output" in found
        return res

    def call(self, op: str, timeout: float = 60.0, **args: Any) -> Any:
        """Run one registered agent op (the tools' file operations); returns its value or raises."""
        rid, q = self.channel.open_request()
        try:
            self.channel.send({"id": rid, "op": op, **args})
            deadline = time.monotonic() + timeout + HOST_GRACE_S
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SandboxError(f"sandbox op {op} timed out")
                try:
                    ev = q.get(timeout=min(remaining, 1.0))
                except Exception:  # queue.Empty
                    continue
                if ev is None:
                    self._after_channel_loss()
                    raise SandboxError(f"sandbox agent stopped: {self.channel.close_reason}")
                if ev.get("ev") == "result":
                    if ev.get("ok"):
                        return ev.get("value")
                    raise ToolOpError(str(ev.get("error", "failed"))[:2000])
                if ev.get("ev") == "error":
                    raise ToolOpError(str(ev.get("message", "failed"))[:2000])
        finally:
            self.channel.finish_request(rid)

    def destroy(self, wait: bool = True) -> None:
        """End the sandbox (AutoRemove deletes it) and release what it held.

        A runc sandbox is ended through its agent, PID 1 (SIGKILL on its pidfd, or stdin EOF
        where this process may not signal it), and this returns once the kernel shows every
        process of it gone (PID 1's pidfd); otherwise (gVisor, no pidfd,
        no sign within EOF_TEARDOWN_S) through the engine's kill. ``wait=False``, for a
        process about to exit: where the kill is needed, it is sent without waiting for the
        engine's answer (not for a sandbox with a host or disk workspace or egress)."""
        with self._lock:
            if self._destroyed:
                return
            self._destroyed = True
        self._deadline.cancel()
        self.runtime._teardown(self, wait=wait)


    # -- added for the worker's event loop: `call` without a thread that blocks until the result
    def start_call(self, op: str, on_done: Callable[[Any, BaseException | None], None],
                   **args: Any) -> Callable[[], None]:
        """Send one registered agent op (as `call` does) and return at once. `on_done(value, None)` or
        `on_done(None, error)` runs once, on the thread that reads the channel (the hub's, or an event loop's
        after `channel.read_on_loop`) or the thread that closes the channel, with `error` a ToolOpError or
        SandboxError as `call` would raise. The caller keeps the deadline: on giving up it calls the
        returned function, which ends the request (no `on_done` after it returns, unless that is already
        running). After a SandboxError the caller runs
        `after_channel_loss()` (off the reader thread): a forged frame or an expired session ends the
        sandbox, as `call` does. Raises ChannelClosed if the channel is already gone."""
        once = [True]  # the outcome is given once (list.pop is atomic)
        rids: list[int] = []

        def take() -> bool:
            try:
                return once.pop()
            except IndexError:
                return False

        def sink(ev: dict[str, Any] | None) -> None:
            if ev is None:
                outcome: tuple[Any, BaseException | None] = (
                    None, SandboxError(f"sandbox agent stopped: {self.channel.close_reason}"))
            elif ev.get("ev") == "result":
                outcome = ((ev.get("value"), None) if ev.get("ok")
                           else (None, ToolOpError(str(ev.get("error", "failed"))[:2000])))
            elif ev.get("ev") == "error":
                outcome = (None, ToolOpError(str(ev.get("message", "failed"))[:2000]))
            else:
                return
            if not take():
                return
            if rids:
                self.channel.finish_request(rids[0])
            on_done(*outcome)

        rid = self.channel.open_request_with(sink)
        rids.append(rid)
        try:
            self.channel.send({"id": rid, "op": op, **args})
        except BaseException:
            self.channel.finish_request(rid)
            if take():
                raise
            return lambda: None  # the channel closed first: `on_done` has had its SandboxError
        return lambda: self.channel.finish_request(rid)

    def after_channel_loss(self) -> None:
        """What `call` does when the channel ends mid-request (see `start_call`): blocking."""
        self._after_channel_loss()

class _StdinStream:
    """Feeds a file object into a running exec: chunks over the channel, acked by the agent."""

    def __init__(self, channel: AgentChannel, rid: int, src: BinaryIO):
        self.channel, self.rid, self.src = channel, rid, src
        self._cond = threading.Condition()
        self._inflight = 0
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=f"stdin-{rid}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def ack(self, n: object) -> None:
        with self._cond:
            if isinstance(n, int) and n > 0:
                self._inflight = max(0, self._inflight - n)
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def _run(self) -> None:
        read = getattr(self.src, "read1", None) or self.src.read
        try:
            while True:
                with self._cond:
                    while self._inflight >= STDIN_WINDOW and not self._stopped:
                        self._cond.wait(1.0)
                    if self._stopped:
                        return
                chunk = read(STDIN_CHUNK)
                if not chunk:
                    break
                with self._cond:
                    if self._stopped:
                        return
                    self._inflight += len(chunk)
                self.channel.send({"op": "stdin", "target": self.rid, "data": base64.b64encode(chunk).decode()})
            self.channel.send({"op": "stdin", "target": self.rid, "eof": True})
        except (ChannelClosed, OSError, ValueError):
            return


class ToolOpError(Exception):
    """A sandbox op reported failure (message comes from inside the sandbox: untrusted text)."""


# ----------------------------------------------------------------- runtime

class Runtime:
    def __init__(self, client: Any = None, state_dir: Path | None = None,
                 owner_kind: str = "cli", egress: EgressProvider | None = None):
        self._client = client
        sock = engine_socket_path()
        if sock is None:
            raise SandboxError("DOCKER_HOST must be a local unix:// socket for the sandbox runtime")
        self.engine = Engine(sock)
        self.state_dir = state_dir or default_state_dir()
        self.owner = owner_token(owner_kind)
        self._egress = egress
        self._events: list[tuple[float, str, str]] = []
        self.event_hook: Callable[[str, Sandbox], None] | None = None
        self.identities = IdentityAllocator(carried=self._id_carried)
        self.hogs = HogDemoter()  # this owner's sandboxes that exceed their CPU quota yield (sandbox/hogs.py)

    def _id_carried(self, n: int) -> bool:
        """Does a container the engine still lists (any owner, any state dir, any host label)
        carry ``n`` as its uid or gid? Two filtered queries, whatever the number of sandboxes."""
        return any(self.engine.containers([f"{specmod.LABEL_MANAGED}=true", f"{key}={n}"])
                   for key in (specmod.LABEL_UID, specmod.LABEL_GID))

    def lease_identity(self, policy: PolicyLike) -> Identity:
        """The uid/gid a sandbox of this policy will run as: pinned by the policy, or any free one."""
        if isinstance(policy, CompiledPolicy):
            uid, gid = policy.uid, policy.gid
        else:
            uid, gid = policy.user.uid, policy.user.gid
        try:
            if isinstance(uid, int) and isinstance(gid, int):
                return self.identities.acquire(uid, gid)
            return self.identities.acquire()
        except IdentityError as e:
            raise SandboxError(str(e)) from None

    @property
    def client(self) -> Any:
        """The Docker SDK client, for everything off the hot path (images, audit, tools)."""
        if self._client is None:
            import docker

            self._client = docker.from_env(timeout=120)
        return self._client

    def log_event(self, what: str, sb: Sandbox) -> None:
        log.warning("sandbox %s session=%s: %s", sb.id[:12], sb.session_id, what)
        if self.event_hook:
            self.event_hook(what, sb)

    @property
    def egress(self) -> EgressProvider:
        if self._egress is None:
            from sandbox.egress.manager import EgressManager

            self._egress = EgressManager(self.state_dir / "egress")
        return self._egress

    def create(self, policy: PolicyLike, session_id: str | None = None, workspace: Path | None = None,
               extra_labels: dict[str, str] | None = None, *, identity: Identity | None = None,
               ro_mounts: list[tuple[str | Path, str]] | None = None) -> Sandbox:
        """Create and start a sandbox for one session; returns once its agent is ready.

        ``identity``: a uid/gid lease the caller holds (e.g. for a session whose workspace
        outlives its sandboxes); without one the runtime leases one for this sandbox alone.
        ``ro_mounts``: extra host paths mounted read-only (checked like policy mounts)."""
        session_id = session_id or f"sess_{secrets.token_hex(8)}"
        name = f"sandbox-{_safe_name(session_id)}-{secrets.token_hex(3)}"
        ws_dir: Path | None = None
        managed_ws = False
        egress_dir: Path | None = None
        cid: str | None = None
        boost: list[StartupBoost] = []
        owns_identity = identity is None
        try:
            cp = _compiled(policy)
            if identity is None:
                identity = self.lease_identity(cp)
            ids = specmod.Ids(identity.uid, identity.gid)
            if workspace is not None:
                ws_dir = Path(check_host_path(str(Path(workspace).resolve())))
            elif cp.workspace_backing == "disk":
                ws_dir = make_disk_workspace(self.state_dir / "workspaces", name, cp.workspace_size_mb,
                                             ids.uid, ids.gid)
                managed_ws = True
            # Validation resolved these host paths when the policy was loaded (perhaps long ago,
            # from the cache): a symlink retargeted since then is caught here.
            for m in cp.facts["read_only_mounts"]:
                check_host_path(m["source"])
            if cp.egress:
                try:
                    egress_dir = self.egress.register(session_id, cp.policy().egress)
                except (ConnectionError, FileNotFoundError, TimeoutError) as e:
                    # not the engine: the proxy daemon's control socket
                    raise SandboxError(f"cannot reach the egress proxy daemon: {e}; "
                                       "see `sandbox egress status` and its daemon.log") from None
            extra_ro = tuple((check_host_path(str(Path(src).resolve())), str(target))
                             for src, target in (ro_mounts or []))
            binds = specmod.Binds(workspace_dir=str(ws_dir) if ws_dir else None,
                                  egress_dir=str(egress_dir) if egress_dir else None, ro_mounts=extra_ro)
            labels = dict(extra_labels or {})
            if managed_ws:
                labels["org.sandbox.workspace"] = name
            spec = specmod.body_from_facts(cp.facts, session_id, binds, owner=self.owner, extra_labels=labels,
                                           ids=ids)
            api = self.engine
            cid = api.create(spec.body, name=name)
            # A head start over busy neighbours for runc's init and the agent (StartupBoost).
            early = StartupBoost.before_start(cid) if cp.runtime != "runsc" else StartupBoost()
            boost.append(early)
            if _CGROUP_V2 and early.made is not None:
                set_memory_high(early.made, cp.facts["limits"]["memory_mb"] << 20)
            channel = AgentChannel(api.attach(cid))
            api.start(cid)
            channel.hello(cp.session_s, WATCHDOG_S if cp.runtime == "runsc" else None)
            found: list[int] = []

            def look_up() -> None:
                # The cgroup lookup needs the container's pid; find it while the agent starts,
                # and boost a cgroup that before_start() could not make. In the cgroup that
                # before_start() made for this container id, the one process is its init, the
                # agent (no workload exists before create() returns; it must be PID 1 of its PID
                # namespace): read there, not asked of
                # the engine, whose answer under load came after the agent's ready in 5 of 21
                # creates (by up to 7 ms).
                pid = _only_init(early.made) if early.made is not None else None
                if pid is None:
                    pid = api.inspect(cid).get("State", {}).get("Pid")
                    if pid and not early.confirm(int(pid)):
                        early.discard()
                        if not channel.ready.qsize():
                            boost.append(StartupBoost(int(pid)))
                if pid:
                    found.append(int(pid))

            t = threading.Thread(target=look_up, daemon=True)
            t.start()
            try:
                ready = channel.ready.get(timeout=READY_TIMEOUT_S)
            finally:
                t.join(timeout=30)
                for b in boost:
                    b.end()  # before any request: the workload never runs with the boost
            if ready.get("ev") != "ready":
                diag = channel.diagnostics.decode("utf-8", "replace")[-1000:]
                raise SandboxError(f"sandbox agent did not start: {channel.close_reason}; {diag}")
            pid = found[0] if found else api.inspect(cid)["State"]["Pid"]
            sb = Sandbox(self, cp, session_id, cid, channel, CgroupCounters(pid),
                         ws_dir if managed_ws else None, egress_dir is not None,
                         identity=identity, owns_identity=owns_identity)
            sb.host_workspace = workspace is not None
            try:
                sb.agent_pid = (int(pid), _start_ticks(pid))
            except (OSError, ValueError, IndexError):
                pass  # destroy() then uses the engine's kill
            self.hogs.watch(cid, int(pid))
            return sb
        except BaseException as e:
            if cid:
                self._remove_container(cid)
                for b in boost:
                    b.discard()
            if owns_identity and identity is not None:
                identity.release()
            if managed_ws:
                remove_disk_workspace(self.state_dir / "workspaces", name)
            if egress_dir is not None:
                self.egress.unregister(session_id)
            if isinstance(e, NotFound) and "image" in e.explanation.lower():
                raise SandboxError(f"image {policy.image} is not built; run `sandbox images build`") from None
            if isinstance(e, EngineError):
                raise SandboxError(f"Docker refused the sandbox: {e.explanation}") from None
            if isinstance(e, ValueError) and ro_mounts and not isinstance(e, SandboxError):
                raise SandboxError(f"refused mount: {e}") from None
            if isinstance(e, (ConnectionError, FileNotFoundError)):
                raise SandboxError(f"cannot reach the Docker engine at {self.engine.socket_path}: {e}") from None
            if isinstance(e, Exception) and not isinstance(e, SandboxError):
                raise SandboxError(f"could not start sandbox: {type(e).__name__}: {e}") from None
            raise

    def _remove_container(self, cid: str) -> None:
        """Kill; AutoRemove deletes it. Remove explicitly only if it never started."""
        try:
            self.engine.kill(cid)
            return
        except NotFound:
            return
        except EngineError:
            pass  # not running (created only): fall through to remove
        try:
            self.engine.remove(cid)
        except NotFound:
            pass
        except EngineError as e:
            if "already in progress" not in str(e):
                log.warning("could not remove sandbox %s: %s", cid[:12], e.explanation)

    def _teardown(self, sb: Sandbox, wait: bool = True) -> None:
        self.hogs.unwatch(sb.id)
        ended = False
        pidfd = _agent_pidfd(sb) if sb.compiled.runtime == "runc" and not sb.channel.closed.is_set() else None
        if pidfd is not None:
            # End it through its PID 1, the agent: SIGKILL on its pidfd (a signal from the host's PID
            # namespace reaches a namespace's init whatever it handles), or where this process may
            # not signal the sandbox's uid, stdin's EOF, on which the agent exits. As PID 1 its exit
            # kills every process left in the sandbox. Its pidfd turns readable only once PID 1 has
            # exited, which the kernel lets happen only after every other process of the PID
            # namespace is gone: proof the sandbox is dead, in ~2 ms by the signal and 5-7 ms by
            # the EOF, which travels through the engine (same run), against the engine's kill at
            # 50-90 ms (bench/bench_runtime.py). No sign within EOF_TEARDOWN_S: the kill does it.
            # (Under gVisor a workload could hold the agent's stdin open: there, always the kill.)
            try:
                try:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                except OSError:
                    sb.channel.close_stdin()
                ended = _readable_within(pidfd, EOF_TEARDOWN_S)
                # and the host's own view: no task left in the sandbox's cgroup (a straggler
                # still exiting must not share the uid with the lease's next holder)
                deadline = time.monotonic() + EOF_TEARDOWN_S
                while ended and not sb.counters.empty():
                    if time.monotonic() > deadline:
                        ended = False  # the engine's kill settles it
                        break
                    time.sleep(0.002)
            except (OSError, ValueError):
                ended = False
            finally:
                os.close(pidfd)
        if ended:
            sb.channel.close()
        elif not wait and sb.workspace_dir is None and not sb.egress and not sb.host_workspace:
            # a process about to exit: send the kill and go (its stdin closes with it as well)
            try:
                self.engine.kill_nowait(sb.id)
            except OSError as e:
                log.warning("could not send the kill for sandbox %s: %s; its agent exits on stdin EOF", sb.id[:12], e)
            sb.channel.close()
        else:
            sb.channel.close()
            self._remove_container(sb.id)
        if sb._owns_identity and sb.identity is not None:
            sb.identity.release()
        if sb.workspace_dir is not None:
            remove_disk_workspace(sb.workspace_dir.parent, sb.workspace_dir.name)
        if sb.egress:
            try:
                self.egress.unregister(sb.session_id)
            except Exception as e:  # noqa: BLE001 - teardown continues
                log.warning("egress unregister failed for %s: %s", sb.session_id, e)

    def list_managed(self, all_hosts: bool = False) -> list[dict[str, Any]]:
        labels = [f"{specmod.LABEL_MANAGED}=true"]
        if not all_hosts:
            labels.append(f"{specmod.LABEL_HOST}={socket.gethostname()}")
        return self.engine.containers(labels)

    def gc(self, *, everything: bool = False, owner_kind: str | None = None, mine: bool = False) -> list[str]:
        """Remove sandboxes of this host whose owning process is gone (or all with ``everything``;
        only this runtime's own with ``mine``)."""
        removed = []
        for c in self.list_managed():
            lab = c.get("Labels") or {}
            owner = lab.get(specmod.LABEL_OWNER, "")
            if mine:
                if owner == self.owner:
                    self._remove_container(c["Id"])
                    removed.append(c["Id"][:12])
                continue
            if owner == self.owner and not everything:
                continue
            if owner_kind and not owner.startswith(owner_kind + ":") and not everything:
                continue
            if everything or not owner_alive(owner):
                self._remove_container(c["Id"])
                ws = lab.get("org.sandbox.workspace")
                if ws:
                    remove_disk_workspace(self.state_dir / "workspaces", ws)
                removed.append(c["Id"][:12])
        self._prune_egress()
        return removed

    def _prune_egress(self) -> None:
        """Drop proxy sessions whose sandbox is gone (never starts the proxy daemon)."""
        try:
            if self.egress.status() is None:
                return
            live = {(c.get("Labels") or {}).get(specmod.LABEL_SESSION) for c in self.list_managed()
                    if c.get("State") == "running"}
            self.egress.prune(keep={s for s in live if s})
        except Exception as e:  # noqa: BLE001 - gc must finish whatever the proxy says
            log.warning("could not prune egress sessions: %s", e)
