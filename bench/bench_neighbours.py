"""Neighbour benchmark (issue 14, run by hand): how much one session's bomb slows another.

    python bench/bench_neighbours.py [--rounds 3] [--only fork,cpu,...] [--storm]

For each bomb of tests/bombs.py, rounds alternate A idle / A bombing (the order flips
every round, so drift on a shared host hits both sides). In each phase B runs its job
(a fixed CPU loop) back to back: the job's time measured *inside* B and the whole
command (host: send -> result) are recorded. Printed per bomb: B's medians with A idle
and with A bombing and the ratios (aim <= 1.3x), with the load average. `--storm`: a
sandbox per bomb (16), all bombing at once, while a 17th is created, runs `true` and is
destroyed (vs the same with no storm), and B's job runs. Nothing is left running between
rounds: every sandbox is destroyed and its container gone before the next phase.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sandbox.policy import load_policy  # noqa: E402
from sandbox.runtime import Runtime  # noqa: E402
from tests.bombs import JOB, Bomb, bombs  # noqa: E402


def job(b) -> tuple[float, float]:
    t = time.perf_counter()
    res = b.exec(JOB, timeout=120)
    wall = time.perf_counter() - t
    if res.exit_code != 0:
        raise SystemExit(f"B's job failed: {res}")
    return float(res.stdout), wall


def phase(rt: Runtime, bomb: Bomb | None, seconds: float, b) -> list[tuple[float, float]]:
    a = rt.create(load_policy(bomb.profile if bomb else "default"), session_id="bench-a")
    try:
        done = threading.Event()
        if bomb is not None:
            def run() -> None:
                a.exec(bomb.argv, timeout=seconds + 2)
                done.set()
            threading.Thread(target=run, daemon=True).start()
            time.sleep(0.3)
        samples = []
        end = time.monotonic() + seconds - 0.5
        while time.monotonic() < end and not (bomb is not None and done.is_set()):
            samples.append(job(b))
        return samples
    finally:
        a.destroy()
        wait_gone(rt, "bench-a")


def wait_gone(rt: Runtime, session: str) -> None:
    for _ in range(100):
        if not [c for c in rt.list_managed() if (c.get("Labels") or {}).get("org.sandbox.session") == session]:
            return
        time.sleep(0.1)


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--only", default="")
    ap.add_argument("--storm", action="store_true")
    ap.add_argument("--storm-only", action="store_true", help="skip the one-bomb rows")
    ap.add_argument("--storm-rounds", type=int, default=5)
    args = ap.parse_args()
    if args.storm_only:
        args.storm, args.only = True, "-"
    rt = Runtime(owner_kind="bench")
    b = rt.create(load_policy("default"), session_id="bench-b")
    print(f"load average at start: {os.getloadavg()}")
    print(f"{'bomb':16} {'inside idle':>12} {'inside bomb':>12} {'ratio':>6} {'cmd idle':>9} {'cmd bomb':>9} {'ratio':>6}")
    try:
        chosen = [x for x in bombs(args.seconds) if not args.only or x.name in args.only.split(",")]
        for bomb in chosen:
            idle_in, idle_wall, bomb_in, bomb_wall, ratios = [], [], [], [], []
            for r in range(args.rounds):
                order = [None, bomb] if r % 2 == 0 else [bomb, None]
                got: dict[str, list[tuple[float, float]]] = {}
                for which in order:
                    got["bomb" if which else "idle"] = phase(rt, which, args.seconds, b)
                i_in = [x for x, _ in got["idle"]]
                b_in = [x for x, _ in got["bomb"]]
                idle_in += i_in
                bomb_in += b_in
                idle_wall += [w for _, w in got["idle"]]
                bomb_wall += [w for _, w in got["bomb"]]
                ratios.append(med(b_in) / med(i_in))
            print(f"{bomb.name:16} {med(idle_in):12.4f} {med(bomb_in):12.4f} {med(bomb_in) / med(idle_in):6.2f} "
                  f"{med(idle_wall):9.4f} {med(bomb_wall):9.4f} {med(bomb_wall) / med(idle_wall):6.2f}"
                  f"   per-round inside ratios {[round(x, 2) for x in ratios]}")
        if args.storm:
            storm(rt, b, args.seconds, args.storm_rounds)
    finally:
        b.destroy()
    print(f"load average at end: {os.getloadavg()}")


def fresh_true(rt: Runtime) -> float:
    t = time.perf_counter()
    sb = rt.create(load_policy("default"), session_id="bench-17th")
    try:
        if sb.exec(["true"], timeout=120).exit_code != 0:
            raise SystemExit("the 17th sandbox failed")
    finally:
        sb.destroy()
    return time.perf_counter() - t


def cli_true() -> float:
    """`sandbox exec -- true` as a user types it: a whole CLI process."""
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "sandbox", "exec", "--", "true"], capture_output=True)
    if r.returncode != 0:
        raise SystemExit(f"sandbox exec -- true failed: {r.stderr.decode()[-500:]}")
    return time.perf_counter() - t


def storm(rt: Runtime, b, seconds: float, rounds: int = 3) -> None:
    """16 bombs at once (the owner, this process, runs them as a worker would); meanwhile a 17th
    sandbox through the API and through the CLI, and B's job. Idle figures are measured just
    before and just after the storm (rounds interleave with the machine's own drift)."""
    idle_api, idle_cli, idle_job = [], [], []

    def idle_round() -> None:
        idle_api.append(fresh_true(rt))
        idle_cli.append(cli_true())
        idle_job.append(job(b)[0])

    for _ in range(rounds):
        idle_round()
    kinds = (bombs(seconds * 2) * 2)[:16]
    sbs = [rt.create(load_policy(k.profile), session_id=f"bench-storm-{i}") for i, k in enumerate(kinds)]
    during_api, during_cli, jobs = [], [], []
    try:
        for sb, k in zip(sbs, kinds):
            threading.Thread(target=sb.exec, args=(k.argv,), kwargs={"timeout": seconds * 2 + 2}, daemon=True).start()
        time.sleep(1.5)
        for _ in range(rounds):
            during_api.append(fresh_true(rt))
            during_cli.append(cli_true())
            jobs.append(job(b)[0])
        print(f"  during, in order: API {[round(x, 3) for x in during_api]}, CLI {[round(x, 3) for x in during_cli]}")
        demoted = sum(rt.hogs.demoted(sb.id) for sb in sbs)
    finally:
        for sb in sbs:
            sb.destroy()
    for _ in range(rounds):
        idle_round()
    print(f"storm of 16 bombs ({demoted} of them demoted by the owner's hog watch at the end):")
    print(f"  17th sandbox, API create+true+destroy {med(idle_api):.3f}s idle, {med(during_api):.3f}s during "
          f"({med(during_api) / med(idle_api):.2f}x; aim <= 2x)")
    print(f"  17th sandbox, `sandbox exec -- true`  {med(idle_cli):.3f}s idle, {med(during_cli):.3f}s during "
          f"({med(during_cli) / med(idle_cli):.2f}x; aim <= 2x)")
    print(f"  B's job inside B                       {med(idle_job):.4f}s idle, {med(jobs):.4f}s during "
          f"({med(jobs) / med(idle_job):.2f}x)")


if __name__ == "__main__":
    main()
