"""Admission control: claim more work only when the host can hold another sandbox.

Before each poll the worker asks whether the host has room for one more
session under the environment's policy: available memory for the sandbox's
memory limit (tmpfs mounts count against it) plus a host reserve, free disk in
the state directory for a disk-backed workspace, and a load average that the
sandbox's CPUs would not push past a multiple of the host's cores. If not, the
work stays in the queue (another worker, or this one later, claims it) rather
than being claimed and starved. A warm sandbox already exists, so using one
needs no new headroom.
"""

from __future__ import annotations

import os
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


class Probe(Protocol):
    def __call__(self) -> HostStats: ...


def psutil_probe(disk_path: Path) -> Callable[[], HostStats]:
    def probe() -> HostStats:
        path = disk_path if disk_path.exists() else Path("/")
        return HostStats(
            available_memory=int(psutil.virtual_memory().available),
            free_disk=int(psutil.disk_usage(str(path)).free),
            load1=float(os.getloadavg()[0]),
            cpus=int(psutil.cpu_count() or 1),
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
    load_per_cpu: float = 4.0  # generous: load counts runnable + I/O-blocked tasks

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
        if stats.load1 + cpus > stats.cpus * self.load_per_cpu:
            return Decision(False, "load", f"load {stats.load1:.1f} + {cpus:g} CPUs over "
                                           f"{stats.cpus} cores x {self.load_per_cpu:g}")
        return Decision(True)
