"""gVisor's platform by measurement (run by hand, never by CI):

    python3 bench/bench_gvisor.py [-n 7] [--timeout 20] [--image sandbox-runtime:latest] [--skip-engine]

Two parts, each in one run with rounds interleaved, medians and ratios to runc:

1. OCI, every platform: the sandbox image's root filesystem as one OCI bundle (read-only root,
   its own network namespace with loopback only), `python3 -c 'print(1)'` run to completion
   (create, start, wait, delete: `<runtime> run`) by runc and by runsc on each platform this
   runsc has (ptrace, kvm, systrap): what each platform costs with the engine out of the way.
   The state directories are the bench's own (--root), so nothing the engine runs is touched and
   the engine's registration is not changed. A platform that fails is reported with runsc's
   words; one that hangs is cut at --timeout, its processes killed and its container deleted.
2. Engine, the registered platform: the project's API, create -> first result -> destroy, profile
   `gvisor` (runsc as registered with Docker; the platform read from that registration) vs
   profile `default` (runc), the row `sandbox doctor` relates to.

The machine's load average is printed with the results: on a shared host, read ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PLATFORMS = ("ptrace", "kvm", "systrap")
PRINT1 = ["python3", "-I", "-S", "-c", "print(1)"]
med = statistics.median


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def make_bundle(image: str, tmp: Path) -> Path:
    """The image's root filesystem (docker export of a never-started container) plus a
    config.json from `runc spec`: not a terminal, read-only root, runs print(1) as nobody."""
    bundle = tmp / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    cid = subprocess.run(["docker", "create", image, "true"], check=True, capture_output=True, text=True).stdout.strip()
    try:
        exp = subprocess.Popen(["docker", "export", cid], stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", str(bundle / "rootfs")], stdin=exp.stdout, check=True)
        if exp.wait() != 0:
            raise SystemExit(f"docker export {image} failed")
    finally:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True)
    subprocess.run(["runc", "spec"], cwd=bundle, check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"].update(terminal=False, args=PRINT1, user={"uid": 65534, "gid": 65534}, cwd="/")
    spec["root"]["readonly"] = True
    spec["hostname"] = "sandbox"
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


class Oci:
    """One runtime (+ platform) running the bundle with its own state directory."""

    def __init__(self, name: str, argv: list[str], state: Path) -> None:
        self.name, self.argv, self.state = name, argv, state
        state.mkdir(parents=True, exist_ok=True)
        self.times: list[float] = []
        self.error = ""
        self.seq = 0

    def once(self, bundle: Path, timeout: float) -> None:
        if self.error:
            return
        self.seq += 1
        cid = f"bg-{self.name}-{os.getpid()}-{self.seq}"
        t0 = time.perf_counter()
        # its own process group: on a hang, the sandbox, gofer and children all go
        p = subprocess.Popen([*self.argv, "--root", str(self.state), "run", "--bundle", str(bundle), cid],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            self.error = f"hangs: no result in {timeout:g} s (killed)"
            self._delete(cid)
            return
        dt = time.perf_counter() - t0
        if p.returncode != 0 or out != "1\n":
            words = [ln for ln in err.strip().splitlines() if ln.strip()]
            self.error = f"exit {p.returncode}: {(words or ['no output'])[-1][:110]}"
            self._delete(cid)
            return
        self.times.append(dt)

    def _delete(self, cid: str) -> None:
        subprocess.run([*self.argv, "--root", str(self.state), "delete", "--force", cid], capture_output=True, timeout=30)


def bench_oci(n: int, image: str, timeout: float, tmp: Path) -> None:
    runsc = shutil.which("runsc")
    runc = shutil.which("runc")
    if not runsc or not runc:
        print(f"OCI part skipped: runc {'found' if runc else 'missing'}, runsc {'found' if runsc else 'missing'}")
        return
    ver = subprocess.run([runsc, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    bundle = make_bundle(image, tmp)
    sides = [Oci("runc", [runc], tmp / "state-runc")]
    sides += [Oci(f"runsc-{p}", [runsc, f"--platform={p}", "--network=none"], tmp / f"state-{p}") for p in PLATFORMS]
    for s in sides:  # warm-up; also finds the platforms that cannot run here
        s.once(bundle, timeout)
        s.times.clear()
    rng = random.Random(5)
    for _ in range(n):
        for s in rng.sample(sides, len(sides)):
            s.once(bundle, timeout)
    base = med(sides[0].times) if sides[0].times else float("nan")
    print(f"\nOCI `run` of print(1) in the sandbox image's rootfs, {n} interleaved rounds ({ver}; runc {subprocess.run([runc, '--version'], capture_output=True, text=True).stdout.split()[2]})")
    print(f"{'runtime / platform':22} {'median ms':>10} {'vs runc':>8}  status")
    for s in sides:
        if s.times and not s.error:
            m = med(s.times)
            print(f"{s.name:22} {m * 1000:10.1f} {m / base:8.2f}  ok")
        else:
            print(f"{s.name:22} {'-':>10} {'-':>8}  unusable: {s.error}")
    flags = Path("/proc/cpuinfo").read_text()
    print(f"/dev/kvm {'present' if Path('/dev/kvm').exists() else 'absent'}; CPU virtualisation flags (vmx/svm) "
          f"{'present' if (' vmx' in flags or ' svm' in flags) else 'absent'} (kvm inside a VM needs nested virtualisation)")


def bench_engine(n: int) -> None:
    from sandbox import api
    from sandbox.doctor import runsc_platform
    from sandbox.runtime import Runtime

    rt = Runtime(owner_kind="bench")
    info = rt.client.info()
    if "runsc" not in (info.get("Runtimes") or {}):
        print("\nEngine part skipped: runsc is not registered with the engine (./run setup registers it)")
        return
    platform = runsc_platform(info)
    gv, cp = api.load_compiled("gvisor"), api.load_compiled("default")

    def once(c: Any) -> Callable[[], float]:
        def f() -> float:
            t0 = time.perf_counter()
            s = rt.create(c)
            try:
                res = s.exec(["python3", "-c", "print(1)"])
                assert res.stdout == b"1\n", res
            finally:
                s.destroy()
            return time.perf_counter() - t0
        return f

    try:
        once(gv)()
        once(cp)()
        ours: list[float] = []
        base: list[float] = []
        for _ in range(n):
            ours.append(once(gv)())
            base.append(once(cp)())
    finally:
        rt.gc(mine=True)
    print(f"\nEngine: the API's create -> first result -> destroy, {n} interleaved rounds; medians in ms")
    print(f"{'profile':40} {'median ms':>10} {'vs runc':>8}")
    print(f"{'gvisor (runsc, platform ' + platform + ')':40} {med(ours) * 1000:10.1f} {med(ours) / med(base):8.2f}")
    print(f"{'default (runc)':40} {med(base) * 1000:10.1f} {1.0:8.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=7, help="interleaved rounds")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds before a platform counts as hanging")
    ap.add_argument("--image", default="sandbox-runtime:latest")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--skip-oci", action="store_true")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_gvisor: the OCI part runs runc/runsc directly and needs root")
    print(f"gVisor platforms; load average before: {loadavg()} ({os.cpu_count()} CPUs)")
    tmp = Path(tempfile.mkdtemp(prefix="bench-gvisor-", dir="/tmp"))
    try:
        if not a.skip_oci:
            bench_oci(a.n, a.image, a.timeout, tmp)
        if not a.skip_engine:
            bench_engine(a.n)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"load average after: {loadavg()}")


if __name__ == "__main__":
    main()
