"""Worker benchmark (run by hand: `python3 bench/bench_worker.py [-n 30]`).

The whole loop: embedded control plane (real HTTP) -> worker (official SDK
worker, our sandbox tools) -> sandbox -> result posted back. Measures
  - tool calls per second with 1, 4 and 16 concurrent sessions running `bash true`;
  - the loop's per-call overhead over the same agent op called directly
    (`Sandbox.call("bash", ...)` in a sandbox of the same policy): median, p99;
  - session start (new session -> first tool result) without and with a warm pool.
Results are read by polling the events endpoint every 2 ms, which the numbers include.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from sandbox.controlplane import ControlPlane, LocalAdmin
from sandbox.policy import load_policy
from sandbox.runtime import Runtime
from sandbox.worker import Worker
from sandbox.worker.credentials import EnvironmentKey
from sandbox.worker.runner import BackgroundWorker
from sandbox.worker.worker import WorkerConfig


def call(admin: LocalAdmin, sid: str, command: str, timeout: float = 60.0) -> float:
    t = time.perf_counter()
    tid = admin.send_tool_use(sid, "bash", {"command": command})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ev in admin.events(sid, types=["user.tool_result"]):
            if ev.get("tool_use_id") == tid:
                if ev.get("is_error"):
                    raise RuntimeError(f"tool call failed: {ev}")
                return time.perf_counter() - t
        time.sleep(0.002)
    raise TimeoutError(tid)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def start_worker(cp: ControlPlane, state: Path, warm: int) -> BackgroundWorker:
    cfg = WorkerConfig(base_url=cp.base_url, environment_id=cp.environment_id, state_dir=state, max_sessions=16,
                       warm=warm, lease_ttl=30, max_idle=300.0)
    return BackgroundWorker(Worker(cfg, EnvironmentKey(cp.environment_key, "bench"))).start()


def throughput(cp: ControlPlane, admin: LocalAdmin, sessions: int, calls: int) -> float:
    sids = [admin.create_session(cp.environment_id) for _ in range(sessions)]
    for sid in sids:
        call(admin, sid, "true")  # sandbox started; not counted
    done = [0]
    lock = threading.Lock()

    def run(sid: str) -> None:
        for _ in range(calls):
            call(admin, sid, "true")
            with lock:
                done[0] += 1

    t = time.perf_counter()
    threads = [threading.Thread(target=run, args=(s,)) for s in sids]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    for sid in sids:
        admin.terminate(sid)
    return done[0] / wall


def session_starts(cp: ControlPlane, admin: LocalAdmin, n: int) -> list[float]:
    out = []
    for _ in range(n):
        sid = admin.create_session(cp.environment_id)
        out.append(call(admin, sid, "true"))
        admin.terminate(sid)
        time.sleep(0.5)  # let the pool refill
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=30, help="calls per session / samples")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-worker."))
    rows: list[tuple[str, str]] = []
    with ControlPlane(tmp / "cp") as cp:
        admin = LocalAdmin(cp.base_url, cp.admin_key)
        bw = start_worker(cp, tmp / "w0", warm=0)
        try:
            for c in (1, 4, 16):
                rows.append((f"tool calls/s, {c} concurrent session(s), bash true",
                             f"{throughput(cp, admin, c, max(5, args.n // c * 2 if c > 1 else args.n)):.1f}"))
            sid = admin.create_session(cp.environment_id)
            call(admin, sid, "true")
            loop = [call(admin, sid, "true") for _ in range(args.n)]
            admin.terminate(sid)
            rt = Runtime(owner_kind="bench")
            sb = rt.create(load_policy("worker"))
            direct = []
            for _ in range(args.n):
                t = time.perf_counter()
                sb.call("bash", command="true", timeout=30)
                direct.append(time.perf_counter() - t)
            sb.destroy()
            rows.append(("per call through the loop, median / p99 (ms)",
                         f"{statistics.median(loop) * 1e3:.1f} / {pct(loop, 99) * 1e3:.1f}"))
            rows.append(("same op called directly, median / p99 (ms)",
                         f"{statistics.median(direct) * 1e3:.1f} / {pct(direct, 99) * 1e3:.1f}"))
            rows.append(("loop overhead per call, median (ms)",
                         f"{(statistics.median(loop) - statistics.median(direct)) * 1e3:.1f}"))
            cold = session_starts(cp, admin, max(5, args.n // 3))
        finally:
            bw.stop(timeout=120)
        bw = start_worker(cp, tmp / "w1", warm=2)
        try:
            time.sleep(3)  # pool filled
            warm = session_starts(cp, admin, max(5, args.n // 3))
        finally:
            bw.stop(timeout=120)
    rows.append(("session start to first result, no pool, median (ms)", f"{statistics.median(cold) * 1e3:.0f}"))
    rows.append(("session start to first result, warm pool, median (ms)", f"{statistics.median(warm) * 1e3:.0f}"))
    print("\nWorker benchmark (embedded control plane, real sandboxes)\n")
    for k, v in rows:
        print(f"{k:58} {v:>14}")


if __name__ == "__main__":
    main()
