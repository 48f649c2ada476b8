"""Worker benchmark (run by hand: `python3 bench/bench_worker.py [-n 30] [--worker both|sandbox|reference]`).

The whole loop: embedded control plane (real HTTP) -> worker (official SDK
worker, our sandbox tools) -> sandbox -> result posted back. The model side
(the "brain") works as a real one would: one open event stream per session
(SSE, `GET /v1/sessions/{id}/events/stream`), a tool call injected, its
`user.tool_result` read from the stream. Nothing polls. Measures
  - tool calls per second with 1, 4 and 16 concurrent sessions running `bash true`;
  - the loop's per-call overhead over the same op called directly
    (`Sandbox.call("bash", ...)` in a sandbox of the same policy): median, p99;
  - session start (new session -> first tool result) without and with a warm pool.

The same rows for the SDK's own reference worker (`EnvironmentWorker` with its
host-side `agent_toolset_20260401`: a persistent `/bin/bash` on this host, no
sandbox, no journal) through the same control plane, run in the same process
and printed with the ratio ours / reference. Its direct op is its own bash
tool called in-process. `load` is the 1-minute load average when each part ran.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx2 as httpx
from anyio.from_thread import start_blocking_portal

from sandbox.controlplane import ControlPlane, LocalAdmin
from sandbox.policy import load_policy
from sandbox.runtime import Runtime
from sandbox.worker import Worker
from sandbox.worker.admission import Admission, psutil_probe
from sandbox.worker.credentials import EnvironmentKey
from sandbox.worker.worker import WorkerConfig

USE_UVLOOP = os.environ.get("BENCH_UVLOOP", "1") != "0"
SETTLE_S = float(os.environ.get("BENCH_SETTLE_S", "4"))
IDLE_S = float(os.environ.get("BENCH_IDLE_S", "5"))
STARTS_ONLY = False  # --warm-starts: only session starts with the warm pool  # 16 idle sessions watched this long


def load() -> float:
    return os.getloadavg()[0]


CPU_ROWS: dict[int, dict[str, float]] = {}  # sessions -> part -> CPU seconds per call (last throughput run)
THREAD_ROWS: dict[int, dict[str, tuple[float, int, int]]] = {}  # sessions -> worker thread group -> per call
IDLE_ROW: dict[str, Any] = {}  # 16 live idle sessions: part -> CPU seconds per second, worker threads
PIDS: dict[str, int] = {}  # processes whose CPU per call is reported: "control plane", "worker"
CLK = os.sysconf("SC_CLK_TCK")
HOST_PARTS = ("host busy", "host wall", "cpu pressure")  # not CPU of a part: reported apart


def _stat(pid: int | str) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    parts = _stat(pid)
    return (int(parts[11]) + int(parts[12])) / CLK if parts else 0.0


def _processes() -> dict[int, tuple[int, str, float]]:
    """Every process: pid -> (parent pid, name, CPU seconds incl. its reaped children)."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        parts = _stat(d)
        try:
            with open(f"/proc/{d}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if parts:
            out[int(d)] = (int(parts[1]), comm, sum(int(x) for x in parts[11:15]) / CLK)
    return out


def _descendants(root: int, procs: dict[int, tuple[int, str, float]]) -> set[int]:
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        kids.setdefault(ppid, []).append(pid)
    out: set[int] = set()
    todo = list(kids.get(root, []))
    while todo:
        p = todo.pop()
        out.add(p)
        todo.extend(kids.get(p, []))
    return out


def _cgroup_cpu_s(cid: str) -> float:
    """CPU seconds of one container's cgroup (cgroup v1 cpuacct or v2, cgroupfs or systemd driver)."""
    for path in (f"/sys/fs/cgroup/cpuacct/docker/{cid}/cpuacct.usage",
                 f"/sys/fs/cgroup/cpuacct/system.slice/docker-{cid}.scope/cpuacct.usage"):
        try:
            with open(path) as f:
                return int(f.read()) / 1e9
        except OSError:
            pass
    for path in (f"/sys/fs/cgroup/docker/{cid}/cpu.stat", f"/sys/fs/cgroup/system.slice/docker-{cid}.scope/cpu.stat"):
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith("usage_usec "):
                        return int(line.split()[1]) / 1e6
        except OSError:
            pass
    return 0.0


def _host() -> dict[str, float]:
    """Busy CPU seconds over all cores (/proc/stat, minus idle and iowait) and the CPU pressure stall
    total (seconds some runnable task waited for a core, /proc/pressure/cpu)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    out = {"host busy": (sum(fields[:8]) - fields[3] - fields[4]) / CLK, "host wall": time.perf_counter()}
    try:
        with open("/proc/pressure/cpu") as f:
            out["cpu pressure"] = int(f.readline().rsplit("total=", 1)[1]) / 1e6
    except (OSError, IndexError, ValueError):
        pass
    return out


class Parts:
    """The CPU of every process a tool call goes through, by part: the worker (and, for the reference,
    the bash it runs on this host: its child processes), the control plane, the brain (this process),
    dockerd, containerd, the containerd shims and the sandboxes' cgroups (the agent and what it runs)
    of the worker's containers, and the host as a whole (busy cores, CPU pressure)."""

    def __init__(self) -> None:
        self.containers: list[str] = []
        self.shims: list[int] = []

    def begin(self) -> dict[str, float]:
        """Finds the worker's containers and their shims (once: the window does not create any)."""
        wpid = PIDS.get("worker")
        self.containers = []
        if wpid is not None:
            try:
                from sandbox.engine import Engine
                from sandbox.spec import LABEL_MANAGED, LABEL_OWNER
                for c in Engine().containers([f"{LABEL_MANAGED}=true"]):
                    owner = (c.get("Labels") or {}).get(LABEL_OWNER, "")
                    if f":{wpid}:" in owner and c.get("State") == "running":
                        self.containers.append(c["Id"])
            except Exception:  # noqa: BLE001 - no engine: the reference worker runs without one
                pass
        ids = set(self.containers)
        self.shims = []
        for pid, (_, comm, _) in _processes().items():
            if comm.startswith("containerd-shim"):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        argv = f.read().split(b"\0")
                except OSError:
                    continue
                i = argv.index(b"-id") if b"-id" in argv else -1
                if i >= 0 and i + 1 < len(argv) and argv[i + 1].decode() in ids:
                    self.shims.append(pid)
        return self.snapshot()

    def snapshot(self) -> dict[str, float]:
        procs = _processes()
        out: dict[str, float] = {}
        for name, pid in PIDS.items():
            out[name] = cpu_s(pid)
        wpid = PIDS.get("worker")
        if wpid is not None:
            # Its child processes (the reference's bash; our `mount`s), live and reaped.
            kids = _descendants(wpid, procs)
            parts = _stat(wpid)
            reaped = (int(parts[13]) + int(parts[14])) / CLK if parts else 0.0
            out["worker's child processes"] = reaped + sum(procs[p][2] for p in kids)
        t = os.times()
        out["brain"] = t.user + t.system
        out["dockerd"] = sum(c for _, n, c in procs.values() if n == "dockerd")
        out["containerd"] = sum(c for _, n, c in procs.values() if n == "containerd")
        out["shims"] = sum(procs[p][2] for p in self.shims if p in procs)
        out["sandboxes (cgroups)"] = sum(_cgroup_cpu_s(c) for c in self.containers)
        out.update(_host())
        return out


def worker_threads() -> dict[str, tuple[float, int, int]]:
    """The worker process's threads by name: (CPU seconds, voluntary, involuntary context switches).
    Names come from the worker process (`_name_os_threads`); a number in a name is dropped to group them.
    Process rows (`Parts`) come from /proc/<pid>/stat ticks instead, which also count threads that ended."""
    wpid = PIDS.get("worker")
    out: dict[str, tuple[float, int, int]] = {}
    if wpid is None:
        return out
    try:
        tids = os.listdir(f"/proc/{wpid}/task")
    except OSError:
        return out
    for tid in tids:
        base = f"/proc/{wpid}/task/{tid}"
        try:
            with open(f"{base}/comm") as f:
                name = re.sub(r"[-_ ]?\d+$", "", f.read().strip()) or "?"
            # schedstat: run time in ns, exact (stat's utime/stime are sampled at the 100 Hz tick, which
            # overcharges a thread that wakes on a timer, e.g. the hog watch, by several times).
            with open(f"{base}/schedstat") as f:
                run_ns = int(f.read().split()[0])
            vol = inv = 0
            with open(f"{base}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        vol = int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        inv = int(line.split()[1])
        except OSError:
            continue
        c, v, i = out.get(name, (0.0, 0, 0))
        out[name] = (c + run_ns / 1e9, v + vol, i + inv)
    return out


def thread_delta(a: dict[str, tuple[float, int, int]], b: dict[str, tuple[float, int, int]],
                 per: float) -> dict[str, tuple[float, int, int]]:
    """b - a per `per` (calls or seconds); a thread that ended in between counts from zero."""
    out = {}
    for k, (c, v, i) in b.items():
        c0, v0, i0 = a.get(k, (0.0, 0, 0))
        if c0 > c or v0 > v:  # fewer threads of this name now: count the survivors from zero
            c0, v0, i0 = 0.0, 0, 0
        out[k] = ((c - c0) / per, round((v - v0) / per), round((i - i0) / per))
    return out


def _name_os_threads() -> None:
    """In the worker process: every Python thread's name becomes its OS name (/proc/.../comm), so the
    parent can account CPU per thread group; and the switch interval under test, if one is given."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    orig = threading.Thread.run

    def run(self: threading.Thread) -> None:
        libc.prctl(15, self.name[:15].encode(), 0, 0, 0)  # PR_SET_NAME
        orig(self)

    threading.Thread.run = run  # type: ignore[method-assign]
    libc.prctl(15, b"main", 0, 0, 0)
    if os.environ.get("BENCH_SWITCH_INTERVAL"):
        import sys
        sys.setswitchinterval(float(os.environ["BENCH_SWITCH_INTERVAL"]))


class Brain:
    """The model side of one session: its event stream held open, tool calls injected, results read back."""

    def __init__(self, base_url: str, admin_key: str, session_id: str, *, admin: LocalAdmin | None = None,
                 http: httpx.Client | None = None) -> None:
        """`admin`, `http`: clients to share (building one costs tens of ms: not part of what is measured)."""
        self.sid = session_id
        self._own = admin is None
        self.admin = admin or LocalAdmin(base_url, admin_key)
        self._http = http or httpx.Client(timeout=httpx.Timeout(30.0, read=120.0))
        self._cm = self._http.stream("GET", f"{base_url}/v1/sessions/{session_id}/events/stream",
                                     headers=self.admin._headers)  # the admin's own headers (its key)
        resp = self._cm.__enter__()
        if resp.status_code >= 400:
            raise RuntimeError(f"event stream refused: {resp.status_code}")
        self._lines = resp.iter_lines()

    def _events(self) -> Iterator[dict[str, Any]]:
        name: str | None = None
        data: list[str] = []
        for line in self._lines:
            if line:
                field, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if field == "event":
                    name = value
                elif field == "data":
                    data.append(value)
                continue
            if name not in (None, "ping") and data:
                yield json.loads("\n".join(data))
            name, data = None, []

    def call(self, command: str) -> float:
        """Inject one `bash` call; seconds until its result arrived on the stream."""
        t = time.perf_counter()
        tid = self.admin.send_tool_use(self.sid, "bash", {"command": command})
        for ev in self._events():
            if ev.get("type") == "user.tool_result" and ev.get("tool_use_id") == tid:
                if ev.get("is_error"):
                    raise RuntimeError(f"tool call failed: {ev}")
                return time.perf_counter() - t
            if ev.get("type") in ("session.status_terminated", "session.deleted"):
                break
        raise RuntimeError(f"the event stream ended before the result of {tid}")

    def close(self, terminate: bool = True) -> None:
        try:
            if terminate:
                self.admin.terminate(self.sid)
        finally:
            self._cm.__exit__(None, None, None)
            if self._own:
                self._http.close()
                self.admin.close()


class RemoteControlPlane:
    """The embedded control plane (`ControlPlane`) in a process of its own, as `sandbox control-plane` runs it:
    the brain, the control plane and the worker then do not share one interpreter lock."""

    def __init__(self, state_dir: Path) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve_control_plane, args=(state_dir, child), daemon=True)

    def __enter__(self) -> RemoteControlPlane:
        self._proc.start()
        assert self._proc.pid is not None
        PIDS["control plane"] = self._proc.pid
        if not self._conn.poll(60):
            raise RuntimeError("the control plane process did not start")
        self.base_url, self.environment_id, self.environment_key, self.admin_key = self._conn.recv()
        return self

    def __exit__(self, *exc: object) -> None:
        self._conn.send("stop")
        self._proc.join(30)


class CPInfo:
    def __init__(self, base_url: str, environment_id: str, environment_key: str, admin_key: str) -> None:
        self.base_url, self.environment_id = base_url, environment_id
        self.environment_key, self.admin_key = environment_key, admin_key


@contextmanager
def in_process(kind: str, cp: Any, path: Path, warm: int) -> Iterator[None]:
    """A worker (`our` or `reference`) in a process of its own."""
    ctx = multiprocessing.get_context("spawn")
    conn, child = ctx.Pipe()
    info = (cp.base_url, cp.environment_id, cp.environment_key, cp.admin_key)
    proc = ctx.Process(target=_serve_worker, args=(kind, info, path, warm, child), daemon=True)
    proc.start()
    assert proc.pid is not None
    PIDS["worker"] = proc.pid
    try:
        if not conn.poll(300):
            raise RuntimeError(f"the {kind} worker process did not start")
        msg = conn.recv()
        if msg != "ready":
            raise RuntimeError(f"the {kind} worker process failed: {msg}")
        yield
    finally:
        conn.send("stop")
        proc.join(150)


def _serve_worker(kind: str, info: tuple[str, str, str, str], path: Path, warm: int, conn: Any) -> None:
    _name_os_threads()
    cp = CPInfo(*info)
    try:
        cm = our_worker(cp, path, warm) if kind == "our" else reference_worker(cp, path)
        with cm:
            conn.send("ready")
            conn.recv()
    except BaseException as e:  # noqa: BLE001 - said to the parent
        conn.send(f"{type(e).__name__}: {e}")
        raise


def _serve_control_plane(state_dir: Path, conn: Any) -> None:
    with ControlPlane(state_dir) as cp:
        conn.send((cp.base_url, cp.environment_id, cp.environment_key, cp.admin_key))
        conn.recv()


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


# ---------------------------------------------------------------------- the two workers

@contextmanager
def our_worker(cp: Any, state: Path, warm: int) -> Iterator[None]:
    cfg = WorkerConfig(base_url=cp.base_url, environment_id=cp.environment_id, state_dir=state, max_sessions=16,
                       warm=warm, lease_ttl=30, max_idle=300.0,
                       # The worker's own admission (memory, disk, busy sandboxes), with no load-average gate:
                       # other work on a shared host must not stall the benchmark.
                       admission=Admission(load_policy("worker"), psutil_probe(state), load_per_cpu=0.0))
    worker = Worker(cfg, EnvironmentKey(cp.environment_key, "bench"))
    # BackgroundWorker's loop, with the backend options under test (uvloop or not).
    with start_blocking_portal(backend_options={"use_uvloop": USE_UVLOOP}) as portal:
        fut = portal.start_task_soon(worker.run)

        async def started() -> None:
            with anyio.fail_after(120):
                await worker.started.wait()

        portal.call(started)
        if worker.startup_error is not None:
            raise worker.startup_error
        try:
            yield
        finally:
            portal.call(worker.request_stop)
            fut.result(timeout=120)


@contextmanager
def reference_worker(cp: Any, workdir: Path, concurrency: int = 16) -> Iterator[None]:
    """The SDK's own `EnvironmentWorker` (its reference toolset, host bash), `concurrency` of them on one loop
    (its `run()` serves one item at a time)."""
    from anthropic import AsyncAnthropic
    from anthropic.lib.environments import EnvironmentWorker

    workdir.mkdir(parents=True, exist_ok=True)
    with start_blocking_portal(backend_options={"use_uvloop": USE_UVLOOP}) as portal:
        scope: list[anyio.CancelScope] = []
        started = threading.Event()

        async def main() -> None:
            client = AsyncAnthropic(base_url=cp.base_url, auth_token=cp.environment_key, api_key=None, max_retries=2)
            with anyio.CancelScope() as cs:
                scope.append(cs)
                async with anyio.create_task_group() as tg:
                    for i in range(concurrency):
                        w = EnvironmentWorker(client, environment_id=cp.environment_id,
                                              environment_key=cp.environment_key, workdir=workdir,
                                              max_idle=300.0, memory_sync_interval=None, worker_id=f"ref-{i}")
                        tg.start_soon(w.run)
                    started.set()
            await client.close()

        fut = portal.start_task_soon(main)
        started.wait(30)
        try:
            yield
        finally:
            portal.call(scope[0].cancel)
            fut.result(timeout=60)


# ---------------------------------------------------------------------- measurements

def throughput(cp: Any, sessions: int, calls: int) -> float:
    admin = LocalAdmin(cp.base_url, cp.admin_key)
    brains = [Brain(cp.base_url, cp.admin_key, admin.create_session(cp.environment_id)) for _ in range(sessions)]
    admin.close()
    for b in brains:
        b.call("true")  # sandbox started; not counted
    time.sleep(1.0)  # what starting them left behind (threads, logs) is not counted either
    done = [0]
    lock = threading.Lock()

    def run(b: Brain) -> None:
        for _ in range(calls):
            b.call("true")
            with lock:
                done[0] += 1

    parts = Parts()
    cpu0 = parts.begin()
    th0 = worker_threads()
    t = time.perf_counter()
    threads = [threading.Thread(target=run, args=(b,)) for b in brains]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    cpu1 = parts.snapshot()
    th1 = worker_threads()
    n = max(1, done[0])
    CPU_ROWS[sessions] = {k: (cpu1[k] - cpu0.get(k, 0.0)) / (1 if k in HOST_PARTS else n) for k in cpu1}
    CPU_ROWS[sessions]["calls"] = n
    THREAD_ROWS[sessions] = thread_delta(th0, th1, n)
    if sessions == 16 and IDLE_S > 0:
        # The same 16 sessions and sandboxes, live and idle: what they cost with no call at all.
        time.sleep(1.0)
        c0, t0 = parts.snapshot(), worker_threads()
        time.sleep(IDLE_S)
        c1, t1 = parts.snapshot(), worker_threads()
        span = c1["host wall"] - c0["host wall"]
        IDLE_ROW.clear()
        IDLE_ROW.update({k: (c1[k] - c0.get(k, 0.0)) / span for k in c1 if k not in HOST_PARTS})
        IDLE_ROW["threads"] = thread_delta(t0, t1, span)
        IDLE_ROW["thread count"] = _thread_count()
    for b in brains:
        b.close()
    return done[0] / wall


def _thread_count() -> int:
    try:
        return len(os.listdir(f"/proc/{PIDS['worker']}/task"))
    except (OSError, KeyError):
        return 0


def per_call(cp: Any, n: int) -> list[float]:
    admin = LocalAdmin(cp.base_url, cp.admin_key)
    b = Brain(cp.base_url, cp.admin_key, admin.create_session(cp.environment_id))
    admin.close()
    b.call("true")
    b.call("true")
    out = [b.call("true") for _ in range(n)]
    b.close()
    return out


def session_starts(cp: Any, n: int, idle: float = 1.5) -> list[float]:
    """New session -> its first result, `idle` seconds after the previous session ended (the pool refills;
    longer than the 999 ms long-poll, so a worker that sleeps after an empty poll shows it)."""
    admin = LocalAdmin(cp.base_url, cp.admin_key)
    http = httpx.Client(timeout=httpx.Timeout(30.0, read=120.0))
    out = []
    for _ in range(n):
        t = time.perf_counter()
        sid = admin.create_session(cp.environment_id)
        b = Brain(cp.base_url, cp.admin_key, sid, admin=admin, http=http)
        b.call("true")
        out.append(time.perf_counter() - t)
        b.close()
        time.sleep(idle)
    http.close()
    admin.close()
    return out


def direct_sandbox(n: int) -> list[float]:
    rt = Runtime(owner_kind="bench")
    sb = rt.create(load_policy("worker"))
    try:
        sb.call("bash", command="true", timeout=30)
        out = []
        for _ in range(n):
            t = time.perf_counter()
            sb.call("bash", command="true", timeout=30)
            out.append(time.perf_counter() - t)
        return out
    finally:
        sb.destroy()


def direct_reference(n: int, workdir: Path) -> list[float]:
    """The reference bash tool called in-process, on the same kind of loop."""
    from anthropic.lib.tools._beta_functions import aclose_runnable_tool
    from anthropic.lib.tools.agent_toolset import AgentToolContext, beta_agent_toolset_20260401

    async def go() -> list[float]:
        workdir.mkdir(parents=True, exist_ok=True)
        async with AgentToolContext(workdir=workdir) as ctx:
            bash = next(t for t in beta_agent_toolset_20260401(ctx) if t.name == "bash")
            try:
                await bash.call({"command": "true"})
                out = []
                for _ in range(n):
                    t = time.perf_counter()
                    await bash.call({"command": "true"})
                    out.append(time.perf_counter() - t)
                return out
            finally:
                await aclose_runnable_tool(bash)

    return anyio.run(go, backend_options={"use_uvloop": USE_UVLOOP})


def measure(cp: Any, n: int, worker: Callable[[int], Any], direct: Callable[[], list[float]],
            starts: bool = True, warm: bool = False, quick: bool = False) -> dict[str, Any]:
    r: dict[str, Any] = {}
    if STARTS_ONLY:
        if warm:
            with worker(2):
                time.sleep(3)  # pool filled
                r["warm"] = session_starts(cp, max(5, n // 3))
                r["load_warm"] = load()
        return r
    if quick:
        with worker(0):
            for c in (1, 4, 16):
                r[f"tps{c}"] = throughput(cp, c, max(10, 2 * n // c))
                r[f"cpu{c}"] = dict(CPU_ROWS.get(c, {}))
                r[f"threads{c}"] = dict(THREAD_ROWS.get(c, {}))
                r[f"load_tps{c}"] = load()
                time.sleep(SETTLE_S)
            r["idle16"] = dict(IDLE_ROW)
        return r
    with worker(0):
        for c in (1, 4, 16):
            r[f"tps{c}"] = throughput(cp, c, max(10, 2 * n // c))
            r[f"cpu{c}"] = dict(CPU_ROWS.get(c, {}))
            r[f"threads{c}"] = dict(THREAD_ROWS.get(c, {}))
            if c == 16:
                r["idle16"] = dict(IDLE_ROW)
            r[f"load_tps{c}"] = load()
            time.sleep(SETTLE_S)  # the ended sessions' teardown (sandboxes stopped, checkpoints) is not measured
        r["loop"] = per_call(cp, n)
        r["load_loop"] = load()
        if starts:
            r["cold"] = session_starts(cp, max(5, n // 3))
    r["direct"] = direct()
    if starts and warm:
        with worker(2):
            time.sleep(3)  # pool filled
            r["warm"] = session_starts(cp, max(5, n // 3))
            r["load_warm"] = load()
    return r


def print_parts(results: dict[str, dict[str, Any]], cols: Sequence[str],
                row: Callable[..., None]) -> None:
    """Where the CPU goes: every part's CPU per call at 1/4/16 sessions, the cores they use together
    against the host's busy cores (the rest is other work on the host) and its CPU pressure; the worker's
    threads; 16 live idle sessions."""
    names: list[str] = []
    for c in cols:
        for k in results[c]["cpu16"]:
            if k not in HOST_PARTS and k != "calls" and k not in names:
                names.append(k)

    def part(n: int, name: str) -> Callable[[dict[str, Any]], float]:
        return lambda r: float(r[f"cpu{n}"].get(name, 0.0)) * 1e3

    def total(n: int) -> Callable[[dict[str, Any]], float]:
        return lambda r: sum(v for k, v in r[f"cpu{n}"].items() if k not in HOST_PARTS and k != "calls") * 1e3

    def cores(n: int, what: str) -> Callable[[dict[str, Any]], float]:
        def f(r: dict[str, Any]) -> float:
            row_ = r[f"cpu{n}"]
            wall = row_.get("host wall", 0.0) or 1.0
            if what == "ours":
                return float(total(n)(r) / 1e3 * row_["calls"] / wall)
            return float(row_.get(what, 0.0)) / wall
        return f

    for n in (1, 4, 16):
        print(f"\nCPU per call, {n} session(s) (ms; calls measured: "
              + ", ".join(f"{c} {int(results[c][f'cpu{n}'].get('calls', 0))}" for c in cols) + ")")
        for name in names:
            row(f"  {name}", part(n, name), "{:.2f}")
        row("  all of the above", total(n), "{:.2f}")
        row("  cores used by all of the above (of %d)" % (os.cpu_count() or 0), cores(n, "ours"), "{:.2f}")
        row("  host cores busy meanwhile (all processes)", cores(n, "host busy"), "{:.2f}")
        row("  CPU pressure: share of time a task waited for a core", cores(n, "cpu pressure"), "{:.2f}")
    for n in (1, 16):
        print(f"\nWorker threads, {n} session(s): CPU ms / voluntary / involuntary switches per call")
        for c in cols:
            th = results[c][f"threads{n}"]
            for name, (cpu, vol, inv) in sorted(th.items(), key=lambda kv: -kv[1][0]):
                if cpu > 0 or vol > 0:
                    print(f"  {c:10} {name:24} {cpu * 1e3:8.3f} {vol:6d} {inv:6d}")
    if all("idle16" in results[c] and results[c]["idle16"] for c in cols):
        print(f"\n16 live idle sessions ({IDLE_S:.0f} s): CPU ms per second")
        for name in names:
            row(f"  {name}", lambda r, name=name: float(r["idle16"].get(name, 0.0)) * 1e3, "{:.2f}")
        row("  worker, its live threads' exact run time (schedstat)",
            lambda r: sum(v[0] for v in r["idle16"].get("threads", {}).values()) * 1e3, "{:.2f}")
        row("  worker threads", lambda r: float(r["idle16"].get("thread count", 0)), "{:.0f}")
        for c in cols:
            th = results[c]["idle16"].get("threads", {})
            for name, (cpu, vol, inv) in sorted(th.items(), key=lambda kv: -kv[1][0]):
                if cpu > 0 or vol > 0:
                    print(f"  {c:10} {name:24} {cpu * 1e3:8.3f} ms/s {vol:5d} wake-ups/s {inv:4d} preempted/s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=30, help="calls per session / samples")
    ap.add_argument("--worker", choices=("both", "sandbox", "reference"), default="both")
    ap.add_argument("--one-process", action="store_true",
                    help="control plane and worker in this process too (brain, control plane and worker share one "
                         "interpreter lock); by default each runs in its own process, as deployed")
    ap.add_argument("--quick", action="store_true",
                    help="throughput rows only (and where the CPU goes): no per-call, start or direct rows")
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="sys.setswitchinterval in the worker processes (CPython's default is 0.005 s)")
    ap.add_argument("--warm-starts", action="store_true", help="only session starts with the warm pool (ours)")
    args = ap.parse_args()
    if args.warm_starts:
        global STARTS_ONLY
        STARTS_ONLY = True
        args.worker = "sandbox"
    if args.switch_interval is not None:
        os.environ["BENCH_SWITCH_INTERVAL"] = str(args.switch_interval)  # read by the spawned workers
    tmp = Path(tempfile.mkdtemp(prefix="bench-worker."))
    results: dict[str, dict[str, Any]] = {}
    load0 = load()
    with (ControlPlane(tmp / "cp") if args.one_process else RemoteControlPlane(tmp / "cp")) as cp:
        if args.worker in ("both", "reference"):
            results["reference"] = measure(
                cp, args.n, lambda _warm: (reference_worker(cp, tmp / "ref") if args.one_process
                                           else in_process("reference", cp, tmp / "ref", 0)),
                lambda: direct_reference(args.n, tmp / "ref-direct"), quick=args.quick)
        if args.worker in ("both", "sandbox"):
            counter = iter(range(100))
            results["sandbox"] = measure(
                cp, args.n, lambda warm: (our_worker if args.one_process else partial(in_process, "our"))(
                    cp, tmp / f"w{next(counter)}", warm),
                lambda: direct_sandbox(args.n), warm=True, quick=args.quick)

    med = statistics.median
    if STARTS_ONLY:
        w = results["sandbox"]["warm"]
        print(f"session start to first result, warm pool: median {med(w) * 1e3:.1f} ms, min {min(w) * 1e3:.1f}, "
              f"max {max(w) * 1e3:.1f} (n={len(w)}, load {results['sandbox']['load_warm']:.2f})")
        return
    where = "in this process" if args.one_process else "in its own process"
    print(f"\nWorker benchmark (embedded control plane {where}, brain on the event stream; uvloop={USE_UVLOOP}; "
          f"load average at start {load0:.2f})\n")
    cols = [k for k in ("sandbox", "reference") if k in results]
    head = f"{'':58}" + "".join(f"{c:>16}" for c in cols) + ("   ratio ours/ref" if len(cols) == 2 else "")
    print(head)

    def row(label: str, f: Callable[[dict[str, Any]], float], fmt: str = "{:.1f}") -> None:
        vals = [f(results[c]) for c in cols]
        line = f"{label:58}" + "".join(f"{fmt.format(v):>16}" for v in vals)
        if len(vals) == 2 and vals[1]:
            line += f"   {vals[0] / vals[1]:.2f}x"
        print(line)

    def tps(n: int) -> Callable[[dict[str, Any]], float]:
        return lambda r: float(r[f"tps{n}"])

    def cpu(n: int, proc: str) -> Callable[[dict[str, Any]], float]:
        return lambda r: float(r[f"cpu{n}"].get(proc, 0.0)) * 1e3

    for n in (1, 4, 16):
        row(f"tool calls/s, {n} concurrent session(s), bash true", tps(n))
    if args.quick:
        if not args.one_process:
            print_parts(results, cols, row)
        print(f"switch interval in the workers: {os.environ.get('BENCH_SWITCH_INTERVAL', 'default (0.005)')}")
        for c in cols:
            r = results[c]
            print(f"load average during {c}: throughput {r['load_tps1']:.2f}/{r['load_tps4']:.2f}/{r['load_tps16']:.2f}")
        return
    row("per call through the loop, median (ms)", lambda r: med(r["loop"]) * 1e3)
    row("per call through the loop, p99 (ms)", lambda r: pct(r["loop"], 99) * 1e3)
    row("same op called directly, median (ms)", lambda r: med(r["direct"]) * 1e3)
    row("loop overhead per call, median (ms)", lambda r: (med(r["loop"]) - med(r["direct"])) * 1e3)
    row("session start to first result, no pool, median (ms)", lambda r: med(r["cold"]) * 1e3, "{:.0f}")
    if "sandbox" in results:
        print(f"{'session start to first result, warm pool, median (ms)':58}{med(results['sandbox']['warm']) * 1e3:>16.0f}")
    if not args.one_process:
        print_parts(results, cols, row)
    for c in cols:
        r = results[c]
        print(f"load average during {c}: throughput {r['load_tps1']:.2f}/{r['load_tps4']:.2f}/{r['load_tps16']:.2f}, "
              f"per call {r['load_loop']:.2f}" + (f", warm starts {r['load_warm']:.2f}" if "load_warm" in r else ""))


if __name__ == "__main__":
    main()
