"""Turn a Policy into rows a person can check: what is allowed, what is denied, who said so.

Each row names the policy key it shows; :func:`explain_table` adds the file of the
``extends`` chain that set that key. Declared weakenings (``unsafe:``) get rows of
their own, and :func:`summary_line` (what ``sandbox exec -v`` prints) names them.
"""

from __future__ import annotations

from typing import Any

from sandbox import seccomp as sc
from sandbox.policy import Policy
from sandbox.spec import SHM_SIZE_MB

BUILTIN = "(built-in default)"
FIXED = "(fixed: not a policy setting)"


def _uid(p: Policy) -> str:
    u = p.user
    if u.uid == "auto":
        return "a uid/gid allocated per sandbox (no two live sandboxes share one)"
    return f"uid {u.uid}, gid {u.gid}"


def _keyed_rows(p: Policy) -> list[tuple[str, str, str, str | None]]:
    """(area, setting, value, policy key or None for a fixed property)."""
    rows: list[tuple[str, str, str, str | None]] = [
        ("identity", "user", f"{_uid(p)} (never root), no supplementary groups", "user"),
        ("identity", "privileges", "all capabilities dropped; no-new-privileges; no setuid/setgid binaries in image",
         None),
        ("runtime", "image", p.image, "image"),
        ("runtime", "OCI runtime", p.runtime + (" (gVisor: user-space kernel)" if p.runtime == "runsc" else ""),
         "runtime"),
        ("filesystem", "root", "read-only", None),
        ("filesystem", "workspace", f"{p.workspace.path}: {p.workspace.backing}, {p.workspace.size_mb} MiB cap, "
                                    "owned by the sandbox uid, mode 0700", "workspace"),
    ]
    for i, t in enumerate(p.tmpfs):
        rows.append(("filesystem", "tmpfs", f"{t.path}: {t.size_mb} MiB cap, nosuid, nodev, "
                                            f"{'exec' if t.exec else 'noexec'}", f"tmpfs.{i}"))
    rows.append(("filesystem", "tmpfs", f"/dev/shm: {SHM_SIZE_MB} MiB cap, noexec", None))
    for i, m in enumerate(p.read_only_mounts):
        rows.append(("filesystem", "read-only mount", f"{m.source} -> {m.target}", f"read_only_mounts.{i}"))
    if not p.read_only_mounts:
        rows.append(("filesystem", "host paths", "none mounted (no Docker socket, no /proc, /sys, /dev of the host)",
                     "read_only_mounts"))
    lim, rl = p.limits, p.rlimits
    rows += [
        ("limits", "memory", f"{lim.memory_mb} MiB, swap 0 (tmpfs contents count here)", "limits.memory_mb"),
        ("limits", "cpu", f"{lim.cpus} CPU(s) quota", "limits.cpus"),
        ("limits", "pids", str(lim.pids), "limits.pids"),
        ("rlimits", "nofile / nproc", f"{rl.nofile} / {rl.nproc}", "rlimits"),
        ("rlimits", "fsize / core / stack", f"{rl.fsize_mb} MiB / 0 / {rl.stack_mb} MiB", "rlimits.fsize_mb"),
        ("rlimits", "cpu time", f"{rl.cpu_s} s", "rlimits.cpu_s"),
        ("timeouts", "per call / per session", f"{p.timeouts.call_s:g} s / {p.timeouts.session_s:g} s", "timeouts"),
        ("output", "cap per call", f"{p.output.max_bytes} bytes", "output.max_bytes"),
    ]
    flt = p.seccomp_filter()
    d = sc.describe(flt)
    shipped = flt.source == str(sc.BASELINE_ALLOWLIST.resolve())
    rows += [
        ("seccomp", "allowlist", f"{p.seccomp.profile} ({'shipped' if shipped else flt.source})"
         + "".join(f"; {k} {', '.join(v)}" for k, v in (("plus", p.seccomp.extra_allow),
                                                         ("minus", p.seccomp.extra_deny)) if v), "seccomp"),
        ("seccomp", "default action", f"{d['default_action']} (EPERM)" if d["default_action"] == "errno"
         else d["default_action"], "seccomp.default_action"),
        ("seccomp", "allowed", f"{d['allowed']} syscalls + argument-checked: {', '.join(d['conditional'])}",
         "seccomp"),
        ("seccomp", "dangerous denied", f"{len(d['dangerous_denied'])}: {', '.join(d['dangerous_denied'])}",
         "seccomp"),
        ("seccomp", "dangerous ALLOWED", ", ".join(d["dangerous_allowed"]) or "none", "seccomp"),
    ]
    eg = p.egress
    if not eg.enabled:
        rows.append(("network", "egress", "none: no interface but loopback, no route, no DNS", "egress"))
    else:
        rows.append(("network", "egress", "only through the host proxy (deny by default); "
                                          "private/loopback/link-local/metadata addresses refused", "egress"))
        for i, r in enumerate(eg.rules):
            rows.append(("network", "allow", r.describe(eg.credentials), f"egress.rules.{i}"))
        for c in eg.allow_cidrs:
            rows.append(("network", "allow range", f"{c}: private addresses admitted; IP literals in it on any port",
                         "egress.allow_cidrs"))
        if eg.byte_budget:
            rows.append(("network", "byte budget", f"{eg.byte_budget} bytes per session", "egress.byte_budget"))
    env = ", ".join(sorted(p.env)) or "(none beyond HOME, PATH, LANG, TMPDIR)"
    rows.append(("environment", "variables", env + "; nothing inherited from the caller", "env"))
    weak = p.weakenings()
    for w in weak:
        rows.append(("UNSAFE", w.id, f"allows {w.allows}; reason: {w.reason or '(NOT DECLARED)'}", f"unsafe.{w.id}"))
    if not weak:
        rows.append(("UNSAFE", "weakenings", "none: nothing weaker than the shipped baseline", "unsafe"))
    return rows


def explain_rows(p: Policy) -> list[tuple[str, str, str]]:
    return [(a, s, v) for a, s, v, _ in _keyed_rows(p)]


def explain_table(p: Policy) -> list[dict[str, Any]]:
    """Rows as dicts with ``source``: the profile file that set the row's key, or a note saying the
    value is a built-in default or not a policy setting at all."""
    out = []
    for area, setting, value, key in _keyed_rows(p):
        source = FIXED if key is None else (p.origin(key) or BUILTIN)
        out.append({"area": area, "setting": setting, "value": value, "key": key, "source": source})
    return out


def weakening_words(p: Policy) -> str:
    """The declared weakenings in one phrase ("" when there are none)."""
    return "; ".join(f"{w.id} ({w.reason or 'NOT DECLARED'})" for w in p.weakenings())


def summary_line(p: Policy) -> str:
    """One line for ``sandbox exec -v``: who runs, under which limits and filter, and every weakening."""
    net = "proxy-only egress" if p.egress.enabled else "no network"
    user = "uid auto" if p.user.uid == "auto" else f"uid {p.user.uid}:{p.user.gid}"
    s = p.seccomp
    flt = p.seccomp_filter()
    filt = f"seccomp {s.profile}"
    if flt.source != str(sc.BASELINE_ALLOWLIST.resolve()):
        filt += f" ({flt.source})"
    if s.extra_allow:
        filt += " +" + ",".join(s.extra_allow)
    if s.extra_deny:
        filt += " -" + ",".join(s.extra_deny)
    if s.default_action != "errno":
        filt += f", default {s.default_action}"
    line = (f"profile {p.name} ({p.digest()[:19]}): {user}, memory {p.limits.memory_mb} MiB (no swap), "
            f"cpus {p.limits.cpus}, pids {p.limits.pids}, timeout {p.timeouts.call_s:g}s, {net}, "
            f"runtime {p.runtime}, read-only root, no capabilities, {filt}")
    weak = weakening_words(p)
    return line + (f"; UNSAFE: {weak}" if weak else "")
