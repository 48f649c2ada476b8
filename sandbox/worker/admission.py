"""Admission control: claim more work only when the host can hold another sandbox.

Before each poll the worker asks whether the host has room for one more
session under the environment's policy: available memory for the sandbox's
memory limit (tmpfs mounts count against it) plus a host reserve, free disk in
the state directory for a disk-backed workspace, and a CPU share: sandboxes
share the cores by equal weight, so one more gets cores / (busy sandboxes + 1),
which must not fall below ``min_cpu_share``. If not, the work stays in the
queue (another worker, or this one later, claims it) rather than being claimed
and starved. A warm sandbox already exists, so using one needs no new headroom.

CPU is judged by the number of *busy sandboxes* (containers whose CPU use over
the last interval exceeded half a core), not by the load average: one session's
fork or thread bomb adds hundreds to the load average (it counts every runnable
task) and would stop the worker claiming anyone's work for minutes, while it
adds one busy sandbox. The load-average gate is still there for operators who
want it (``load_per_cpu``; off by default).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import psutil

from sandbox.policy import Policy

MiB = 1 << 20


@dataclass(frozen=True)
class HostStats:
    available_memory: int
    free_disk: int
    load1: float
    cpus: int
    busy_sandboxes: int = 0  # containers that used more than half a core since the last probe


class Probe(Protocol):
    def __call__(self) -> HostStats: ...


def _container_cpu_ns(parent: str = "docker") -> dict[str, int]:
    """CPU time (ns) of each container cgroup under the engine's cgroupfs parent, by id."""
    out: dict[str, int] = {}
    v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
    root = Path("/sys/fs/cgroup") / parent if v2 else Path("/sys/fs/cgroup/cpuacct") / parent
    try:
        dirs = [d for d in root.iterdir() if d.is_dir()]
    except OSError:
        return out
    for d in dirs:
        try:
            if v2:
                for line in (d / "cpu.stat").read_text().splitlines():
                    if line.startswith("usage_usec "):
                        out[d.name] = int(line.split()[1]) * 1000
            else:
                out[d.name] = int((d / "cpuacct.usage").read_text())
        except (OSError, ValueError):
            continue
    return out


class BusySandboxes:
    """How many containers used more than half a core between two calls (0 on the first)."""

    def __init__(self, read: Callable[[], dict[str, int]] = _container_cpu_ns,
                 clock: Callable[[], float] = time.monotonic):
        self.read = read
        self.clock = clock
        self.last: tuple[float, dict[str, int]] | None = None

    def __call__(self) -> int:
        now, usage = self.clock(), self.read()
        last, self.last = self.last, (now, usage)
        if last is None or now - last[0] <= 0:
            return 0
        span_ns = (now - last[0]) * 1e9
        return sum(1 for cid, ns in usage.items() if ns - last[1].get(cid, ns) > span_ns / 2)


def psutil_probe(disk_path: Path) -> Callable[[], HostStats]:
    busy = BusySandboxes()

    def probe() -> HostStats:
        path = disk_path if disk_path.exists() else Path("/")
        return HostStats(
            available_memory=int(psutil.virtual_memory().available),
            free_disk=int(psutil.disk_usage(str(path)).free),
            load1=float(os.getloadavg()[0]),
            cpus=int(psutil.cpu_count() or 1),
            busy_sandboxes=busy(),
        )
    return probe


@dataclass(frozen=True)
class Decision:
    ok: bool
    resource: str = ""  # memory | disk | load, when refused
    reason: str = ""


@dataclass
class Admission:
    policy: Policy
    probe: Callable[[], HostStats]
    memory_reserve_mb: int = 256  # left for the host itself
    disk_reserve_mb: int = 512
    min_cpu_share: float = 0.05  # of a core, for the new sandbox among the busy ones
    load_per_cpu: float = 0.0  # 0: no load-average gate (a tenant's bomb would drive it)

    def needs(self) -> tuple[int, int, float]:
        """(memory bytes, disk bytes, cpus) one more sandbox of this policy reserves."""
        p = self.policy
        mem = p.limits.memory_mb * MiB
        disk = p.workspace.size_mb * MiB if p.workspace.backing == "disk" else 0
        return mem, disk, float(p.limits.cpus)

    def check(self) -> Decision:
        stats = self.probe()
        mem, disk, cpus = self.needs()
        if stats.available_memory < mem + self.memory_reserve_mb * MiB:
            return Decision(False, "memory", f"{stats.available_memory // MiB} MiB available, a session needs "
                                             f"{mem // MiB} MiB + {self.memory_reserve_mb} MiB host reserve")
        if stats.free_disk < disk + self.disk_reserve_mb * MiB:
            return Decision(False, "disk", f"{stats.free_disk // MiB} MiB free, a session needs "
                                           f"{disk // MiB} MiB + {self.disk_reserve_mb} MiB reserve")
        share = stats.cpus / (stats.busy_sandboxes + 1)
        if share < self.min_cpu_share:
            return Decision(False, "cpu", f"{stats.busy_sandboxes} busy sandboxes on {stats.cpus} cores: "
                                          f"one more would get {share:.2f} of a core (minimum {self.min_cpu_share:g})")
        if self.load_per_cpu and stats.load1 + cpus > stats.cpus * self.load_per_cpu:
            return Decision(False, "load", f"load {stats.load1:.1f} + {cpus:g} CPUs over "
                                           f"{stats.cpus} cores x {self.load_per_cpu:g}")
        return Decision(True)
