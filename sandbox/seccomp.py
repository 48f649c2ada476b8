"""Compile a policy's seccomp section into a filter.

One source (a named allowlist under ``profiles/seccomp/`` plus the policy's
adjustments) yields three equivalent outputs: OCI JSON for Docker, libseccomp
PFC text for auditors, and a loaded in-process filter. Every syscall name is
checked against libseccomp (through pyseccomp), so a typo is an error, not a
silently missing rule.
"""

from __future__ import annotations

import errno as _errno
import os
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyseccomp
import yaml

from sandbox.policy import PolicyError, Seccomp

# Calls that break isolation when allowed. `explain` names them, the audit
# probes them, and the default allowlist contains none of them.
DANGEROUS_SYSCALLS: tuple[str, ...] = (
    "mount", "umount", "umount2", "unshare", "setns", "pivot_root", "chroot",
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
    "bpf", "keyctl", "add_key", "request_key", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "open_by_handle_at", "name_to_handle_at",
    "clock_settime", "clock_settime64", "settimeofday", "adjtimex", "clock_adjtime", "clock_adjtime64", "stime",
    "swapon", "swapoff", "reboot", "acct", "syslog", "quotactl", "lookup_dcookie", "fanotify_init",
    "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
    "iopl", "ioperm", "modify_ldt", "vm86", "vm86old", "uselib", "_sysctl", "nfsservctl", "vhangup",
    "mknod", "mknodat", "mbind", "set_mempolicy", "move_pages", "migrate_pages", "process_madvise",
)

_OPS = {"eq": pyseccomp.EQ, "ne": pyseccomp.NE, "lt": pyseccomp.LT, "le": pyseccomp.LE,
        "gt": pyseccomp.GT, "ge": pyseccomp.GE, "masked_eq": pyseccomp.MASKED_EQ}
_OCI_OPS = {"eq": "SCMP_CMP_EQ", "ne": "SCMP_CMP_NE", "lt": "SCMP_CMP_LT", "le": "SCMP_CMP_LE",
            "gt": "SCMP_CMP_GT", "ge": "SCMP_CMP_GE", "masked_eq": "SCMP_CMP_MASKED_EQ"}
# Native ABI only: the i386/x32/arm32 compat entry points are extra kernel attack
# surface that nothing in the image needs; calls through them hit the bad-arch action.
_OCI_ARCHES = {"x86_64": ["SCMP_ARCH_X86_64"], "aarch64": ["SCMP_ARCH_AARCH64"]}


@dataclass(frozen=True)
class ArgCheck:
    index: int
    op: str
    value: int
    mask: int = 0


@dataclass(frozen=True)
class CompiledFilter:
    """The resolved filter: what is allowed, conditionally allowed, or answered with an errno."""

    allow: tuple[str, ...]
    conditional: tuple[tuple[str, tuple[tuple[ArgCheck, ...], ...]], ...]
    errno: tuple[tuple[str, int], ...]
    default_action: str
    unknown_here: tuple[str, ...] = field(default=())  # names libseccomp knows but this arch lacks

    @property
    def allowed_names(self) -> set[str]:
        return set(self.allow) | {n for n, _ in self.conditional}

    def dangerous_allowed(self) -> list[str]:
        return sorted(self.allowed_names & set(DANGEROUS_SYSCALLS))


def _seccomp_dirs() -> list[Path]:
    from sandbox.paths import seccomp_dirs  # the profile search path's seccomp/ subdirs

    return seccomp_dirs()


@lru_cache(maxsize=32)
def _load_allowlist(name: str) -> dict[str, Any]:
    for d in _seccomp_dirs():
        p = d / f"{name}.yaml"
        if p.is_file():
            data = yaml.safe_load(p.read_text()) or {}
            data["_source"] = str(p)
            return data
    raise PolicyError([(name, "seccomp.profile", "no such seccomp allowlist")])


def _flatten(groups: list[Any]) -> list[str]:
    out: list[str] = []
    for g in groups:
        out.extend(g if isinstance(g, list) else [g])
    return out


def _native_arch() -> int:
    return pyseccomp.system_arch()


def syscall_known(name: str) -> bool:
    """True if libseccomp knows the name on any architecture (typos are not known)."""
    try:
        nr = pyseccomp.resolve_syscall(_native_arch(), name)
    except Exception:  # noqa: BLE001 - pyseccomp raises on names it cannot parse
        return False
    return nr != -1  # __NR_SCMP_ERROR


def _native_nr(name: str) -> int:
    return pyseccomp.resolve_syscall(_native_arch(), name)


def compile_filter(sc: Seccomp) -> CompiledFilter:
    data = _load_allowlist(sc.profile)
    source = data["_source"]
    allow = _flatten(data.get("allow", []))
    conditional_raw: dict[str, list[list[dict[str, Any]]]] = data.get("conditional", {}) or {}
    errno_map: dict[str, int] = dict(data.get("errno", {}) or {})
    problems = []
    for name in list(allow) + list(conditional_raw) + list(errno_map) + list(sc.extra_allow) + list(sc.extra_deny):
        if not syscall_known(name):
            key = "seccomp.extra_allow" if name in sc.extra_allow else "seccomp.extra_deny" if name in sc.extra_deny else "allow"
            problems.append((source if key == "allow" else "policy", key, f"unknown syscall {name!r}"))
    if problems:
        raise PolicyError(problems)
    deny = set(sc.extra_deny)
    allow_set = [n for n in dict.fromkeys(allow + list(sc.extra_allow)) if n not in deny and n not in conditional_raw]
    conditional = []
    for name, alternatives in conditional_raw.items():
        if name in deny:
            continue
        if name in sc.extra_allow:  # an explicit allow lifts the argument check
            allow_set.append(name)
            continue
        alts = tuple(tuple(ArgCheck(int(c["index"]), str(c["op"]), int(c["value"]), int(c.get("mask", 0))) for c in alt)
                     for alt in alternatives)
        conditional.append((name, alts))
    unknown_here = tuple(n for n in allow_set if _native_nr(n) < 0)
    return CompiledFilter(
        allow=tuple(allow_set),
        conditional=tuple(conditional),
        errno=tuple((n, int(e)) for n, e in errno_map.items() if n not in allow_set),
        default_action=sc.default_action,
        unknown_here=unknown_here,
    )


def _default_action_oci(action: str) -> tuple[str, int | None]:
    return {"errno": ("SCMP_ACT_ERRNO", _errno.EPERM), "kill_process": ("SCMP_ACT_KILL_PROCESS", None),
            "log": ("SCMP_ACT_LOG", None)}[action]


def for_runtime(f: CompiledFilter, runtime: str) -> CompiledFilter:
    """Adjust a filter to what an OCI runtime actually implements.

    gVisor (runsc, with --oci-seccomp) answers an errno rule with its default errno
    rather than the rule's errnoRet, so clone3 -> ENOSYS arrives as EPERM and glibc
    never falls back to clone(2): no thread could start. Under runsc clone3 is
    therefore allowed; any namespace it creates exists only in gVisor's user-space
    kernel, never in the host's.
    """
    if runtime != "runsc" or "clone3" not in dict(f.errno):
        return f
    return CompiledFilter(allow=f.allow + ("clone3",), conditional=f.conditional,
                          errno=tuple(e for e in f.errno if e[0] != "clone3"),
                          default_action=f.default_action, unknown_here=f.unknown_here)


def to_oci(f: CompiledFilter) -> dict[str, Any]:
    """The filter as a Docker/OCI seccomp profile (what `--security-opt seccomp=` takes)."""
    action, err = _default_action_oci(f.default_action)
    prof: dict[str, Any] = {"defaultAction": action}
    if err is not None:
        prof["defaultErrnoRet"] = err
    prof["architectures"] = _OCI_ARCHES.get(os.uname().machine, [])
    rules: list[dict[str, Any]] = [{"names": sorted(f.allow), "action": "SCMP_ACT_ALLOW"}]
    for name, alts in f.conditional:
        for alt in alts:
            rules.append({"names": [name], "action": "SCMP_ACT_ALLOW",
                          "args": [{"index": c.index, "value": c.value if c.op != "masked_eq" else c.mask,
                                    "valueTwo": c.value if c.op == "masked_eq" else 0, "op": _OCI_OPS[c.op]}
                                   for c in alt]})
    for name, e in f.errno:
        rules.append({"names": [name], "action": "SCMP_ACT_ERRNO", "errnoRet": e})
    prof["syscalls"] = rules
    return prof


def to_libseccomp(f: CompiledFilter) -> pyseccomp.SyscallFilter:
    """The same filter built through libseccomp, for PFC/BPF export and in-process use."""
    default = {"errno": pyseccomp.ERRNO(_errno.EPERM), "kill_process": pyseccomp.KILL_PROCESS,
               "log": pyseccomp.LOG}[f.default_action]
    flt = pyseccomp.SyscallFilter(default)
    for name in f.allow:
        if name in f.unknown_here:
            continue
        flt.add_rule(pyseccomp.ALLOW, name)
    for name, alts in f.conditional:
        for alt in alts:
            args = [pyseccomp.Arg(c.index, _OPS[c.op], c.mask if c.op == "masked_eq" else c.value,
                                  c.value if c.op == "masked_eq" else 0) for c in alt]
            flt.add_rule(pyseccomp.ALLOW, name, *args)
    for name, e in f.errno:
        if _native_nr(name) >= 0:
            flt.add_rule(pyseccomp.ERRNO(e), name)
    return flt


def _export(f: CompiledFilter, how: str) -> bytes:
    flt = to_libseccomp(f)
    with tempfile.TemporaryFile() as tmp:
        getattr(flt, how)(tmp)
        tmp.seek(0)
        return tmp.read()


def to_pfc(f: CompiledFilter) -> str:
    """Human-readable pseudo filter code, as libseccomp generates it."""
    return _export(f, "export_pfc").decode()


def to_bpf(f: CompiledFilter) -> bytes:
    return _export(f, "export_bpf")


def apply_in_process(f: CompiledFilter) -> None:
    """Load the filter into the calling process (irreversible; sets no_new_privs)."""
    to_libseccomp(f).load()


def describe(f: CompiledFilter) -> dict[str, Any]:
    denied_dangerous = [n for n in DANGEROUS_SYSCALLS if n not in f.allowed_names]
    return {
        "default_action": f.default_action,
        "allowed": len(f.allow),
        "conditional": sorted(n for n, _ in f.conditional),
        "errno": dict(f.errno),
        "dangerous_allowed": f.dangerous_allowed(),
        "dangerous_denied": denied_dangerous,
    }


__all__ = ["CompiledFilter", "DANGEROUS_SYSCALLS", "apply_in_process", "compile_filter", "describe", "for_runtime",
           "syscall_known", "to_bpf", "to_libseccomp", "to_oci", "to_pfc"]
