"""Where a tool call's time goes through the worker loop (run by hand, not a test).

    python3 bench/profile_worker.py [-n 200] [--worker sandbox|reference] [--sessions 1] [--cprofile]

Runs the embedded control plane, a worker and one brain per session (event
stream, as in bench_worker.py) in this process, and accounts CPU per thread
group (control-plane request threads, the worker's event loop, its helper
threads, the brain) per tool call, with `time.thread_time`. With
`--cprofile`, every thread is profiled and the top functions by own time are
printed per group.
"""

from __future__ import annotations

import argparse
import cProfile
import collections
import io
import os
import pstats
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

PROFILE = "--cprofile" in sys.argv
_lock = threading.Lock()
_cpu: dict[str, float] = collections.defaultdict(float)
_profiles: dict[str, list[cProfile.Profile]] = collections.defaultdict(list)
_final: dict[int, tuple[str, float]] = {}  # ident -> (group, CPU seconds at its end)
_live: list[tuple[str, cProfile.Profile]] = []  # every thread's profiler: cleared when the window opens
_orig_run = threading.Thread.run


def _group(name: str) -> str:
    if name.startswith("controlplane"):
        return "control plane (request threads)"
    if name.startswith("AnyIO worker"):
        return "worker helper threads (to_thread)"
    if "portal" in name:
        return "worker event loop"
    if name.startswith("brain"):
        return "brain (bench)"
    return f"other ({name.split('-')[0]})"


def _run(self: threading.Thread) -> None:
    group = _group(self.name)
    prof = cProfile.Profile(time.thread_time) if PROFILE else None  # CPU, not wall
    t0 = time.thread_time()
    if prof is not None:
        with _lock:
            _live.append((group, prof))
        prof.enable()
    try:
        _orig_run(self)
    finally:
        if prof is not None:
            prof.disable()
        with _lock:
            _cpu[group] += time.thread_time() - t0
            _final[threading.get_ident()] = (group, time.thread_time())


threading.Thread.run = _run  # type: ignore[method-assign]

import bench_worker as bw  # noqa: E402
import httpx2  # noqa: E402

from sandbox.controlplane import ControlPlane, LocalAdmin  # noqa: E402


_marks: list[tuple[str, float]] = []


def _wrap(owner: Any, attr: str, label: str) -> None:
    """Mark when `owner.attr` starts and ends (a function or coroutine function)."""
    import inspect

    fn = getattr(owner, attr)
    if inspect.iscoroutinefunction(fn):
        async def awrapped(*a: Any, **k: Any) -> Any:
            _marks.append((f"{label}>", time.perf_counter()))
            try:
                return await fn(*a, **k)
            finally:
                _marks.append((f"{label}<", time.perf_counter()))
        setattr(owner, attr, awrapped)
    else:
        def wrapped(*a: Any, **k: Any) -> Any:
            _marks.append((f"{label}>", time.perf_counter()))
            try:
                return fn(*a, **k)
            finally:
                _marks.append((f"{label}<", time.perf_counter()))
        setattr(owner, attr, wrapped)


def install_trace() -> None:
    from anthropic.lib.tools._beta_session_runner import SessionToolRunner

    from sandbox.controlplane.sessions import Sessions
    from sandbox.runtime import Sandbox
    from sandbox.worker.tools import SessionToolbox

    _wrap(bw.Brain, "call", "brain")
    _wrap(Sessions, "append_agent_events", "cp.inject")
    _wrap(SessionToolRunner, "_route_tool_event", "sdk.route")
    _wrap(SessionToolRunner, "_execute", "sdk.execute")
    _wrap(SessionToolbox, "call", "tool")
    _wrap(SessionToolbox, "_journalled_call", "thread")
    _wrap(SessionToolbox, "_call_on_loop", "on_loop")
    _wrap(Sandbox, "call", "sandbox")
    _wrap(SessionToolRunner, "_send_result", "sdk.post")
    _wrap(Sessions, "append_client_events", "cp.result")


def install_start_trace() -> None:
    from anthropic.lib.environments._worker import EnvironmentWorker
    from anthropic.lib.tools._beta_session_runner import SessionToolRunner
    from anthropic.lib.tools.agent_toolset import AgentToolContext

    from sandbox.controlplane.sessions import Sessions
    from sandbox.controlplane.work import WorkQueue
    from sandbox.runtime import Sandbox
    from sandbox.worker.pool import SessionSandboxes
    from sandbox.worker.tools import SessionToolbox
    from sandbox.worker.worker import Worker

    _wrap(Sessions, "create", "cp.create")
    _wrap(WorkQueue, "_deliver", "cp.deliver")
    _wrap(WorkQueue, "ack", "cp.ack")
    _wrap(Worker, "_serve_item", "serve")
    _wrap(Worker, "_lock_run", "lock_run")
    _wrap(Worker, "_open_trail", "open_trail")
    _wrap(Worker, "_has_skills", "has_skills")
    _wrap(SessionSandboxes, "acquire", "acquire")
    _wrap(EnvironmentWorker, "_handle_item", "sdk.item")
    _wrap(AgentToolContext, "__aenter__", "sdk.toolctx")
    _wrap(Worker, "_tools_for", "tools_for")
    _wrap(SessionToolRunner, "_reconcile", "sdk.reconcile")
    _wrap(SessionToolRunner, "_route_tool_event", "sdk.route")
    _wrap(SessionToolbox, "call", "tool")
    _wrap(Sandbox, "call", "sandbox")
    _wrap(SessionToolRunner, "_send_result", "sdk.post")
    _wrap(Sessions, "append_client_events", "cp.result")
    from sandbox.audit.trail import AuditTrail
    from sandbox.worker.outbox import Outbox

    from sandbox.worker.store import SessionStore

    _wrap(SessionStore, "try_lock_run", "store.lock")
    _wrap(SessionStore, "skills_dir", "store.skills")
    _wrap(Worker, "_acquire_sandbox", "acquire_task")
    _wrap(Outbox, "begin", "journal.begin")
    _wrap(Outbox, "finish", "journal.finish")
    _wrap(AuditTrail, "tool_call", "trail.tool_call")
    _wrap(SessionToolRunner, "_stream_loop", "sdk.stream")


def print_start_trace() -> None:
    runs: list[list[tuple[str, float]]] = []
    for label, t in _marks:
        if label == "start>":
            runs.append([])
        if runs:
            runs[-1].append((label, t))
    print("\nsession start: ms from `create` to each mark (median over runs; first time a mark is seen):")
    at: dict[str, list[float]] = collections.defaultdict(list)
    order: list[str] = []
    for r in runs:
        t0 = r[0][1]
        seen = set()
        for label, t in r:
            if label in seen:
                continue
            seen.add(label)
            if label not in at:
                order.append(label)
            at[label].append((t - t0) * 1e3)
    for label in sorted(order, key=lambda lb: sorted(at[lb])[len(at[lb]) // 2]):
        v = sorted(at[label])
        print(f"  {label:18} {v[len(v) // 2]:8.1f}   (n={len(v)})")


def print_trace() -> None:
    calls: list[list[tuple[str, float]]] = []
    for label, t in _marks:
        if label == "brain>":
            calls.append([])
        if calls:
            calls[-1].append((label, t))
    steps: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    order: list[tuple[str, str]] = []
    for c in calls[1:]:
        if not c or c[-1][0] != "brain<":
            continue
        for (a, ta), (b, tb) in zip(c, c[1:]):
            if (a, b) not in steps:
                order.append((a, b))
            steps[(a, b)].append((tb - ta) * 1e3)
    print("\nmedian ms between consecutive marks of one call (> start, < end):")
    for k in order:
        v = sorted(steps[k])
        if len(v) >= len(calls) // 2:
            print(f"  {k[0]:>16} -> {k[1]:<16} {v[len(v) // 2]:7.3f}   (n={len(v)})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("--sessions", type=int, default=1)
    ap.add_argument("--worker", choices=("sandbox", "reference"), default="sandbox")
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--sort", default="tottime")
    ap.add_argument("--filter", default="", help="only functions whose location matches this regex")
    ap.add_argument("--trace", action="store_true", help="time the steps of each call")
    ap.add_argument("--starts", type=int, default=0, help="instead: time N session starts (warm pool of 2)")
    ap.add_argument("-v", action="store_true", help="CPU of each long-lived thread")
    args = ap.parse_args()
    if os.environ.get("SWITCH_S"):
        sys.setswitchinterval(float(os.environ["SWITCH_S"]))
    tmp = Path(tempfile.mkdtemp(prefix="profile-worker."))
    if args.trace:
        install_trace()
    if args.starts:
        install_start_trace()
        with ControlPlane(tmp / "cp") as cp, bw.our_worker(cp, tmp / "w", 2):
            time.sleep(3)
            admin = LocalAdmin(cp.base_url, cp.admin_key)
            http = httpx2.Client(timeout=60)
            for _ in range(args.starts):
                _marks.append(("start>", time.perf_counter()))
                b = bw.Brain(cp.base_url, cp.admin_key, admin.create_session(cp.environment_id), admin=admin,
                             http=http)
                _marks.append(("brain ready", time.perf_counter()))
                b.call("true")
                _marks.append(("first result", time.perf_counter()))
                b.close()
                time.sleep(float(os.environ.get("START_IDLE", "1.5")))
        print_start_trace()
        return
    with ControlPlane(tmp / "cp") as cp:
        ctx = bw.reference_worker(cp, tmp / "ref") if args.worker == "reference" else bw.our_worker(cp, tmp / "w", 0)
        with ctx:
            admin = LocalAdmin(cp.base_url, cp.admin_key)
            brains = [bw.Brain(cp.base_url, cp.admin_key, admin.create_session(cp.environment_id))
                      for _ in range(args.sessions)]
            for b in brains:
                b.call("true")
                b.call("true")
            lat: list[float] = []

            def drive(b: bw.Brain) -> None:
                for _ in range(args.n):
                    lat.append(b.call("true"))

            with _lock:
                base = dict(_cpu)
                for _g, p in _live:
                    p.clear()  # only the window counts (under the GIL: the profiled thread is not running)
            # Threads that started before now and still run are measured from here on by a snapshot below.
            live0 = {t.ident: t for t in threading.enumerate()}
            t0_cpu = {ident: _thread_cpu(ident) for ident in live0}
            wall0 = time.perf_counter()
            threads = [threading.Thread(target=drive, args=(b,), name=f"brain-{i}") for i, b in enumerate(brains)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - wall0
            t1_cpu = {ident: _thread_cpu(ident) for ident in live0}
            with _lock:
                ended = {k: v - base.get(k, 0.0) for k, v in _cpu.items()}
                for ident in live0:  # these are counted below from their CPU at the window's start
                    if ident in _final:
                        ended[_final[ident][0]] -= _final[ident][1]
            live_groups: dict[str, float] = collections.defaultdict(float)
            for ident, t in live0.items():
                a, b_ = t0_cpu.get(ident), t1_cpu.get(ident)
                if a is not None and b_ is None and ident in _final:
                    live_groups[_final[ident][0]] += _final[ident][1] - a  # ended in the window
                if a is not None and b_ is not None and "-v" in sys.argv:
                    print(f"    thread {t.name!r} ({type(t).__name__}): {(b_ - a) * 1e3:.0f} ms")
                if a is not None and b_ is not None:
                    live_groups[_group(t.name) if t is not threading.main_thread() else "main"] += b_ - a
            with _lock:
                for g, p in _live:
                    p.snapshot_stats()  # now, while the threads still live
                    if getattr(p, "stats", None):
                        _profiles[g].append(p)
            for b in brains:
                b.close()
            admin.close()
    calls = args.n * args.sessions
    print(f"\n{args.worker}: {calls} calls, {args.sessions} session(s), {calls / wall:.1f} calls/s, "
          f"median {sorted(lat)[len(lat) // 2] * 1e3:.2f} ms, load {os.getloadavg()[0]:.2f}")
    print("CPU per call by thread group (ms): threads alive throughout + threads that ended during the run")
    groups = set(live_groups) | set(ended)
    for g in sorted(groups, key=lambda g: -(live_groups.get(g, 0) + ended.get(g, 0))):
        print(f"  {g:45} {(live_groups.get(g, 0) + ended.get(g, 0)) / calls * 1e3:7.3f}")
    if args.trace:
        print_trace()
    if PROFILE:
        for g, profs in _profiles.items():
            s = io.StringIO()
            st: Any = pstats.Stats(stream=s)
            for p in profs:
                _merge(st, p.stats)
            st.sort_stats(args.sort)
            if args.filter:
                st.print_stats(args.filter, args.top)
            else:
                st.print_stats(args.top)
            print(f"\n===== {g} =====\n" + s.getvalue())


def _merge(st: Any, stats: dict[Any, Any]) -> None:
    for func, stat in stats.items():
        cc, nc, tt, ct, callers = stat
        if func in st.stats:
            occ, onc, ott, oct_, ocallers = st.stats[func]
            merged = dict(ocallers)
            for k, v in callers.items():
                merged[k] = tuple(a + b for a, b in zip(merged[k], v)) if k in merged else v
            st.stats[func] = (occ + cc, onc + nc, ott + tt, oct_ + ct, merged)
        else:
            st.stats[func] = stat
    st.total_calls = sum(s[1] for s in st.stats.values())
    st.prim_calls = sum(s[0] for s in st.stats.values())
    st.total_tt = sum(s[2] for s in st.stats.values())
    if not st.fcn_list:
        st.fcn_list = None


def _thread_cpu(ident: int | None) -> float | None:
    """CPU seconds of a live thread (Linux: its /proc task stat)."""
    import threading as _t

    for t in _t.enumerate():
        if t.ident == ident and t.native_id is not None:
            try:
                with open(f"/proc/self/task/{t.native_id}/stat") as f:
                    parts = f.read().rsplit(")", 1)[1].split()
                return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
            except OSError:
                return None
    return None


if __name__ == "__main__":
    main()
