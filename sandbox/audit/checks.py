"""Judge what the probe saw inside a container: raw observations -> rows.

The probe (``probe_script.py``) only reports facts; every rule lives here, so
one probe serves a shipped profile (exact expectations from the policy) and a
foreign container (generic expectations) alike. Probe output comes from inside
an untrusted container: every field is type-checked before use, and a field
that is missing or malformed makes its row fail or skip, never pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from sandbox.audit.catalog import INSIDE_IDS, result, skipped
from sandbox.audit.model import CheckResult
from sandbox.audit.probe_script import (
    ENGINE_NAME,  # the same pattern the probe matches with
)
from sandbox.audit.syscalls import REFUSED_ERRNOS

CAP_NAMES = ("CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP",
             "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER",
             "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
             "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
             "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF",
             "CHECKPOINT_RESTORE")
_WORST_CAPS = ("SYS_ADMIN", "SYS_MODULE", "SYS_PTRACE", "SYS_RAWIO", "DAC_READ_SEARCH", "NET_ADMIN", "SYS_BOOT", "BPF")

# (major, minor) of the devices a container legitimately has; 136 = /dev/pts/N.
SAFE_DEVICES = {(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 1), (5, 2)}
# gVisor implements these in its user-space kernel (the sentry): no host device is behind them.
GVISOR_DEVICES = {(10, 229): "fuse", (10, 200): "net/tun"}
UNREACHABLE = ("ENETUNREACH", "EHOSTUNREACH")  # gVisor's netstack answers EHOSTUNREACH


@dataclass(frozen=True)
class Expectations:
    """What a container should look like. ``None`` fields fall back to generic rules."""

    uid: int | None = None
    gid: int | None = None
    writable: frozenset[str] | None = None     # mount points allowed to be writable
    egress_dir: str | None = None              # where an egress proxy socket is expected
    runtime: str = "runc"
    pids: int | None = None
    memory_bytes: int | None = None
    cpu_quota_us: int | None = None
    workspace: str | None = None
    notes: list[str] = field(default_factory=list)
    # The egress rows' host-side facts (sandbox.audit.egress.EgressExpect), None without egress.
    egress: Any = None
    no_egress_reason: str = "the policy allows no egress"

    def with_ids(self, uid: int | None, gid: int | None) -> Expectations:
        """The uid/gid the runtime actually gave this sandbox (Config.User, as the host set it)."""
        if uid is None or gid is None:
            return self
        return replace(self, uid=uid, gid=gid)

    @property
    def gvisor(self) -> bool:
        return self.runtime == "runsc"

    @classmethod
    def from_policy(cls, policy: Any) -> Expectations:
        from sandbox.spec import EGRESS_MOUNT

        writable = {policy.workspace.path, "/dev/shm", "/dev/mqueue"} | {t.path for t in policy.tmpfs}
        # A pinned uid is expected as such; "auto" is learnt from the container (with_ids).
        uid = policy.user.uid if isinstance(policy.user.uid, int) else None
        gid = policy.user.gid if isinstance(policy.user.gid, int) else None
        return cls(uid=uid, gid=gid, writable=frozenset(writable),
                   egress_dir=EGRESS_MOUNT if policy.egress.enabled else None, runtime=policy.runtime,
                   pids=policy.limits.pids, memory_bytes=policy.limits.memory_mb << 20,
                   cpu_quota_us=int(policy.limits.cpus * 100000), workspace=policy.workspace.path)


# ---------------------------------------------------------------- helpers

def _d(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _l(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def _s(v: Any, limit: int = 200) -> str:
    return str(v)[:limit]


def _few(items: Iterable[Any], n: int = 6) -> str:
    items = [str(i) for i in items]
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def cap_names(hexmask: str) -> list[str]:
    try:
        mask = int(hexmask, 16)
    except (TypeError, ValueError):
        return ["<unreadable>"]
    names = [CAP_NAMES[i] if i < len(CAP_NAMES) else f"cap{i}" for i in range(64) if mask >> i & 1]
    return sorted(names, key=lambda n: (n not in _WORST_CAPS, n))


def _refused(r: Any) -> bool:
    """A child's syscall result: refused by seccomp/capabilities (or killed by SIGSYS)."""
    r = _d(r)
    if r.get("killed") == "SIGSYS":
        return True
    return r.get("ret") == -1 and r.get("errno") in REFUSED_ERRNOS


def _outcome(r: Any) -> str:
    r = _d(r)
    if "killed" in r:
        return f"killed by {_s(r['killed'], 20)}"
    if r.get("ret") == -1:
        return _s(r.get("errno"), 20)
    if "exception" in r:
        return "error " + _s(r["exception"], 60)
    return f"returned {_s(r.get('ret'), 20)}"


# ---------------------------------------------------------------- rules

def _user(p: dict[str, Any], exp: Expectations) -> list[CheckResult]:
    ident = _d(p.get("identity"))
    uid, euid, gid = ident.get("uid"), ident.get("euid"), ident.get("gid")
    groups = [g for g in _l(ident.get("groups")) if isinstance(g, int)]
    obs = f"uid={uid} euid={euid} gid={gid}"
    ok = isinstance(uid, int) and uid != 0 and euid != 0 and isinstance(gid, int) and gid != 0
    expected = None
    if exp.uid is not None:
        ok = ok and uid == exp.uid and gid == exp.gid
        expected = f"uid={exp.uid} gid={exp.gid} (never 0)"
    out = [result("inside.user", "pass" if ok else "fail", obs, expected)]
    allowed = {exp.gid} if exp.gid is not None else None
    bad = [g for g in groups if g == 0 or (allowed is not None and g not in allowed and g != gid)]
    out.append(result("inside.groups", "fail" if bad else "pass",
                      f"groups={_few(groups) or 'none'}" + (f"; unexpected: {_few(bad)}" if bad else ""),
                      f"only gid {exp.gid}" if allowed else None))
    return out


def _caps(p: dict[str, Any], exp: Expectations) -> list[CheckResult]:
    caps = _d(p.get("caps"))
    present, missing = {}, []
    for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        v = caps.get(k)
        if isinstance(v, str) and v:
            if v.strip("0"):
                present[k] = v
        else:
            missing.append(k)
    amb = _l(caps.get("ambient_prctl"))
    bnd = _l(caps.get("bounding_prctl"))
    if amb:
        present["ambient(prctl)"] = ",".join(CAP_NAMES[c] if isinstance(c, int) and c < len(CAP_NAMES) else str(c)
                                             for c in amb)
    if bnd and "CapBnd" not in present:
        present["bounding(prctl)"] = f"{len(bnd)} caps"
    if present:
        eff = present.get("CapEff") or present.get("CapBnd") or ""
        names = cap_names(eff) if eff else []
        obs = "; ".join(f"{k}={v}" for k, v in present.items())
        if names:
            obs += f" ({len(names)} caps incl. {_few(names, 5)})"
        return [result("inside.caps", "fail", obs)]
    note = f"; {'/'.join(missing)} not reported, checked with prctl" if missing else ""
    if "CapEff" in missing:
        return [result("inside.caps", "fail", "CapEff not readable" + note)]
    return [result("inside.caps", "pass", "all empty" + note)]


def _nnp(p: dict[str, Any], exp: Expectations) -> list[CheckResult]:
    n = _d(p.get("nnp"))
    status, prctl = n.get("status"), n.get("prctl")
    ok = prctl == 1 or (prctl is None and status == "1")
    obs = (f"prctl(PR_GET_NO_NEW_PRIVS)={prctl}" if prctl is not None else "prctl not available") + \
        (f", status={status}" if status is not None else " (status line absent)")
    return [result("inside.no_new_privs", "pass" if ok else "fail", obs)]


def _seccomp(p: dict[str, Any], exp: Expectations) -> list[CheckResult]:
    out = []
    s = _d(p.get("seccomp"))
    mode = s.get("status")
    out.append(result("inside.seccomp_mode", "pass" if mode == "2" else "fail",
                      f"Seccomp={mode}" + (f", filters={s.get('filters')}" if s.get("filters") else "")))
    if "syscalls" in p:
        calls = _d(p.get("syscalls"))
        reached = {n: _outcome(r) for n, r in sorted(calls.items()) if not _refused(r)}
        if not calls:
            out.append(result("inside.seccomp_blocked", "fail", "no sample result"))
        elif reached:
            out.append(result("inside.seccomp_blocked", "fail",
                              f"{len(reached)}/{len(calls)} reached the kernel: "
                              + _few(f"{n}({o})" for n, o in reached.items())))
        else:
            errs = sorted({_outcome(r) for r in calls.values()})
            out.append(result("inside.seccomp_blocked", "pass", f"{len(calls)}/{len(calls)} refused ({', '.join(errs)})"))
    return out


def _rootfs(p: dict[str, Any], exp: Expectations) -> list[CheckResult]:
    r = _d(p.get("rootfs"))
    opts = _l(r.get("root_opts"))
    created = [d for d, v in _d(r.get("create")).items() if v == "created"]
    ok = "ro" in opts and not created and bool(r.get("create"))
    fstype = f" ({_s(r.get('root_fstype'), 20)})" if r.get("root_fstype") else ""
    obs = f"/ mounted {'ro' if 'ro' in opts else 'rw'}{fstype}"
    obs += f"; created files in {_few(created)}" if created else \
        f"; create refused ({_few(sorted(set(map(str, _d(r.get('create')).values()))))})"
    return [result("inside.rootfs_read_only", "pass" if ok else "fail", obs)]


def _walk(p: dict[str, Any], exp: Expectations) -> list[CheckResult]:
    w = _d(p.get("walk"))
    out = []
    writable = _d(w.get("writable"))
    points = sorted(writable)
    trunc = " (walk truncated)" if w.get("truncated") else ""
    if exp.writable is not None:
        extra = [m for m in points if m not in exp.writable]
        out.append(result("inside.writable_paths", "fail" if extra else "pass",
                          f"writable mounts: {_few(points) or 'none'}"
                          + (f"; not allowed: {_few(extra)}" if extra else "") + trunc,
                          f"only {', '.join(sorted(exp.writable))}"))
    else:
        on_root = "/" in writable
        out.append(result("inside.writable_paths", "fail" if on_root else "pass",
                          (f"root filesystem writable at {_few(writable['/'])}; " if on_root else "")
                          + f"writable mounts: {_few(points) or 'none'}" + trunc,
                          "nothing writable on the root filesystem"))
    nnp = _d(p.get("nnp")).get("prctl") == 1
    setid = [_d(s) for s in _l(w.get("setid"))]
    count = w.get("setid_count") if isinstance(w.get("setid_count"), int) else len(setid)
    live = [s for s in setid if not s.get("nosuid") and not nnp]
    if not setid:
        out.append(result("inside.setid_files", "pass", "none found" + trunc))
    elif live:
        out.append(result("inside.setid_files", "fail",
                          f"{count} set-id files usable: " + _few(f"{_s(s.get('path'), 80)} {s.get('mode')}" for s in live)))
    else:
        out.append(result("inside.setid_files", "pass",
                          f"{count} present but inert (nosuid mount or no_new_privs): {_few(_s(s.get('path'), 80) for s in setid)}"))
    return out


def _devices(p: dict[str, Any], exp: Expectations) -> list[CheckResult]:
    devs = [_d(x) for x in _l(_d(p.get("devices")).get("devices"))]
    bad, emulated = [], []
    for d in devs:
        mm = (d.get("major"), d.get("minor"))
        if d.get("type") == "char" and (mm in SAFE_DEVICES or d.get("major") == 136):
            continue
        if exp.gvisor and d.get("type") == "char" and mm in GVISOR_DEVICES:
            emulated.append(_s(d.get("path"), 40))
            continue
        bad.append(f"{_s(d.get('path'), 60)} {d.get('type')} {d.get('major')}:{d.get('minor')}"
                   + (f" open={_s(d.get('open'), 12)}" if d.get("open") else ""))
    outside = [_d(x) for x in _l(_d(p.get("walk")).get("devices_outside_dev"))]
    bad += [f"{_s(d.get('path'), 60)} {d.get('major')}:{d.get('minor')}" for d in outside]
    if not devs and "devices" in p and not _l(_d(p.get("devices")).get("devices")):
        return [result("inside.host_devices", "fail", "could not list /dev")]
    obs = f"{len(devs)} device nodes in /dev"
    if emulated:
        obs += f"; gVisor-emulated (sentry, not host): {_few(emulated)}"
    if bad:
        return [result("inside.host_devices", "fail", obs + "; unexpected: " + _few(bad))]
    return [result("inside.host_devices", "pass", obs + ", all harmless")]


def _opened(v: Any) -> bool:
    return v in ("opened", "writable")


def _kernel_files(p: dict[str, Any], exp: Expectations) -> list[CheckResult]:
    k = _d(p.get("kernel_files"))
    w = {str(a): b for a, b in _d(k.get("write_open")).items()}
    ro = _d(k.get("read_only_mount"))
    masked = _d(k.get("masked"))
    out = []

    def show(paths: Iterable[str]) -> str:
        return _few(f"{path.rsplit('/', 1)[-1]}={_s(w.get(path, '?'), 12)}" for path in paths)

    ps_paths = ["/proc/sys/vm/drop_caches", "/proc/sys/kernel/core_pattern"]
    ps_bad = [x for x in ps_paths if _opened(w.get(x))]
    ps_ro = ro.get("/proc/sys")
    out.append(result("inside.proc_sys", "fail" if ps_bad else "pass",
                      f"/proc/sys mount {'ro' if ps_ro else 'rw' if ps_ro is False else 'unknown'}; " + show(ps_paths)))
    sys_paths = ["/sys/kernel/uevent_helper", "/sys/kernel/mm/transparent_hugepage/enabled"]
    sys_bad = [x for x in sys_paths if _opened(w.get(x))]
    sys_ro = ro.get("/sys")
    out.append(result("inside.sys", "fail" if sys_bad or sys_ro is False else "pass",
                      f"/sys mount {'ro' if sys_ro else 'rw' if sys_ro is False else 'unknown'}; " + show(sys_paths)))
    exposed = [f"{path}({_s(v, 20)})" for path, v in masked.items() if v == "exposed"]
    kcore = masked.get("/proc/kcore")
    out.append(result("inside.masked_paths", "fail" if exposed or not masked else "pass",
                      f"/proc/kcore {kcore}; " + (f"exposed: {_few(exposed)}" if exposed else
                                                  f"{len(masked)} paths absent or masked")))
    sq = w.get("/proc/sysrq-trigger")
    out.append(result("inside.sysrq_trigger", "fail" if _opened(sq) or sq is None else "pass",
                      "absent" if sq == "ENOENT" else f"open for write: {sq}"))
    cp = w.get("/proc/sys/kernel/core_pattern")
    out.append(result("inside.core_pattern", "fail" if _opened(cp) or cp is None else "pass",
                      f"open for write: {cp}" + (" (absent: no such sysctl here)" if cp == "ENOENT" else "")))
    hooks = ["/proc/sys/kernel/modprobe", "/sys/kernel/uevent_helper", "/proc/sys/fs/binfmt_misc/register"]
    hook_bad = [x for x in hooks if _opened(w.get(x))]
    out.append(result("inside.usermode_helpers", "fail" if hook_bad else "pass", show(hooks)))
    return out


def _sockets(p: dict[str, Any], exp: Expectations) -> list[CheckResult]:
    s = _d(p.get("sockets"))
    engine = {str(k): _d(v) for k, v in _d(s.get("engine_paths")).items()}
    named = [_s(n, 100) for n in _l(s.get("named_unix"))]
    walked = [_s(x, 200) for x in _l(_d(p.get("walk")).get("sockets"))]
    engine_like = [x for x in walked if ENGINE_NAME.search(x)]
    unexpected = []
    if exp.writable is not None:  # a shipped profile: the only socket allowed is the egress proxy's
        unexpected = [x for x in walked if not (exp.egress_dir and x.startswith(exp.egress_dir + "/"))]
    bad = [f"{k} ({'connected!' if v.get('connect') == 'connected' else v.get('connect', 'present')})"
           for k, v in engine.items()] + engine_like + [f"abstract {n}" for n in named]
    bad += [x for x in unexpected if x not in engine_like]
    allowed = [x for x in walked if x not in bad and x not in engine_like]
    if bad:
        return [result("inside.engine_socket", "fail", "found: " + _few(bad))]
    obs = "no engine socket at known paths, on disk or abstract"
    if allowed:
        obs += f"; other sockets: {_few(allowed)}"
    return [result("inside.engine_socket", "pass", obs)]


def _fds(p: dict[str, Any], exp: Expectations) -> list[CheckResult]:
    f = _d(p.get("fds"))
    leaks = [_d(x) for x in _l(f.get("leaks"))]
    esc = f.get("cwd_escapes")
    obs = f"{f.get('checked')} descriptors/cwd/root links of {f.get('pids')} processes checked; cwd={_s(f.get('cwd'), 80)}"
    unread = _l(f.get("unreadable"))
    if unread:
        obs += f"; not inspectable (non-dumpable or other uid): {_few(unread, 3)}"
    if leaks or esc is True:
        detail = [f"pid {x.get('pid')} {_s(x.get('what'), 12)} -> {_s(x.get('target'), 80)} ({_s(x.get('why'), 40)})"
                  for x in leaks]
        if esc is True:
            detail.append("cwd escapes the root")
        return [result("inside.fd_leaks", "fail", obs + "; LEAKS: " + _few(detail, 4))]
    if not isinstance(f.get("checked"), int):
        return [result("inside.fd_leaks", "fail", "probe gave no result")]
    return [result("inside.fd_leaks", "pass", obs)]


def _exe(p: dict[str, Any], exp: Expectations) -> list[CheckResult]:
    e = _d(p.get("exe"))
    opened, parts = [], []
    for pid, r in sorted(e.items()):
        r = _d(r)
        if "readlink" in r:
            parts.append(f"/proc/{pid}/exe unreadable ({_s(r['readlink'], 12)})")
            continue
        for how in ("direct", "via_o_path"):
            if r.get(how) == "opened":
                opened.append(f"/proc/{pid}/exe -> {_s(r.get('target'), 60)} ({how})")
        parts.append(f"{pid}: {_s(r.get('direct'), 12)}/{_s(r.get('via_o_path'), 20)}")
    if opened:
        return [result("inside.runtime_exe", "fail", "opened for writing: " + _few(opened))]
    if not e:
        return [result("inside.runtime_exe", "fail", "probe gave no result")]
    return [result("inside.runtime_exe", "pass", "write-open refused: " + "; ".join(parts))]


def _release_agent(p: dict[str, Any], exp: Expectations) -> list[CheckResult]:
    r = _d(p.get("release_agent"))
    mounted = {str(k): v for k, v in _d(r.get("mounted")).items()}
    attack = _d(r.get("attack"))
    open_now = [k for k, v in mounted.items() if v == "opened"]
    reached = attack.get("release_agent") == "opened"
    steps = ", ".join(f"{k}={_s(v, 30)}" for k, v in attack.items())
    if open_now or reached:
        obs = (f"mounted release_agent writable: {_few(open_now)}; " if open_now else "") + f"attack: {steps}"
        return [result("inside.release_agent", "fail", obs)]
    if not attack:
        return [result("inside.release_agent", "fail", "probe gave no result")]
    return [result("inside.release_agent", "pass",
                   f"attack stopped ({steps}); {len(mounted)} mounted release_agent files, none writable")]


def _simple_refusal(check_id: str, r: Any, what: str) -> CheckResult:
    r = _d(r)
    if "skipped" in r:
        return skipped(check_id, _s(r["skipped"]))
    return result(check_id, "pass" if _refused(r) else "fail", f"{what}: {_outcome(r)}")


def _keyring(p: dict[str, Any], exp: Expectations) -> list[CheckResult]:
    return [_simple_refusal("inside.keyring", p.get("keyring"), "keyctl(GET_KEYRING_ID)")]


def _ptrace(p: dict[str, Any], exp: Expectations) -> list[CheckResult]:
    r = _d(p.get("ptrace"))
    if "skipped" in r:
        return [skipped("inside.ptrace", _s(r["skipped"]))]
    att, vm = r.get("attach"), r.get("process_vm_readv")
    ok = att in REFUSED_ERRNOS and (vm is None or vm in REFUSED_ERRNOS)
    return [result("inside.ptrace", "pass" if ok else "fail", f"PTRACE_ATTACH: {att}; process_vm_readv: {vm}")]


def _userns(p: dict[str, Any], exp: Expectations) -> list[CheckResult]:
    r = _d(p.get("userns"))
    row = _simple_refusal("inside.userns", r, "unshare(CLONE_NEWUSER)")
    return [row]


def _pidns(p: dict[str, Any], exp: Expectations) -> list[CheckResult]:
    r = _d(p.get("pidns"))
    host = r.get("kthreadd_visible")
    return [result("inside.pid_namespace", "fail" if host or host is None else "pass",
                   f"{r.get('process_count')} processes visible" + ("; kthreadd visible: HOST pid namespace" if host else ""))]


def _num(v: Any) -> int | None:
    if isinstance(v, dict):
        v = v.get("value")
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v)
    return None


def _limits(p: dict[str, Any], exp: Expectations) -> list[CheckResult]:
    lim = _d(p.get("limits"))
    out = []
    if lim.get("cgroupfs_mounted") is False and exp.gvisor:
        msg = "cgroupfs not visible inside under gVisor; the host-side row outside.host_cgroup checks the limit"
        return [result(i, "info", msg) for i in ("inside.limit_pids", "inside.limit_memory", "inside.limit_cpu")]
    pids = _num(lim.get("pids"))
    raw_pids = _d(lim.get("pids")).get("value")
    exp_p = f"pids.max = {exp.pids}" if exp.pids else None
    ok = pids is not None and pids > 0 and (exp.pids is None or pids == exp.pids)
    out.append(result("inside.limit_pids", "pass" if ok else "fail", f"pids.max={_s(raw_pids, 30)}", exp_p))
    mem = _num(lim.get("memory"))
    raw_mem = _d(lim.get("memory")).get("value")
    # cgroup v1 reports "no limit" as a huge page-rounded number.
    ok = mem is not None and 0 < mem < (1 << 62) and (exp.memory_bytes is None or mem == exp.memory_bytes)
    out.append(result("inside.limit_memory", "pass" if ok else "fail", f"memory limit={_s(raw_mem, 30)}",
                      f"{exp.memory_bytes} bytes" if exp.memory_bytes else None))
    q_raw = _d(lim.get("cpu_quota")).get("value")
    quota = _num(lim.get("cpu_quota"))
    if quota is None and isinstance(q_raw, str) and q_raw.split()[:1] and q_raw.split()[0].isdigit():
        quota = int(q_raw.split()[0])  # cgroup v2 cpu.max: "QUOTA PERIOD"
    ok = quota is not None and quota > 0 and (exp.cpu_quota_us is None or quota == exp.cpu_quota_us)
    out.append(result("inside.limit_cpu", "pass" if ok else "fail", f"CFS quota={_s(q_raw, 30)}",
                      f"quota {exp.cpu_quota_us} us per 100000 us" if exp.cpu_quota_us else None))
    return out


def _fork(p: dict[str, Any], exp: Expectations) -> list[CheckResult]:
    f = _d(p.get("fork"))
    if f.get("host_verdict"):  # filled in by the runner when the test ended the sandbox (gVisor)
        return [result("inside.fork_bounded", _s(f.get("host_status"), 8), _s(f["host_verdict"], 400))]  # type: ignore[arg-type]
    if not f.get("tested"):
        reason = _s(f.get("reason"), 200)
        pids_max = _num(f.get("pids_max"))
        if pids_max is None:
            # RLIMIT_NPROC alone counts the uid's processes host-wide; it is no per-container bound.
            return [result("inside.fork_bounded", "fail",
                           f"no pids cgroup limit (pids.max={_s(f.get('pids_max'), 20)}, RLIMIT_NPROC="
                           f"{_s(f.get('nproc'), 20)}); fork test not run: {reason}")]
        return [result("inside.fork_bounded", "warn", f"not tested: {reason}")]
    bound, forked, refused = f.get("bound"), f.get("forked"), f.get("refused")
    ok = refused is not None and isinstance(bound, int) and isinstance(forked, int) and forked <= bound
    return [result("inside.fork_bounded", "pass" if ok else "fail",
                   f"fork refused ({refused}) after {forked} children; bound {bound}" if refused else
                   f"{forked} forks succeeded past the bound {bound}")]


def _network(p: dict[str, Any], exp: Expectations) -> list[CheckResult]:
    n = _d(p.get("network"))
    out = []
    ifaces = [_s(i, 20) for i in _l(n.get("interfaces"))]
    d4, d6 = _l(n.get("default_v4")), _l(n.get("default_v6"))
    routes = _d(n.get("routes"))
    routed = [k for k, v in routes.items() if _d(v).get("routed")]
    extra = [i for i in ifaces if i != "lo"]
    ok = bool(ifaces) and not extra and not d4 and not d6 and not routed
    obs = f"interfaces: {_few(ifaces) or '?'}"
    if d4 or d6:
        obs += f"; default route via {_few(d4 + d6)}"
    if routed:
        obs += "; routable: " + _few(f"{k} (src {_s(_d(routes[k]).get('src'), 40)})" for k in routed)
    out.append(result("inside.no_route", "pass" if ok else "fail", obs))
    raw = _d(n.get("raw_sockets"))
    bad = [k for k, v in raw.items() if v == "created"]
    out.append(result("inside.raw_sockets", "fail" if bad or not raw else "pass",
                      ", ".join(f"{k}: {_s(v, 12)}" for k, v in raw.items()) or "no result"))
    dns = _d(n.get("dns"))
    if dns.get("attempted") is False:
        out.append(result("inside.dns", "fail", "not attempted: nameserver(s) "
                          f"{_few(_l(dns.get('routable')))} are routable, so a lookup would leave the machine"))
    else:
        res = _s(dns.get("result"), 60)
        out.append(result("inside.dns", "pass" if res.startswith("failed") else "fail", f"example.com: {res}"))
    meta = _d(routes.get("metadata"))
    tcp = _d(n.get("metadata_tcp"))
    if meta.get("routed"):
        out.append(result("inside.metadata", "fail",
                          f"a route exists (src {_s(meta.get('src'), 40)}); not connected, to send nothing"))
    else:
        secs = tcp.get("seconds")
        fast = isinstance(secs, (int, float)) and secs < 1.0
        ok = tcp.get("result") in UNREACHABLE and fast and meta.get("error") in UNREACHABLE
        out.append(result("inside.metadata", "pass" if ok else "fail",
                          f"route lookup: {_s(meta.get('error'), 20)}; TCP connect: {_s(tcp.get('result'), 20)} "
                          f"in {secs}s"))
    return out


def _env(p: dict[str, Any], exp: Expectations) -> list[CheckResult]:
    e = _d(p.get("env"))
    hits = [_d(h) for h in _l(e.get("hits"))]
    checked = _l(e.get("checked"))
    if hits:
        return [result("inside.env_secrets", "fail",
                       "secret-looking variables (names only): "
                       + _few(f"{_s(h.get('name'), 60)} [{_s(h.get('why'), 40)}, {_s(h.get('where'), 12)}]" for h in hits))]
    return [result("inside.env_secrets", "pass", f"no hits in {len(checked)} environments (probe, readable /proc/*/environ)")]


def _agent(p: dict[str, Any], exp: Expectations) -> list[CheckResult]:
    a = _d(p.get("agent"))
    pid1 = _d(a.get("pid1"))
    who = f"PID 1 is {_s(pid1.get('name'), 40)} (uid {_s(','.join(map(str, _l(pid1.get('uid')))), 12) or '?'})"
    opens = {str(k): v for k, v in _d(a.get("fd_open")).items()}
    if not opens:
        return [result("inside.agent_channel", "fail", who + "; no result for /proc/1/fd"),
                result("inside.agent_memory", "fail", who + "; no result")]
    opened = [k for k, v in opens.items() if v == "opened"]
    listing = a.get("fd_list")
    lst = f"/proc/1/fd listing: {_s(listing, 20)}" if isinstance(listing, str) else \
        f"/proc/1/fd lists {len(_l(listing))} descriptors"
    forge = _d(a.get("forge"))
    tried = (f"; forged result frames through /proc/1/fd/1 (in a second sandbox): {_s(forge.get('host'), 16)}, "
             f"{_s(forge.get('detail'), 160)}") if forge else ""
    refused = forge.get("host") == "refused" and "authentic" in str(forge.get("detail"))
    if forge.get("host") == "ACCEPTED":
        chan = [result("inside.agent_channel", "fail", f"{who}; the host ACCEPTED forged result frames{tried}")]
    elif opened and exp.gvisor and refused:
        # gVisor's /proc checks only the uid (SECURITY.md): reachable, but the channel's
        # authentication refused the forgery and the host ended the sandbox.
        chan = [result("inside.agent_channel", "warn",
                       f"{who}; gVisor lets the workload open {_few(opened)} (its /proc checks only the uid); "
                       f"the host refused what was forged there{tried}", severity="high")]
    elif opened:
        chan = [result("inside.agent_channel", "fail",
                       f"{who}; the workload opened {_few(opened)} (read the host's requests / write results "
                       f"the host would accept); {lst}{tried}")]
    else:
        chan = [result("inside.agent_channel", "pass",
                       f"{who}; " + _few(f"{k.rsplit('/', 1)[-1]}:{_s(v, 12)}" for k, v in opens.items())
                       + f"; {lst}{tried}")]
    uid = _l(pid1.get("uid"))
    owner = a.get("proc_owner")
    pid1_uid = int(uid[0]) if uid and str(uid[0]).isdigit() else None
    if isinstance(owner, int) and pid1_uid not in (None, 0):
        dumpable = "not dumpable (its /proc entries belong to root)" if owner == 0 and pid1_uid != 0 else \
            f"DUMPABLE (its /proc entries belong to uid {owner})"
    else:
        dumpable = f"dumpable unknown (owner {_s(owner, 12)})"
    mem, env, vm = a.get("mem"), a.get("environ"), a.get("process_vm_readv")
    reached = [n for n, v in (("/proc/1/mem", mem), ("/proc/1/environ", env)) if v == "opened"]
    if vm == "read" or vm == "EFAULT":
        reached.append(f"process_vm_readv ({vm})")
    obs = f"{dumpable}; mem: {_s(mem, 12)}; environ: {_s(env, 12)}; process_vm_readv: {_s(vm, 12)}"
    bad = reached or "DUMPABLE" in dumpable or mem is None or env is None
    if exp.gvisor and reached == ["/proc/1/environ"] and "DUMPABLE" not in dumpable:
        # gVisor: environ is readable by the same uid; it is the sandbox's own environment
        # (inside.env_secrets checks it holds no secret); memory stays closed.
        return chan + [result("inside.agent_memory", "warn", "gVisor lets the workload read /proc/1/environ "
                              "(the sandbox's own environment, no secret: see inside.env_secrets); " + obs,
                              severity="medium")]
    return chan + [result("inside.agent_memory", "fail" if bad else "pass",
                          (f"reachable: {_few(reached)}; " if reached else "") + obs)]


def _signals(p: dict[str, Any], exp: Expectations) -> list[CheckResult]:
    s = _d(p.get("signals"))
    if "skipped" in s:
        return [skipped("inside.agent_signals", _s(s["skipped"]))]
    if s.get("ended"):
        where = f" ({_s(s.get('where'), 80)})" if s.get("where") else ""
        if exp.gvisor:
            # gVisor delivers a same-uid signal to PID 1 (SECURITY.md): the workload can end its
            # own sandbox; that forges nothing and reaches no other session.
            return [result("inside.agent_signals", "warn", "gVisor delivers same-uid signals to PID 1: the "
                           "workload can end its own sandbox (no result forged, no other session affected); "
                           + _s(s["ended"], 300) + where, severity="medium")]
        return [result("inside.agent_signals", "fail", _s(s["ended"], 300) + where)]
    before = _l(s.get("before"))
    if len(before) != 2:
        return [result("inside.agent_signals", "fail", "PID 1 not readable before the signals")]
    bad, parts = [], []
    for name in ("SIGSTOP", "SIGTERM", "SIGKILL"):
        r = _d(s.get(name))
        after = _l(r.get("after"))
        if len(after) != 2:
            bad.append(f"{name}: PID 1 gone")
        elif after[1] != before[1]:
            bad.append(f"{name}: PID 1 replaced")
        elif str(after[0]) in ("T", "t"):
            bad.append(f"{name}: PID 1 stopped")
        elif str(after[0]) in ("Z", "X"):
            bad.append(f"{name}: PID 1 exiting")
        parts.append(f"{name} {_s(r.get('kill'), 24)} -> state {_s(after[0] if after else '?', 2)}")
    where = f" ({_s(s.get('where'), 80)})" if s.get("where") else ""
    return [result("inside.agent_signals", "fail" if bad else "pass",
                   ("; ".join(bad) + "; " if bad else "PID 1 unaffected: ") + "; ".join(parts) + where)]


def _host_facts(p: dict[str, Any], exp: Expectations) -> list[CheckResult]:
    h = _d(p.get("host_facts"))
    req = {str(k): _s(v, 40) for k, v in _d(h.get("required")).items()}
    other = {str(k): _s(v, 40) for k, v in _d(h.get("other")).items()}
    if not req:
        return [result("inside.host_facts", "fail", "no result")]
    leaks = [k for k, v in req.items() if v.startswith("readable")]
    if exp.gvisor:
        # gVisor's /proc and /sys are its own: what it shows is no fact about the host
        # kernel, except where a file passes the host's through. Only the named two count.
        leaks = [k for k in leaks if k in ("/sys/kernel/vmcoreinfo", "/proc/config.gz")]
    also = [k for k, v in other.items() if v.startswith("readable")]
    obs = (f"READABLE: {_few(leaks)}; " if leaks else "") + \
        f"{len(req) - len(leaks)}/{len(req)} required paths masked, empty or absent"
    if also:
        obs += f"; also readable (not masked by this container's spec): {_few(also, 4)}"
    return [result("inside.host_facts", "fail" if leaks else "pass", obs)]


def _egress(p: dict[str, Any], exp: Expectations) -> list[CheckResult]:
    from sandbox.audit.egress import evaluate

    return evaluate(p.get("egress"), exp.egress, no_egress_reason=exp.no_egress_reason)


# probe section -> (rule, check ids it produces)
RULES: tuple[tuple[str, Callable[[dict[str, Any], Expectations], list[CheckResult]], tuple[str, ...]], ...] = (
    ("identity", _user, ("inside.user", "inside.groups")),
    ("caps", _caps, ("inside.caps",)),
    ("nnp", _nnp, ("inside.no_new_privs",)),
    ("seccomp", _seccomp, ("inside.seccomp_mode", "inside.seccomp_blocked")),
    ("rootfs", _rootfs, ("inside.rootfs_read_only",)),
    ("walk", _walk, ("inside.writable_paths", "inside.setid_files")),
    ("devices", _devices, ("inside.host_devices",)),
    ("kernel_files", _kernel_files, ("inside.proc_sys", "inside.sys", "inside.masked_paths", "inside.sysrq_trigger",
                                     "inside.core_pattern", "inside.usermode_helpers")),
    ("sockets", _sockets, ("inside.engine_socket",)),
    ("fds", _fds, ("inside.fd_leaks",)),
    ("exe", _exe, ("inside.runtime_exe",)),
    ("release_agent", _release_agent, ("inside.release_agent",)),
    ("keyring", _keyring, ("inside.keyring",)),
    ("ptrace", _ptrace, ("inside.ptrace",)),
    ("userns", _userns, ("inside.userns",)),
    ("pidns", _pidns, ("inside.pid_namespace",)),
    ("limits", _limits, ("inside.limit_pids", "inside.limit_memory", "inside.limit_cpu")),
    ("fork", _fork, ("inside.fork_bounded",)),
    ("network", _network, ("inside.no_route", "inside.raw_sockets", "inside.dns", "inside.metadata")),
    ("env", _env, ("inside.env_secrets",)),
    ("agent", _agent, ("inside.agent_channel", "inside.agent_memory")),
    ("signals", _signals, ("inside.agent_signals",)),
    ("host_facts", _host_facts, ("inside.host_facts",)),
    ("egress", _egress, ("inside.egress_secrets", "inside.egress_trust_store", "inside.egress_sni")),
)


def evaluate_inside(probe: dict[str, Any], exp: Expectations, *, only: Iterable[str] | None = None,
                    missing_reason: str = "the probe did not report it",
                    unavailable: Mapping[str, str] | None = None) -> list[CheckResult]:
    """Rows for every inside check (or ``only`` those): judged, or skipped with the reason.

    ``unavailable`` names checks that could not run (e.g. the sh subset) and why."""
    wanted = set(only) if only is not None else set(INSIDE_IDS)
    rows: dict[str, CheckResult] = {}
    for section, rule, ids in RULES:
        if not wanted & set(ids):
            continue
        data = probe.get(section)
        if data is None:
            for i in ids:
                rows[i] = skipped(i, missing_reason)
            continue
        if isinstance(data, dict) and "probe_error" in data:
            for i in ids:
                rows[i] = result(i, "fail", f"probe error: {_s(data['probe_error'], 200)}")
            continue
        try:
            produced = rule(probe, exp)
        except Exception as e:  # noqa: BLE001 - malformed input from inside: a failed row, not a crash
            produced = [result(i, "fail", f"unreadable probe output ({type(e).__name__})") for i in ids]
        for r in produced:
            rows[r.id] = r
        for i in ids:  # a rule that produced nothing for one of its ids leaves a skip, never a silent pass
            rows.setdefault(i, skipped(i, missing_reason))
    for i, why in (unavailable or {}).items():
        if i in rows:
            rows[i] = skipped(i, why)
    return [rows[i] for i in INSIDE_IDS if i in rows and i in wanted]
