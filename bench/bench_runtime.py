"""Runtime benchmark (run by hand: `python3 bench/bench_runtime.py [-n 20]`).

(a) `sandbox exec -- python3 -c 'print(1)'` (a whole CLI process) vs a plain
    `docker run --rm` with the same hardening flags and image;
(b) one command in an already-running sandbox through the runtime's exec path
    vs `docker exec` into the same container;
(c) creating and destroying 20 sandboxes concurrently: wall time, peak memory.
Rounds are interleaved so both sides see the same machine load; medians and
ratios are measured in this one run. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sysconfig
from pathlib import Path
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil

from sandbox import seccomp as sc
from sandbox.policy import load_policy
from sandbox.runtime import Runtime


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def docker_run_cmd(policy, seccomp_file: str) -> list[str]:
    u, rl = policy.user, policy.rlimits
    cmd = ["docker", "run", "--rm", "--init", f"--user={u.uid}:{u.gid}", "--read-only", "--cap-drop=ALL",
           "--security-opt=no-new-privileges", f"--security-opt=seccomp={seccomp_file}", "--network=none",
           f"--pids-limit={policy.limits.pids}", f"--memory={policy.limits.memory_mb}m",
           f"--memory-swap={policy.limits.memory_mb}m", f"--cpus={policy.limits.cpus}", "--log-driver=none",
           f"--tmpfs=/tmp:rw,nosuid,nodev,noexec,size={policy.tmpfs[0].size_mb}m",
           f"--tmpfs=/workspace:rw,nosuid,nodev,exec,size={policy.workspace.size_mb}m,uid={u.uid},gid={u.gid},mode=0700",
           f"--ulimit=nofile={rl.nofile}", f"--ulimit=nproc={rl.nproc}", "--ulimit=core=0",
           f"--ulimit=fsize={rl.fsize_mb << 20}", f"--ulimit=cpu={rl.cpu_s}", f"--ulimit=stack={rl.stack_mb << 20}"]
    return cmd + [policy.image, "python3", "-c", "print(1)"]


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=20)
    args = ap.parse_args()
    policy = load_policy("default")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(sc.to_oci(sc.compile_filter(policy.seccomp)), f)
        seccomp_file = f.name
    # The console script itself, not a version-manager shim in front of it (pyenv adds ~0.3 s).
    script = Path(sysconfig.get_path("scripts")) / "sandbox"
    sandbox_cmd = [str(script if script.exists() else shutil.which("sandbox")), "exec", "--", "python3", "-c", "print(1)"]
    plain = docker_run_cmd(policy, seccomp_file)
    timed(sandbox_cmd), timed(plain)  # warm caches
    a_ours, a_base = [], []
    for _ in range(args.n):
        a_ours.append(timed(sandbox_cmd))
        a_base.append(timed(plain))

    rt = Runtime(owner_kind="bench")
    sb = rt.create(policy)
    b_ours, b_base = [], []
    dexec = ["docker", "exec", sb.id, "python3", "-c", "print(1)"]
    for _ in range(args.n):
        t = time.perf_counter()
        r = sb.exec(["python3", "-c", "print(1)"])
        b_ours.append(time.perf_counter() - t)
        assert r.stdout == b"1\n", r
        b_base.append(timed(dexec))
    t_true = []
    for _ in range(args.n):
        t = time.perf_counter()
        sb.exec(["true"])
        t_true.append(time.perf_counter() - t)
    sb.destroy()

    peak = [0]
    base_used = psutil.virtual_memory().used
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], psutil.virtual_memory().used - base_used)
            time.sleep(0.02)

    th = threading.Thread(target=sample)
    th.start()
    t = time.perf_counter()

    def one(_: int) -> None:
        s = rt.create(policy)
        s.exec(["true"])
        s.destroy()

    with ThreadPoolExecutor(20) as pool:
        list(pool.map(one, range(20)))
    c_wall = time.perf_counter() - t
    stop.set()
    th.join()

    med = statistics.median
    print(f"\nRuntime benchmark, n={args.n} interleaved rounds, medians (seconds)\n")
    print(f"{'measure':58} {'ours':>8} {'baseline':>9} {'ratio':>7}")
    print(f"{'(a) sandbox exec (CLI) vs hardened docker run --rm':58} {med(a_ours):8.3f} {med(a_base):9.3f} "
          f"{med(a_ours) / med(a_base):7.2f}")
    print(f"{'(b) exec in running sandbox vs docker exec':58} {med(b_ours):8.4f} {med(b_base):9.4f} "
          f"{med(b_ours) / med(b_base):7.2f}")
    print(f"{'    p99 of (b), ours / docker exec':58} {pct(b_ours, 99):8.4f} {pct(b_base, 99):9.4f}")
    print(f"{'    `true` in running sandbox (channel overhead floor)':58} {med(t_true):8.4f}")
    print(f"{'(c) 20 concurrent create+exec+destroy: wall':58} {c_wall:8.2f}")
    print(f"{'    peak host memory above start (MiB)':58} {peak[0] / 2**20:8.0f}")


if __name__ == "__main__":
    main()
