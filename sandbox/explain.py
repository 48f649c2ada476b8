"""Turn a Policy into rows a person can check: what is allowed, what is denied."""

from __future__ import annotations

from sandbox import seccomp as sc
from sandbox.policy import Policy
from sandbox.spec import SHM_SIZE_MB


def explain_rows(p: Policy) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = [
        ("identity", "user", f"uid {p.user.uid}, gid {p.user.gid} (never root), no supplementary groups"),
        ("identity", "privileges", "all capabilities dropped; no-new-privileges; no setuid/setgid binaries in image"),
        ("runtime", "image", p.image),
        ("runtime", "OCI runtime", p.runtime + (" (gVisor: user-space kernel)" if p.runtime == "runsc" else "")),
        ("filesystem", "root", "read-only"),
        ("filesystem", "workspace", f"{p.workspace.path}: {p.workspace.backing}, {p.workspace.size_mb} MiB cap, "
                                    f"owned by uid {p.user.uid}, mode 0700"),
    ]
    for t in p.tmpfs:
        rows.append(("filesystem", "tmpfs", f"{t.path}: {t.size_mb} MiB cap, nosuid, nodev, "
                                            f"{'exec' if t.exec else 'noexec'}"))
    rows.append(("filesystem", "tmpfs", f"/dev/shm: {SHM_SIZE_MB} MiB cap, noexec"))
    for m in p.read_only_mounts:
        rows.append(("filesystem", "read-only mount", f"{m.source} -> {m.target}"))
    if not p.read_only_mounts:
        rows.append(("filesystem", "host paths", "none mounted (no Docker socket, no /proc, /sys, /dev of the host)"))
    lim, rl = p.limits, p.rlimits
    rows += [
        ("limits", "memory", f"{lim.memory_mb} MiB, swap 0 (tmpfs contents count here)"),
        ("limits", "cpu", f"{lim.cpus} CPU(s) quota"),
        ("limits", "pids", str(lim.pids)),
        ("rlimits", "nofile / nproc", f"{rl.nofile} / {rl.nproc}"),
        ("rlimits", "fsize / core / stack", f"{rl.fsize_mb} MiB / 0 / {rl.stack_mb} MiB"),
        ("rlimits", "cpu time", f"{rl.cpu_s} s"),
        ("timeouts", "per call / per session", f"{p.timeouts.call_s:g} s / {p.timeouts.session_s:g} s"),
        ("output", "cap per call", f"{p.output.max_bytes} bytes"),
    ]
    flt = sc.for_runtime(sc.compile_filter(p.seccomp), p.runtime)
    d = sc.describe(flt)
    rows += [
        ("seccomp", "default action", f"{d['default_action']} (EPERM)" if d["default_action"] == "errno"
         else d["default_action"]),
        ("seccomp", "allowed", f"{d['allowed']} syscalls + argument-checked: {', '.join(d['conditional'])}"),
        ("seccomp", "dangerous denied", f"{len(d['dangerous_denied'])}: {', '.join(d['dangerous_denied'])}"),
        ("seccomp", "dangerous ALLOWED", ", ".join(d["dangerous_allowed"]) or "none"),
    ]
    eg = p.egress
    if not eg.enabled:
        rows.append(("network", "egress", "none: no interface but loopback, no route, no DNS"))
    else:
        rows.append(("network", "egress", "only through the host proxy (deny by default); "
                                          "private/loopback/link-local/metadata addresses refused"))
        for r in eg.rules:
            rows.append(("network", "allow", f"{r.host} ports {', '.join(map(str, r.ports))}"))
        for c in eg.allow_cidrs:
            rows.append(("network", "allow range", f"{c}: private addresses admitted; IP literals in it on any port"))
        if eg.byte_budget:
            rows.append(("network", "byte budget", f"{eg.byte_budget} bytes per session"))
    env = ", ".join(sorted(p.env)) or "(none beyond HOME, PATH, LANG, TMPDIR)"
    rows.append(("environment", "variables", env + "; nothing inherited from the caller"))
    return rows
