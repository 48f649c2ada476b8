"""CPU hogs yield to their neighbours: a sandbox that keeps running into its CPU quota gets a lower weight.

Sandboxes share the cores by weight and each is capped by its quota (``limits.cpus``).
A quota alone does not keep a bomb off a neighbour's core: a sandbox capped at one CPU
of two, running many spinners, spreads them over both cores, and on the neighbour's core
the two share by weight until the quota runs out. Measured (bench/bench_neighbours.py):
B's job took 1.33-1.36x as long beside such a sandbox, which is what the arithmetic
gives (A runs 75 ms of every 100 ms period, B gets 2/3 of its core meanwhile). With
16 busy neighbours, a new sandbox's first command got 1/17 of the CPU.

So the owner of some sandboxes watches them (one thread per :class:`HogDemoter`, every
``interval`` seconds, two small cgroup files per sandbox): a sandbox throttled in at least
half of its quota periods wants more CPU than it may have, and so does one that took its
whole share of a saturated host (at least 0.8 of what the busy sandboxes got on average)
for two intervals running. Its CPU weight is divided by ``factor``, so a sandbox that only
now has work (a new session's start, a bystander's command) is not held to 1/N of the CPU
behind N bombs. It keeps its whole quota whenever the cores are free (weight only matters
under contention), and gets its weight back once it is quiet: under a tenth of a core for
``hold`` seconds *and* its tasks not waiting for a CPU (a starved bomb uses little CPU too;
its tasks' schedstat tells it from an idle one). Best effort: no cgroup file, no demotion;
nothing here makes any limit weaker.
"""

from __future__ import annotations

import os
import _thread
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sandbox import lazylog

log = lazylog.get("sandbox.hogs")  # the cold `sandbox exec` path imports no logging

CGROUP_V2 = _V2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()  # pure v2, not hybrid


def cpu_cgroup(pid: int) -> Path | None:
    """The CPU cgroup directory of process ``pid``, as the host sees it."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if _V2 and controllers == "":
            return Path("/sys/fs/cgroup") / path.lstrip("/")
        if not _V2 and "cpu" in controllers.split(","):
            return Path("/sys/fs/cgroup") / controllers / path.lstrip("/")
    return None


def _read_small(path: str) -> bytes:
    """One small kernel file in one read (no text layer: this runs for every sandbox, every tick)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 8192)
    finally:
        os.close(fd)


def read_cpu_stat(d: Path | str) -> tuple[int, int, int] | None:
    """(periods, throttled periods, usage ns) of a cgroup, or None."""
    base = str(d)
    try:
        periods = throttled = usage = -1
        for line in _read_small(base + "/cpu.stat").split(b"\n"):
            key, _, value = line.partition(b" ")
            if key == b"nr_periods":
                periods = int(value)
            elif key == b"nr_throttled":
                throttled = int(value)
            elif key == b"usage_usec":
                usage = int(value) * 1000
        if not _V2:
            acct = base.replace("/cpu/", "/cpuacct/", 1) if "/cpu/" in base else base
            usage = int(_read_small(acct + "/cpuacct.usage"))
        if periods < 0 or throttled < 0 or usage < 0:
            return None
        return periods, throttled, usage
    except (OSError, ValueError):
        return None


def host_idle_ns() -> int | None:
    """The host's idle + iowait time over all cores since boot (/proc/stat), in ns."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return (int(fields[4]) + int(fields[5])) * (1_000_000_000 // (os.sysconf("SC_CLK_TCK") or 100))
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class _Watch:
    dir: Path
    weight_file: Path
    original: str
    last: tuple[int, int, int] | None = None
    demoted: bool = False
    busy_ticks: int = 0
    since: float = 0.0  # when it last looked like a hog
    delays: dict[str, int] | None = None  # run_delay per task at the last look (demoted only)


def waited_ns(w: _Watch) -> int | None:
    """How long the sandbox's tasks waited on a run queue since the last call (their schedstat).

    Tells a starved sandbox from an idle one: both use little CPU, only the starved one waits.
    Read only for a demoted sandbox that looks quiet (one small file per task)."""
    listing = w.dir / ("cgroup.threads" if _V2 else "tasks")
    now: dict[str, int] = {}
    try:
        tids = listing.read_text().split()
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{tid}/schedstat") as f:
                now[tid] = int(f.read().split()[1])
        except (OSError, ValueError, IndexError):
            continue
    before, w.delays = w.delays, now
    if before is None:
        return None  # the first look: nothing to compare with yet
    return sum(v - before.get(tid, 0) for tid, v in now.items())


class HogDemoter:
    def __init__(self, interval: float = 0.25, factor: int = 8, hog_fraction: float = 0.5,
                 quiet_cores: float = 0.1, hold: float = 3.0):
        self.hold = hold
        self.interval = interval
        self.factor = factor
        self.hog_fraction = hog_fraction
        self.quiet_cores = quiet_cores
        self.cpus = os.cpu_count() or 1
        self._idle: int | None = host_idle_ns()
        self._watched: dict[str, _Watch] = {}
        self._lock = threading.Lock()
        self._running = False  # the watcher thread runs (it ends when nothing is watched)
        self._last_tick = time.monotonic()

    def watch(self, key: str, pid: int) -> bool:
        d = cpu_cgroup(pid)
        if d is None:
            return False
        wf = d / ("cpu.weight" if _V2 else "cpu.shares")
        try:
            original = wf.read_text().strip()
        except OSError:
            return False
        with self._lock:
            self._watched[key] = _Watch(d, wf, original, read_cpu_stat(d))
            if not self._running:
                # A bare thread: threading.Thread.start() waits for the new thread to report in, a
                # context switch on the path of every create (0.2-1.7 ms measured in the API row).
                self._running = True
                _thread.start_new_thread(self._run, ())
        return True

    def unwatch(self, key: str) -> None:
        with self._lock:
            self._watched.pop(key, None)

    def demoted(self, key: str) -> bool:
        w = self._watched.get(key)
        return bool(w and w.demoted)

    def _run(self) -> None:
        try:
            while True:
                # Every 0.25 s with up to 64 sandboxes (a storm is caught within a second), then
                # slower so that watching hundreds of idle sandboxes stays cheap (two reads each).
                n = len(self._watched)
                time.sleep(self.interval * (1 if n <= 64 else 2 if n <= 256 else 4))
                with self._lock:
                    if not self._watched:
                        self._running = False
                        return
                    watched = list(self._watched.values())
                self.tick(watched)
        except BaseException:
            with self._lock:
                self._running = False  # the next watch() starts another
            raise

    def tick(self, watched: list[_Watch] | None = None) -> None:
        now = time.monotonic()
        span_ns = max(now - self._last_tick, 1e-3) * 1e9
        self._last_tick = now
        if watched is None:
            with self._lock:
                watched = list(self._watched.values())
        deltas: list[tuple[_Watch, int, int, int]] = []
        for w in watched:
            cur = read_cpu_stat(w.dir)
            if cur is None:
                continue
            last, w.last = w.last, cur
            if last is not None:
                deltas.append((w, cur[0] - last[0], cur[1] - last[1], cur[2] - last[2]))
        # The host is saturated when its cores were (nearly) never idle: then a sandbox that took
        # its whole share (an equal split among the busy ones) for two intervals running is batch
        # work, not interactive.
        active = [d for d in deltas if d[3] > 0.02 * span_ns]  # had some work at all
        idle, self._idle = self._idle, host_idle_ns()
        saturated = idle is not None and self._idle is not None and self._idle - idle < 0.1 * self.cpus * span_ns
        fair_ns = sum(d[3] for d in active) / max(len(active), 1)  # what an equal split gave each
        for w, periods, throttled, used in deltas:
            over_quota = periods > 0 and throttled >= self.hog_fraction * periods
            full_share = saturated and len(active) >= 2 and used >= 0.8 * fair_ns
            w.busy_ticks = w.busy_ticks + 1 if full_share else 0
            if over_quota or w.busy_ticks >= 2:
                if not w.demoted:
                    self._set(w, str(max(2 if not _V2 else 1, int(w.original) // self.factor)))
                    w.demoted = True
                w.since = now
            elif w.demoted and used < self.quiet_cores * span_ns:
                # A demoted bomb that merely gets little CPU looks quiet too: it is quiet only if its
                # tasks did not wait for a CPU either (after ``hold`` seconds at the lower weight).
                waited = waited_ns(w)
                if now - w.since >= self.hold and waited is not None and waited < self.quiet_cores * span_ns:
                    self._set(w, w.original)
                    w.demoted = False
                    w.delays = None
            else:
                w.delays = None

    @staticmethod
    def _set(w: _Watch, value: str) -> None:
        try:
            w.weight_file.write_text(value)
        except OSError as e:
            log.debug("could not set %s: %s", w.weight_file, e)
