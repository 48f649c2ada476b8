"""Compile a policy's seccomp section into a filter.

One source (a named allowlist under ``profiles/seccomp/`` plus the policy's
adjustments) yields three equivalent outputs: OCI JSON for Docker, libseccomp
PFC text for auditors, and a loaded in-process filter. Every syscall name is
checked against libseccomp (through pyseccomp), so a typo is an error, not a
silently missing rule. :func:`weakenings` compares a filter with the shipped
baseline; :meth:`CompiledFilter.canonical` is what the policy digest hashes.
This module imports :mod:`sandbox.policy_base`, never :mod:`sandbox.policy`.
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

from sandbox.policy_base import PROFILES_DIR, PolicyError, Seccomp, Weakening, read_yaml

# Calls that break isolation when allowed, and what each would let a workload do.
# `explain` names them, the audit probes them, the shipped allowlist contains none of
# them, and a policy that allows one (in any form) is refused unless it declares it
# under ``unsafe:`` (see :func:`weakenings`).
_MOUNT = "changes mounts or enters a mount namespace (filesystem isolation)"
_NS = "creates or joins namespaces (the basis of most container escapes)"
_TRACE = "reads or writes other processes' memory or state"
_KERNEL = "reaches a large, often-exploited kernel subsystem"
_CLOCK = "sets a host-wide clock"
_HOST = "acts on the whole host, not the container"
_MODULE = "loads or removes kernel code"
_HANDLE = "opens files by handle, bypassing path-based isolation"
_LEGACY = "obsolete or unused interface: attack surface only"
_NUMA = "moves or pins memory across NUMA nodes of the host"
_DEVICE = "creates device nodes"
DANGEROUS: dict[str, str] = {
    **dict.fromkeys(("mount", "umount", "umount2", "pivot_root", "chroot", "fsopen", "fsconfig", "fsmount", "fspick",
                     "move_mount", "open_tree", "mount_setattr"), _MOUNT),
    **dict.fromkeys(("unshare", "setns"), _NS),
    **dict.fromkeys(("ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp", "process_madvise"),
                    _TRACE),
    **dict.fromkeys(("bpf", "keyctl", "add_key", "request_key", "perf_event_open", "userfaultfd", "io_uring_setup",
                     "io_uring_enter", "io_uring_register", "fanotify_init", "lookup_dcookie", "quotactl",
                     "quotactl_fd"), _KERNEL),
    **dict.fromkeys(("kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "create_module",
                     "query_module", "get_kernel_syms"), _MODULE),
    **dict.fromkeys(("open_by_handle_at", "name_to_handle_at"), _HANDLE),
    **dict.fromkeys(("clock_settime", "clock_settime64", "settimeofday", "adjtimex", "clock_adjtime",
                     "clock_adjtime64", "stime"), _CLOCK),
    **dict.fromkeys(("swapon", "swapoff", "reboot", "acct", "syslog", "vhangup", "sethostname", "setdomainname",
                     "iopl", "ioperm"), _HOST),
    **dict.fromkeys(("modify_ldt", "vm86", "vm86old", "uselib", "_sysctl", "nfsservctl", "vserver", "afs_syscall",
                     "tuxcall", "security", "getpmsg", "putpmsg"), _LEGACY),
    **dict.fromkeys(("mbind", "set_mempolicy", "move_pages", "migrate_pages"), _NUMA),
    **dict.fromkeys(("mknod", "mknodat"), _DEVICE),
}
DANGEROUS_SYSCALLS: tuple[str, ...] = tuple(DANGEROUS)

# Calls the baseline allows only with an argument check (or answers with an errno):
# allowing them outright is a weakening whatever the allowlist file says.
ARG_CHECKED: dict[str, str] = {
    "clone": "clone with namespace flags (CLONE_NEWUSER, CLONE_NEWNS, ...)",
    "clone3": "clone3, whose flags seccomp cannot inspect (namespaces)",
    "socket": "sockets of any address family (packet, vsock, alg, bluetooth, ...)",
    "personality": "any execution domain (READ_IMPLIES_EXEC, ADDR_NO_RANDOMIZE, ...)",
}
# Default actions at least as strict as the baseline's (errno EPERM).
STRICT_DEFAULT_ACTIONS: tuple[str, ...] = ("errno", "kill_process")
BASELINE_ALLOWLIST = PROFILES_DIR / "seccomp" / "default.yaml"  # the shipped list, whatever the search path says

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
    source: str = field(default="", compare=False)  # the allowlist file it came from

    @property
    def allowed_names(self) -> set[str]:
        return set(self.allow) | {n for n, _ in self.conditional}

    def dangerous_allowed(self) -> list[str]:
        return sorted(self.allowed_names & set(DANGEROUS_SYSCALLS))

    def canonical(self) -> dict[str, Any]:
        """What the filter enforces, independent of order and of the host's architecture:
        the input of the policy digest."""
        return {
            "default_action": self.default_action,
            "allow": sorted(self.allow),
            "conditional": {name: sorted(sorted([c.index, c.op, c.value, c.mask] for c in alt) for alt in alts)
                            for name, alts in sorted(self.conditional)},
            "errno": {name: e for name, e in sorted(self.errno)},
        }


def _seccomp_dirs() -> list[Path]:
    from sandbox.paths import seccomp_dirs  # the profile search path's seccomp/ subdirs

    return seccomp_dirs()


def find_allowlist(name: str) -> Path:
    for d in _seccomp_dirs():
        p = d / f"{name}.yaml"
        if p.is_file():
            return p.resolve()
    raise PolicyError([(name, "seccomp.profile", "no such seccomp allowlist; searched "
                        + os.pathsep.join(str(d) for d in _seccomp_dirs()))])


_ALLOWLIST_KEYS = {"description", "allow", "conditional", "errno"}
_CHECK_KEYS = {"index", "op", "value", "mask"}


def _load_allowlist(path: Path) -> dict[str, Any]:
    st = path.stat()
    return _load_allowlist_cached(str(path), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=32)
def _load_allowlist_cached(path: str, _mtime_ns: int, _size: int) -> dict[str, Any]:
    """Parse and shape-check one allowlist file (cached while the file is unchanged)."""
    data = read_yaml(Path(path)) or {}
    bad: list[tuple[str, str, str]] = []

    def fail(key: str, reason: str) -> None:
        bad.append((path, key, reason))

    if not isinstance(data, dict):
        raise PolicyError([(path, "-", "a seccomp allowlist must be a YAML mapping")])
    for k in sorted(set(data) - _ALLOWLIST_KEYS):
        fail(str(k), "unknown key")
    allow: list[str] = []
    for i, g in enumerate(data.get("allow") or []):
        for n in g if isinstance(g, list) else [g]:
            if isinstance(n, str):
                allow.append(n)
            else:
                fail(f"allow.{i}", f"{n!r} is not a syscall name")
    conditional: dict[str, tuple[tuple[ArgCheck, ...], ...]] = {}
    cond_raw = data.get("conditional") or {}
    if not isinstance(cond_raw, dict):
        fail("conditional", "must map a syscall name to a list of argument-check lists")
        cond_raw = {}
    for name, alts in cond_raw.items():
        try:
            conditional[str(name)] = tuple(
                tuple(_arg_check(c) for c in alt) for alt in alts)  # each alt is a conjunction
        except (TypeError, ValueError, KeyError) as e:
            fail(f"conditional.{name}", f"not a list of argument-check lists: {e}")
    errno_raw = data.get("errno") or {}
    errno_map: dict[str, int] = {}
    if not isinstance(errno_raw, dict):
        fail("errno", "must map a syscall name to an errno number")
        errno_raw = {}
    for name, num in errno_raw.items():
        if isinstance(num, bool) or not isinstance(num, int) or not 0 <= num <= 4095:
            fail(f"errno.{name}", f"{num!r} is not an errno number")
        else:
            errno_map[str(name)] = num
    if bad:
        raise PolicyError(bad)
    return {"source": path, "allow": allow, "conditional": conditional, "errno": errno_map}


def _arg_check(c: Any) -> ArgCheck:
    if not isinstance(c, dict) or not {"index", "op", "value"} <= set(c) or set(c) - _CHECK_KEYS:
        raise ValueError(f"{c!r} needs index, op, value (and mask for masked_eq)")
    if c["op"] not in _OPS:
        raise ValueError(f"unknown op {c['op']!r}")
    if not 0 <= int(c["index"]) <= 5:
        raise ValueError(f"argument index {c['index']!r} is not 0-5")
    return ArgCheck(int(c["index"]), str(c["op"]), int(c["value"]), int(c.get("mask", 0)))


def _native_arch() -> int:
    return int(pyseccomp.system_arch())


@lru_cache(maxsize=4096)
def syscall_known(name: str) -> bool:
    """True if libseccomp knows the name on any architecture (typos are not known)."""
    try:
        nr = pyseccomp.resolve_syscall(_native_arch(), name)
    except Exception:  # noqa: BLE001 - pyseccomp raises on names it cannot parse
        return False
    return bool(nr != -1)  # __NR_SCMP_ERROR


def _native_nr(name: str) -> int:
    return int(pyseccomp.resolve_syscall(_native_arch(), name))


def compile_filter(sc: Seccomp) -> CompiledFilter:
    """The policy's ``seccomp:`` section resolved against its allowlist file."""
    path = find_allowlist(sc.profile)
    return _compile(_load_allowlist(path), tuple(sc.extra_allow), tuple(sc.extra_deny), sc.default_action)


def baseline_filter() -> CompiledFilter:
    """The shipped baseline: the package's default allowlist, unadjusted, default action errno."""
    return _compile(_load_allowlist(BASELINE_ALLOWLIST), (), (), "errno")


def _compile(data: dict[str, Any], extra_allow: tuple[str, ...], extra_deny: tuple[str, ...],
             default_action: str) -> CompiledFilter:
    return _compile_cached(data["source"], _freeze(data), extra_allow, extra_deny, default_action)


def _freeze(data: dict[str, Any]) -> tuple[Any, ...]:
    return (tuple(data["allow"]), tuple(data["conditional"].items()), tuple(data["errno"].items()))


@lru_cache(maxsize=64)
def _compile_cached(source: str, frozen: tuple[Any, ...], extra_allow: tuple[str, ...], extra_deny: tuple[str, ...],
                    default_action: str) -> CompiledFilter:
    allow = list(frozen[0])
    conditional_raw = dict(frozen[1])
    errno_map = dict(frozen[2])
    problems = []
    for name in dict.fromkeys(allow + list(conditional_raw) + list(errno_map)):
        if not syscall_known(name):
            problems.append((source, "allow", f"unknown syscall {name!r}"))
    for key, names in (("seccomp.extra_allow", extra_allow), ("seccomp.extra_deny", extra_deny)):
        for name in names:
            if not syscall_known(name):
                problems.append(("policy", key, f"unknown syscall {name!r}"))
    if problems:
        raise PolicyError(problems)
    deny = set(extra_deny)
    allow_set = [n for n in dict.fromkeys(allow + list(extra_allow)) if n not in deny and n not in conditional_raw]
    conditional = []
    for name, alts in conditional_raw.items():
        if name in deny:
            continue
        if name in extra_allow:  # an explicit allow lifts the argument check
            allow_set.append(name)
            continue
        conditional.append((name, alts))
    unknown_here = tuple(n for n in allow_set if _native_nr(n) < 0)
    return CompiledFilter(
        allow=tuple(allow_set),
        conditional=tuple(conditional),
        errno=tuple((n, int(e)) for n, e in errno_map.items() if n not in allow_set),
        default_action=default_action,
        unknown_here=unknown_here,
        source=source,
    )


# ---------------------------------------------------------------- weakenings

def _alt_covered(alt: tuple[ArgCheck, ...], base_alts: tuple[tuple[ArgCheck, ...], ...]) -> bool:
    """An alternative is no weaker than the baseline if it has all the checks of one baseline alternative."""
    return any(set(b) <= set(alt) for b in base_alts)


def weakenings(sc: Seccomp, flt: CompiledFilter | None = None) -> list[Weakening]:
    """Every way ``sc`` (resolved) is weaker than the shipped baseline, in a stable order.

    The baseline is the package's own default allowlist with default action errno, plus
    invariants that hold whatever allowlist file is used: no call of :data:`DANGEROUS`
    in any form, no call of :data:`ARG_CHECKED` without its argument check, a default
    action of errno or kill_process. Anything else allowed beyond the shipped list is a
    weakening too. (gVisor's clone3 adjustment, :func:`for_runtime`, is not: it happens
    after this check and only in gVisor's own kernel.)
    """
    flt = flt or compile_filter(sc)
    base = baseline_filter()
    base_allow, base_cond = set(base.allow), dict(base.conditional)
    out: list[Weakening] = []

    def where(name: str) -> tuple[str, str]:
        if name in sc.extra_allow:
            return "policy", "seccomp.extra_allow"
        return flt.source, ("conditional." + name if name in dict(flt.conditional) else "allow")

    if flt.default_action not in STRICT_DEFAULT_ACTIONS:
        out.append(Weakening(f"seccomp.default_action.{flt.default_action}",
                             f"default action {flt.default_action}: every syscall not listed runs",
                             "policy", "seccomp.default_action"))
    for name in sorted(flt.allow):
        if name in DANGEROUS:
            what = f"{name}: {DANGEROUS[name]}"
        elif name in ARG_CHECKED:
            what = ARG_CHECKED[name] + " (no argument check)"
        elif name in base_cond:
            what = f"{name} without the shipped argument check"
        elif name not in base_allow:
            what = f"{name}: not in the shipped allowlist"
        else:
            continue
        out.append(Weakening(f"seccomp.allow.{name}", what, *where(name)))
    for name, alts in sorted(flt.conditional):
        if name in DANGEROUS:
            what = f"{name} (argument-checked): {DANGEROUS[name]}"
        elif name in base_allow:
            continue  # narrower than the baseline's unconditional allow
        elif name in base_cond:
            if all(_alt_covered(a, base_cond[name]) for a in alts):
                continue
            what = f"{name} with arguments beyond the shipped check"
        else:
            what = f"{name} (argument-checked): not in the shipped allowlist"
        out.append(Weakening(f"seccomp.allow.{name}", what, *where(name)))
    return out


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
                          default_action=f.default_action, unknown_here=f.unknown_here, source=f.source)


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


__all__ = ["ARG_CHECKED", "BASELINE_ALLOWLIST", "CompiledFilter", "DANGEROUS", "DANGEROUS_SYSCALLS", "Weakening",
           "apply_in_process", "baseline_filter", "compile_filter", "describe", "find_allowlist", "for_runtime",
           "syscall_known", "to_bpf", "to_libseccomp", "to_oci", "to_pfc", "weakenings"]
