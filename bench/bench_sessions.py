"""Session store benchmark (run by hand, as root: `python3 bench/bench_sessions.py [-n 5]`).

Measures
  - checkpoint cost for a 100 MiB workspace (100 files of 1 MiB in a loop-mounted ext4 workspace)
    with 1 MiB changed since the previous checkpoint: milliseconds and bytes copied / stored, plus the
    first (full) checkpoint and a restore for reference;
  - resume of an idle session (work arrives -> first result posted) with its sandbox stopped when the
    run went idle (the default) vs kept (`keep_idle`): the whole loop, embedded control plane -> worker
    -> sandbox -> result. Results are read by polling the events endpoint every 2 ms (included).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from sandbox.controlplane import ControlPlane, LocalAdmin
from sandbox.worker import Worker
from sandbox.worker.checkpoints import Checkpoints
from sandbox.worker.credentials import EnvironmentKey
from sandbox.worker.runner import BackgroundWorker
from sandbox.worker.store import SessionStore
from sandbox.worker.worker import WorkerConfig

MiB = 1 << 20


def bench_checkpoints(root: Path) -> None:
    store = SessionStore(root / "store")
    ws = store.new_workspace(512)
    mnt = store.ensure_mounted(ws)
    try:
        for i in range(100):
            (mnt / f"f{i:03}.bin").write_bytes(os.urandom(MiB))
        os.sync()
        cps = Checkpoints(store.root / "sessions" / "bench")
        full = cps.create(mnt)
        assert full is not None
        with open(mnt / "f042.bin", "r+b") as f:  # 1 MiB changed
            f.write(os.urandom(MiB))
        t = time.perf_counter()
        inc = cps.create(mnt)
        ms = (time.perf_counter() - t) * 1000
        assert inc is not None
        t = time.perf_counter()
        cps.restore(full.id, mnt)
        restore_ms = (time.perf_counter() - t) * 1000
        print("checkpoint of a 100 MiB workspace (100 x 1 MiB files):")
        print(f"  first (full copy)      {full.ms:8.1f} ms  {full.bytes_new / MiB:6.1f} MiB copied")
        print(f"  1 MiB changed          {ms:8.1f} ms  {inc.bytes_new / MiB:6.1f} MiB copied, "
              f"{inc.files} files (99 hard links)")
        print(f"  stored for both        {cps.stored_bytes() / MiB:8.1f} MiB distinct")
        print(f"  restore (full rewrite) {restore_ms:8.1f} ms")
    finally:
        store.remove_workspace(ws)


def _call(admin: LocalAdmin, sid: str, command: str, timeout: float = 60.0) -> float:
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
    raise TimeoutError("no result")


def bench_resume(root: Path, n: int) -> None:
    import io
    import json
    import logging

    from sandbox.worker.logs import setup_logging

    stream = io.StringIO()
    handler = setup_logging(logging.INFO, stream=stream)

    def acquire_ms(event: str) -> list[float]:
        recs = [json.loads(x) for x in stream.getvalue().splitlines() if x.startswith("{")]
        return [float(r["ms"]) for r in recs if r.get("event") == event and "ms" in r]

    with ControlPlane(root / "cp") as cp, LocalAdmin(cp.base_url, cp.admin_key) as admin:
        for label, keep in (("sandbox stopped (default)", 0.0), ("sandbox kept (keep_idle=120)", 120.0)):
            cfg = WorkerConfig(base_url=cp.base_url, environment_id=cp.environment_id, state_dir=root / f"w{keep}",
                               store_dir=root / "sessions", max_idle=0.5, keep_idle=keep, selftest=False,
                               checkpoints=0)
            worker = Worker(cfg, EnvironmentKey(cp.environment_key, "bench"))
            samples = []
            with BackgroundWorker(worker):
                sid = admin.create_session(cp.environment_id)
                _call(admin, sid, "echo warm > f")
                for _ in range(n):
                    admin.send_idle(sid)
                    t = time.monotonic()
                    while worker.sessions_in_flight and time.monotonic() - t < 30:
                        time.sleep(0.01)
                    time.sleep(0.5)
                    samples.append(_call(admin, sid, "cat f"))
                admin.terminate(sid)
            samples.sort()
            event = "sandbox_reused" if keep else "sandbox_assigned"
            inner = acquire_ms(event)[-n:]
            stream.seek(0)
            stream.truncate()
            print(f"resume of an idle session, {label}: work arrives -> result median "
                  f"{statistics.median(samples) * 1000:.0f} ms (min {samples[0] * 1000:.0f}, max "
                  f"{samples[-1] * 1000:.0f}; includes the SDK poller's 1-3 s idle jitter), of which getting "
                  f"the sandbox: median {statistics.median(inner) if inner else float('nan'):.0f} ms (n={n})")
    logging.getLogger().removeHandler(handler)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-sessions-") as d:
        bench_checkpoints(Path(d))
        bench_resume(Path(d), args.n)


if __name__ == "__main__":
    main()
