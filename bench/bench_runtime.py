"""Runtime benchmark: the runtime rows of issue 11's table (run by hand).

    python bench/bench_runtime.py [-n 15] [--idle 100] [--only cold,api,live,idle,gvisor] [--ab-image TAG]

Rows, each against a baseline measured in the same run, rounds interleaved so both sides
see the same machine load, medians and their ratio (nothing is asserted):

- cold:   `sandbox exec -- python3 -c 'print(1)'`, a whole CLI process, vs a hardened
          `docker run --rm` with the same flags and image (aim <= 0.8x);
- api:    the Python API in-process, create -> first result -> destroy, vs the same
          `docker run` (aim <= 0.5x);
- live:   `print(1)` in a running sandbox vs `docker exec` into the same container (<= 0.3x);
- idle:   N idle sandboxes at once: host memory each (MemAvailable before/after), what it
          is made of (agent, containerd-shim, cgroup), extrapolated to this host (aim >= 500
          at <= 10 MiB each);
- gvisor: create -> first result -> destroy under runsc (the registered platform) vs runc,
          and each platform runsc offers tried with `runsc do` (kvm needs a usable /dev/kvm).

`--ab-image TAG` adds the API row once more with another build of the sandbox image (the same
policy otherwise), interleaved in the same rounds: an agent change measured against the agent it
replaces (`docker images sandbox-runtime` lists the builds; each is tagged by its content).

The machine's load average is printed with the results: on a shared host, read ratios.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from sandbox import api
from sandbox.runtime import Runtime

PRINT1 = ["python3", "-c", "print(1)"]
med = statistics.median


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_quiet(cmd: list[str], env: dict[str, str] | None = None) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)


def docker_run_cmd(facts: dict[str, Any], seccomp_file: str, uid: int) -> list[str]:
    """`docker run --rm` with the flags the runtime's create body sets (same image, user,
    seccomp profile, limits, rlimits, tmpfs, no network, no log driver)."""
    rl, lim, ws = facts["rlimits"], facts["limits"], facts["workspace"]
    cmd = ["docker", "run", "--rm", f"--user={uid}:{uid}", "--read-only", "--cap-drop=ALL",
           "--security-opt=no-new-privileges", f"--security-opt=seccomp={seccomp_file}", "--network=none",
           f"--pids-limit={lim['pids']}", f"--memory={lim['memory_mb']}m", f"--memory-swap={lim['memory_mb']}m",
           f"--cpus={lim['cpus']}", "--log-driver=none", "--ipc=private", "--cgroupns=private", "--shm-size=16m",
           "--hostname=sandbox", "--oom-score-adj=500"]
    for t in facts["tmpfs"]:
        cmd.append(f"--tmpfs={t['path']}:rw,nosuid,nodev,{'exec' if t['exec'] else 'noexec'},size={t['size_mb']}m")
    cmd.append(f"--tmpfs={ws['path']}:rw,nosuid,nodev,exec,size={ws['size_mb']}m,uid={uid},gid={uid},mode=0700")
    cmd += [f"--ulimit=nofile={rl['nofile']}", f"--ulimit=nproc={rl['nproc']}", "--ulimit=core=0",
            f"--ulimit=fsize={rl['fsize_mb'] << 20}", f"--ulimit=cpu={rl['cpu_s']}",
            f"--ulimit=stack={rl['stack_mb'] << 20}"]
    return cmd + [facts["image"], *PRINT1]


def row(label: str, ours: list[float], base: list[float] | None, aim: str = "") -> None:
    if base:
        r = med(ours) / med(base)
        print(f"{label:62} {med(ours) * 1000:8.1f} {med(base) * 1000:9.1f} {r:7.2f}  {aim}")
    else:
        print(f"{label:62} {med(ours) * 1000:8.1f} {'':9} {'':7}  {aim}")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# ------------------------------------------------------------------ rows

def bench_cold_and_api(n: int, cp: Any, base_cmd: list[str], only: set[str], ab_image: str | None = None) -> None:
    script = Path(sysconfig.get_path("scripts")) / "sandbox"  # not a version-manager shim (pyenv adds ~0.3 s)
    cli = [str(script if script.exists() else shutil.which("sandbox")), "exec", "--", *PRINT1]

    phases: dict[str, list[float]] = {}
    ab_phases: dict[str, list[float]] = {}
    record = [phases]  # where the engine calls below are counted (the A/B side has its own)
    stamps: dict[str, float] = {}  # when the last create began and the last start returned
    eng = api._runtime("api").engine
    for name in ("create", "attach", "start", "containers"):  # the engine's share of the API row, call by call
        def wrap(orig: Callable[..., Any], name: str = name) -> Callable[..., Any]:
            def f(*a: Any, **k: Any) -> Any:
                t = time.perf_counter()
                stamps[name + "0"] = t
                try:
                    return orig(*a, **k)
                finally:
                    stamps[name + "1"] = time.perf_counter()
                    record[0].setdefault(name, []).append(stamps[name + "1"] - t)
            return f
        setattr(eng, name, wrap(getattr(eng, name)))

    def api_once(policy: Any = cp, into: dict[str, list[float]] = phases) -> None:
        record[0] = into
        t0 = time.perf_counter()
        sb = api.open(policy)
        t1 = time.perf_counter()
        try:
            assert sb.exec(PRINT1).stdout == b"1\n"
        finally:
            t2 = time.perf_counter()
            sb.close()
            t3 = time.perf_counter()
        into.setdefault("open", []).append(t1 - t0)
        into.setdefault("before create", []).append(stamps["create0"] - t0)
        into.setdefault("after start", []).append(t1 - stamps["start1"])
        into.setdefault("between", []).append(stamps["attach0"] - stamps["create1"] + stamps["start0"] - stamps["attach1"])
        into.setdefault("exec", []).append(t2 - t1)
        into.setdefault("close", []).append(t3 - t2)
        record[0] = phases

    def cli_once() -> None:
        out = subprocess.run(cli, check=True, capture_output=True).stdout
        assert out == b"1\n", out

    sides: dict[str, Callable[[], None]] = {"docker run": lambda: run_quiet(base_cmd)}
    if "cold" in only:
        sides["cli"] = cli_once
    if "api" in only:
        sides["api"] = api_once
        if ab_image:
            from sandbox.policycache import CompiledPolicy

            other = CompiledPolicy(dict(cp.facts, image=ab_image), source=cp.source)
            sides["api B"] = lambda: api_once(other, ab_phases)
    for fn in sides.values():
        fn()  # warm caches (the policy cache included)
    samples: dict[str, list[float]] = {k: [] for k in sides}
    for i in range(n):
        order = list(sides)
        if i % 2:
            order.reverse()
        for k in order:
            samples[k].append(timed(sides[k]))
    if "cli" in samples:
        row("cold `sandbox exec -- python3 -c 'print(1)'` vs docker run --rm", samples["cli"],
            samples["docker run"], "aim <= 0.8")
        py = [sys.executable]
        floors = {"interpreter start, site included (the venv's .pth hooks)": py + ["-c", "pass"],
                  "interpreter start without site": py + ["-S", "-c", "pass"],
                  "  + the exec path's imports and the cached policy": py + [
                      "-c", "import sandbox.execcmd, sandbox.api; sandbox.api.load_compiled('default')"]}
        for label, cmd in floors.items():
            row(f"  {label}", [timed(lambda: run_quiet(cmd)) for _ in range(max(5, n // 2))], None)
    if "api" in samples:
        row("API in-process create -> first result -> destroy vs docker run", samples["api"],
            samples["docker run"], "aim <= 0.5")
        _split(phases, med(samples["docker run"]))
    if "api B" in samples:
        row(f"  the same with image {ab_image} (A/B) vs docker run", samples["api B"], samples["docker run"])
        _split(ab_phases, med(samples["docker run"]))
        row("  A/B: this image vs that one (ratio of medians)", samples["api"], samples["api B"])


def _split(phases: dict[str, list[float]], base: float) -> None:
    engine = sum(med(phases[k]) for k in ("create", "attach", "start"))
    listing = med(phases["containers"])
    rest = med(phases["open"]) - engine - listing
    pre, post, gaps = med(phases["before create"]), med(phases["after start"]), med(phases["between"])
    print(f"  of which: engine create+attach+start {engine * 1000:.1f} ms ({engine / base:.2f}x of docker run), "
          f"uid lease's container listing {listing * 1000:.1f} ({listing / base:.2f}x), "
          f"agent start and host {rest * 1000:.1f} ({rest / base:.2f}x: before the create {pre * 1000:.1f}, "
          f"between the engine calls {gaps * 1000:.1f}, from the engine's start to the agent's ready "
          f"{post * 1000:.1f}), first exec "
          f"{med(phases['exec']) * 1000:.1f} ({med(phases['exec']) / base:.2f}x), destroy "
          f"{med(phases['close']) * 1000:.1f} ({med(phases['close']) / base:.2f}x)")


def bench_live(n: int, rt: Runtime, cp: Any) -> None:
    sb = rt.create(cp)
    try:
        ours, base, true_ = [], [], []
        dexec = ["docker", "exec", sb.id, *PRINT1]
        for _ in range(n):
            ours.append(timed(lambda: sb.exec(PRINT1)))
            base.append(timed(lambda: run_quiet(dexec)))
            true_.append(timed(lambda: sb.exec(["true"])))
        row("print(1) in a live sandbox vs docker exec", ours, base, "keep <= 0.3")
        row("  `true` in a live sandbox (channel + fork/exec floor)", true_, None)
    finally:
        sb.destroy()


def _pss_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process in KiB from smaps_rollup."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def _mem_available_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return 0


def _daemons_rss_kib() -> int:
    """RSS of dockerd and containerd together (their per-container state grows with sandboxes)."""
    total = 0
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if (p / "comm").read_text().strip() in ("dockerd", "containerd"):
                    total += _pss_kib(int(p.name))[0]
            except OSError:
                pass
    return total


def _cgroup_kmem(pid: int) -> int:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        if "memory" in ctrls.split(","):
            p = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.kmem.usage_in_bytes"
            if p.exists():
                return int(p.read_text())
    return 0


def _cgroup_usage(pid: int) -> int:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        if "memory" in ctrls.split(","):
            p = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.usage_in_bytes"
            if p.exists():
                return int(p.read_text())
        if ctrls == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            p = Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.current"
            if p.exists():
                return int(p.read_text())
    return 0


def bench_idle(count: int, rt: Runtime, cp: Any) -> None:
    subprocess.run(["sync"], check=False)
    time.sleep(2)
    before = _mem_available_kib()
    daemons_before = _daemons_rss_kib()
    t0 = time.perf_counter()
    boxes: list[Any] = []
    lock = threading.Lock()

    def one(_: int) -> None:
        s = rt.create(cp)
        with lock:
            boxes.append(s)

    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(one, range(count)))
        wall = time.perf_counter() - t0
        time.sleep(3)  # let the engine settle
        after = _mem_available_kib()
        daemons = (_daemons_rss_kib() - daemons_before) / 1024 / count
        pids = [rt.engine.inspect(s.id)["State"]["Pid"] for s in boxes]
        agent = [_pss_kib(p) for p in pids]
        shims = []
        for p in pids:
            try:
                ppid = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
                shims.append(_pss_kib(ppid))
            except (OSError, ValueError):
                pass
        cg = [_cgroup_usage(p) for p in pids]
        kmem = [_cgroup_kmem(p) for p in pids]
        total_mib = (before - after) / 1024
        each = total_mib / count
        print(f"{count} idle sandboxes started in {wall:.1f} s ({wall / count * 1000:.0f} ms each, 4 threads)")
        print(f"  host memory (MemAvailable drop) {total_mib:8.1f} MiB total, {each:6.2f} MiB per sandbox  "
              "aim <= 10 MiB")
        print(f"  agent (PID 1, python3)          RSS {med(a[0] for a in agent) / 1024:6.2f}  "
              f"PSS {med(a[1] for a in agent) / 1024:6.2f} MiB (median)")
        if shims:
            print(f"  containerd-shim per sandbox     RSS {med(s[0] for s in shims) / 1024:6.2f}  "
                  f"PSS {med(s[1] for s in shims) / 1024:6.2f} MiB (median)")
        print(f"  memory cgroup usage             {med(cg) / 2**20:6.2f} MiB (median; page cache and tmpfs included), "
              f"kernel memory in it {med(kmem) / 2**20:.2f} MiB")
        print(f"  dockerd + containerd RSS growth {daemons:6.2f} MiB per sandbox")
        parts = (med(a[1] for a in agent) + (med(s[1] for s in shims) if shims else 0)) / 1024 \
            + med(kmem) / 2**20 + max(daemons, 0)
        print(f"  sum of parts (agent PSS + shim PSS + kernel memory + daemons) {parts:6.2f} MiB per sandbox "
              "(MemAvailable on a shared host moves with everyone else's work)")
        host_kib = _mem_available_kib()
        print(f"  at {parts:.2f} MiB each (by parts), MemAvailable now ({host_kib / 2**20:.1f} GiB) holds "
              f"{int(host_kib / 1024 / max(parts, 0.01))} more; at {each:.2f} (MemAvailable drop) "
              f"{int(host_kib / 1024 / max(each, 0.01))}; aim >= 500")
        uids = {s.uid for s in boxes}
        print(f"  distinct uids: {len(uids)} of {count}")
        lst = [timed(lambda: rt._id_carried(boxes[0].uid)) for _ in range(5)]
        print(f"  asking the engine whether a uid is carried (every create does, once; sandbox/identity.py): "
              f"{med(lst) * 1000:.1f} ms with {count} live")
        one = [timed(lambda: boxes[0].exec(["true"])) for _ in range(5)]
        print(f"  `true` in one of them with {count} live: {med(one) * 1000:.1f} ms")
    finally:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda s: s.destroy(), boxes))
    _idle_floor(min(count, 50), rt, cp)


def _idle_floor(count: int, rt: Runtime, cp: Any) -> None:
    """The same create body with `sleep` as PID 1 instead of the agent: what the engine, the
    shim and the kernel cost per container, whatever runs inside."""
    from sandbox import spec as specmod

    ids, leases = [], []
    try:
        for i in range(count):
            ident = rt.lease_identity(cp)
            leases.append(ident)
            body = specmod.body_from_facts(cp.facts, f"bench-floor-{i}", owner=rt.owner,
                                           ids=specmod.Ids(ident.uid, ident.gid)).body
            body.update(Cmd=["sleep", "3600"], OpenStdin=False, StdinOnce=False, AttachStdin=False)
            cid = rt.engine.create(body, name=f"sandbox-bench-floor-{os.getpid()}-{i}")
            ids.append(cid)
            rt.engine.start(cid)
        time.sleep(3)
        pids = [rt.engine.inspect(c)["State"]["Pid"] for c in ids]
        sleeps = [_pss_kib(p)[1] for p in pids]
        shims = []
        for p in pids:
            try:
                shims.append(_pss_kib(int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1]))[1])
            except (OSError, ValueError):
                pass
        kmem = [_cgroup_kmem(p) for p in pids]
        floor = (med(sleeps) + (med(shims) if shims else 0)) / 1024 + med(kmem) / 2**20
        print(f"  floor: the same body with `sleep` as PID 1: {floor:6.2f} MiB per container by parts (sleep PSS "
              f"{med(sleeps) / 1024:.2f}, shim PSS {med(shims) / 1024 if shims else 0:.2f}, kernel "
              f"{med(kmem) / 2**20:.2f}; daemons as above): the agent is the rest")
    finally:
        for c in ids:
            try:
                rt.engine.kill(c)
            except Exception:  # noqa: BLE001 - AutoRemove; already gone
                pass
        for ident in leases:
            ident.release()


def bench_gvisor(n: int, rt: Runtime, cp: Any) -> None:
    runtimes = rt.client.info().get("Runtimes", {})
    if "runsc" in runtimes:
        args = runtimes["runsc"].get("runtimeArgs") or []
        gv = api.load_compiled("gvisor")

        def once(c: Any) -> Callable[[], None]:
            def f() -> None:
                s = rt.create(c)
                try:
                    assert s.exec(PRINT1).stdout == b"1\n"
                finally:
                    s.destroy()
            return f

        once(gv)()
        ours, base = [], []
        for _ in range(n):
            ours.append(timed(once(gv)))
            base.append(timed(once(cp)))
        row(f"gVisor create->result->destroy vs runc ({' '.join(args)})", ours, base)
    else:
        print("gVisor: runsc is not registered with the engine")
    runsc = shutil.which("runsc")
    if not runsc:
        return
    ver = subprocess.run([runsc, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    for platform in ("ptrace", "kvm", "systrap"):
        times, err = [], ""
        for _ in range(min(n, 5)):
            t = time.perf_counter()
            # its own process group: a platform that hangs leaves no sandbox or gofer behind
            p = subprocess.Popen([runsc, f"--platform={platform}", "--network=none", "do", "/bin/true"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
            try:
                _, stderr = p.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
                err = "hangs (no result in 15 s)"
                break
            if p.returncode != 0:
                err = (stderr.strip().splitlines() or ["failed"])[-1][:100]
                break
            times.append(time.perf_counter() - t)
        status = f"{med(times) * 1000:7.1f} ms" if times and not err else f"unusable: {err}"
        print(f"  `runsc do /bin/true` --platform={platform:8} {status}   ({ver})")
    kvm = Path("/dev/kvm")
    flags = Path("/proc/cpuinfo").read_text()
    print(f"  /dev/kvm {'present' if kvm.exists() else 'absent'}; CPU virtualisation flags (vmx/svm): "
          f"{'yes' if (' vmx' in flags or ' svm' in flags) else 'no'}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=15, help="interleaved rounds per row")
    ap.add_argument("--idle", type=int, default=100, help="idle sandboxes to start at once")
    ap.add_argument("--only", default="cold,api,live,idle,gvisor")
    ap.add_argument("--ab-image", help="also run the API row with this image (e.g. sandbox-runtime:<tag>)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    # An installed wheel ships bytecode; an editable install under PYTHONDONTWRITEBYTECODE would
    # compile the package on every cold start. Measure what users run: compiled.
    import sandbox

    compileall.compile_dir(str(Path(sandbox.__file__).parent), quiet=1)
    cp = api.load_compiled("default")
    rt = Runtime(owner_kind="bench")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(cp.facts["seccomp_profile"], f)
        seccomp_file = f.name
    ident = rt.lease_identity(cp)  # the baseline runs as a leased uid too, held for the whole run
    base_cmd = docker_run_cmd(cp.facts, seccomp_file, ident.uid)
    print(f"Runtime benchmark: n={args.n} interleaved rounds, medians in ms; load average before: {loadavg()}")
    print(f"CLI entry point: {(Path(sysconfig.get_path('scripts')) / 'sandbox').read_text().splitlines()[4:5]}")
    print(f"{'row':62} {'ours':>8} {'baseline':>9} {'ratio':>7}")
    try:
        if only & {"cold", "api"}:
            bench_cold_and_api(args.n, cp, base_cmd, only, args.ab_image)
        if "live" in only:
            bench_live(args.n, rt, cp)
        if "gvisor" in only:
            bench_gvisor(max(3, args.n // 2), rt, cp)
        if "idle" in only and args.idle > 0:
            bench_idle(args.idle, rt, cp)
    finally:
        ident.release()
        os.unlink(seccomp_file)
        rt.gc(mine=True)
    print(f"load average after: {loadavg()}  ({os.cpu_count()} CPUs)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
