"""Judge a container from outside: its `docker inspect`, the host's cgroup files, the engine.

Nothing here runs code in the container, so these rows are available for any
container on the host and cannot be forged by what runs inside it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from sandbox.audit.catalog import result, skipped
from sandbox.audit.model import CheckResult, Status

SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
SECRET_VALUE = re.compile(r"sk-ant-|\bAKIA[0-9A-Z]{16}\b|\b(ghp|gho|ghs|ghu)_[A-Za-z0-9]{20,}|github_pat_|\bxox[abprs]-|"
                          r"-----BEGIN [A-Z ]*PRIVATE KEY")
ENGINE_SOCKET = re.compile(r"(docker|containerd|crio|podman|dockershim|buildkitd)\.sock|/run/containerd(/|$)")
# Compared between the running container and the policy's compiled spec.
SPEC_FIELDS = ("Privileged", "ReadonlyRootfs", "CapAdd", "CapDrop", "Memory", "MemorySwap", "NanoCpus", "PidsLimit",
               "NetworkMode", "Runtime", "IpcMode", "PidMode", "UTSMode", "UsernsMode", "Init", "OomScoreAdj",
               "ShmSize", "PublishAllPorts")


def _few(items: list[str], n: int = 5) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _empty(v: Any) -> bool:
    return v in (None, "", [], {}, 0)


def _security_opts(hc: dict[str, Any]) -> tuple[list[str], dict[str, Any] | None, str | None]:
    """(option names without the seccomp JSON, parsed seccomp profile, seccomp mode word)."""
    names, profile, mode = [], None, None
    for o in hc.get("SecurityOpt") or []:
        key, _, val = str(o).partition("=" if "=" in str(o) else ":")
        if key == "seccomp":
            if val.lstrip().startswith("{"):
                try:
                    profile = json.loads(val)
                    mode = "custom"
                except ValueError:
                    mode = "unparseable"
            else:
                mode = val
            names.append(f"seccomp={mode}")
        else:
            names.append(str(o)[:80])
    return names, profile, mode


def _host_path_problem(src: str) -> str | None:
    from sandbox.policy import check_host_path

    try:
        check_host_path(src)
    except ValueError as e:
        return str(e)
    return None


def host_cgroup_limits(pid: int) -> dict[str, str | None]:
    """The container's limits as the host kernel enforces them (cgroup files of its init pid)."""
    out: dict[str, str | None] = {"pids": None, "memory": None, "cpu_quota": None}
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return out
    v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
    paths: dict[str, str] = {}
    for line in lines:
        _, ctrls, path = line.split(":", 2)
        for c in ctrls.split(",") if ctrls else ["unified"]:
            paths[c] = path.lstrip("/")

    def read(p: Path) -> str | None:
        try:
            return p.read_text().strip()
        except OSError:
            return None

    if v2:
        base = Path("/sys/fs/cgroup") / paths.get("unified", "")
        out["pids"], out["memory"] = read(base / "pids.max"), read(base / "memory.max")
        cpu = read(base / "cpu.max")
        out["cpu_quota"] = cpu.split()[0] if cpu else None
    else:
        out["pids"] = read(Path("/sys/fs/cgroup/pids") / paths.get("pids", "") / "pids.max")
        out["memory"] = read(Path("/sys/fs/cgroup/memory") / paths.get("memory", "") / "memory.limit_in_bytes")
        cpu_path = paths.get("cpu", paths.get("cpu,cpuacct", ""))
        out["cpu_quota"] = read(Path("/sys/fs/cgroup/cpu") / cpu_path / "cpu.cfs_quota_us")
    return out


def _finite(v: str | None) -> int | None:
    if v is None or not v.lstrip("-").isdigit():
        return None
    n = int(v)
    return n if 0 < n < (1 << 62) else None


def evaluate_outside(attrs: dict[str, Any], info: dict[str, Any] | None = None, *, policy: Any = None,
                     spec_body: dict[str, Any] | None = None, read_host_cgroups: bool = True) -> list[CheckResult]:
    """Rows from a container's inspect data. With ``policy``/``spec_body``, exact expectations apply."""
    hc: dict[str, Any] = attrs.get("HostConfig") or {}
    cfg: dict[str, Any] = attrs.get("Config") or {}
    info = info or {}
    engine_sec = " ".join(info.get("SecurityOptions") or [])
    rows: list[CheckResult] = []

    rows.append(result("outside.privileged", "fail" if hc.get("Privileged") else "pass",
                       f"Privileged={bool(hc.get('Privileged'))}"))

    user = str(cfg.get("User") or "")
    uname = user.split(":")[0]
    root = uname in ("", "0", "root")
    # A pinned uid is expected as such; "auto" means any leased non-root pair (outside.uid_unique
    # checks that no other live container holds it).
    pinned = policy is not None and isinstance(policy.user.uid, int)
    exp_user = f"{policy.user.uid}:{policy.user.gid}" if pinned else None
    ok = not root and (exp_user is None or user == exp_user)
    rows.append(result("outside.user", "pass" if ok else "fail",
                       f"User={user!r}" + (" (image default: root unless the image sets USER)" if not user else ""),
                       f"User={exp_user}" if exp_user else None))

    cap_add = [str(c) for c in hc.get("CapAdd") or []]
    cap_drop = [str(c).upper().removeprefix("CAP_") for c in hc.get("CapDrop") or []]
    ok = not cap_add and "ALL" in cap_drop
    rows.append(result("outside.capabilities", "pass" if ok else "fail",
                       f"CapAdd={cap_add or 'none'}; CapDrop={cap_drop or 'none (Docker default set kept)'}"))

    opts, profile, mode = _security_opts(hc)
    if mode == "unconfined":
        rows.append(result("outside.seccomp", "fail", "seccomp=unconfined"))
    elif mode == "custom" and profile is not None:
        rules = profile.get("syscalls") or []
        allowed = sum(len(r.get("names") or []) for r in rules if r.get("action") == "SCMP_ACT_ALLOW")
        obs = f"custom profile: default {profile.get('defaultAction')}, {allowed} syscall names allowed"
        status: Status = "pass"
        if spec_body is not None:
            _, spec_profile, _ = _security_opts(spec_body.get("HostConfig") or {})
            same = spec_profile == profile
            obs += "; identical to the policy's compiled allowlist" if same else "; DIFFERS from the policy's allowlist"
            status = "pass" if same else "fail"
        rows.append(result("outside.seccomp", status, obs))
    elif mode is None:
        ok = "seccomp" in engine_sec and policy is None
        rows.append(result("outside.seccomp", "pass" if ok else "fail",
                           "engine default profile" if "seccomp" in engine_sec else "no seccomp on this engine",
                           "the policy's custom allowlist" if policy is not None else None))
    else:
        rows.append(result("outside.seccomp", "fail", f"seccomp={mode}"))

    aa = str(attrs.get("AppArmorProfile") or "")
    aa_opt = [o for o in opts if o.startswith("apparmor")]
    if "apparmor" not in engine_sec:
        rows.append(result("outside.apparmor", "info", "AppArmor not available on this host"
                           + (f" ({aa_opt[0]} requested, no effect)" if aa_opt else "")))
    else:
        rows.append(result("outside.apparmor", "fail" if aa in ("", "unconfined") else "pass", f"profile={aa or 'none'}"))
    se = [o for o in opts if o.startswith("label")]
    rows.append(result("outside.selinux", "info", ("SELinux enabled; " if "selinux" in engine_sec else "SELinux not enabled; ")
                       + (f"options {se}" if se else "no label options")))
    nnp = any(re.fullmatch(r"no-new-privileges(:true|=true)?", o) for o in opts)
    rows.append(result("outside.no_new_privileges", "pass" if nnp else "fail",
                       "set" if nnp else f"not set (SecurityOpt: {_few(opts) or 'none'})"))

    rows.append(result("outside.read_only_rootfs", "pass" if hc.get("ReadonlyRootfs") else "fail",
                       f"ReadonlyRootfs={bool(hc.get('ReadonlyRootfs'))}"))

    for key, cid in (("PidMode", "outside.pid_mode"), ("NetworkMode", "outside.network_mode"),
                     ("IpcMode", "outside.ipc_mode"), ("UTSMode", "outside.uts_mode"),
                     ("UsernsMode", "outside.userns_mode")):
        v = str(hc.get(key) or "")
        host = v == "host"
        if cid == "outside.userns_mode" and host and "userns" not in engine_sec:
            rows.append(result(cid, "info", "UsernsMode=host, but the engine does not remap users anyway"))
            continue
        shared = v.startswith("container:")
        rows.append(result(cid, "fail" if host else "warn" if shared else "pass",
                           f"{key}={v or 'default (private)'}"
                           + (" (shares another container's namespace)" if shared else "")))
    cg = str(hc.get("CgroupnsMode") or "")
    rows.append(result("outside.cgroupns", "pass" if cg == "private" else "warn",
                       f"CgroupnsMode={cg or 'engine default'}"))

    net = str(hc.get("NetworkMode") or "")
    if net != "host" and (cfg.get("NetworkDisabled") or net == "none"):
        rows.append(result("outside.network", "pass",
                           "NetworkDisabled" if cfg.get("NetworkDisabled") else "NetworkMode=none"))
    else:
        nets = sorted((attrs.get("NetworkSettings") or {}).get("Networks") or {})
        rows.append(result("outside.network", "fail",
                           f"NetworkMode={net or 'default'}; attached to {_few(nets) or 'nothing'}"
                           + (" (the default docker0 bridge)" if net in ("default", "bridge") else "")))

    binds = hc.get("PortBindings") or {}
    ports = []
    for cport, hosts in binds.items():
        for h in hosts or [{}]:
            ip = (h or {}).get("HostIp") or "0.0.0.0"
            ports.append(f"{ip}:{(h or {}).get('HostPort') or 'auto'}->{cport}"
                         + (" (all interfaces, CIS 5.13)" if ip in ("0.0.0.0", "::") else ""))
    if hc.get("PublishAllPorts"):
        ports.append("PublishAllPorts")
    rows.append(result("outside.ports", "fail" if ports else "pass", _few(ports) or "none"))

    mounts = attrs.get("Mounts") or []
    sensitive: list[str] = []
    sockets: list[str] = []
    propagated: list[str] = []
    listing: list[str] = []
    for m in mounts:
        src, dst = str(m.get("Source") or ""), str(m.get("Destination") or "")
        listing.append(f"{src or m.get('Name')}->{dst}{'' if m.get('RW') else ' (ro)'}")
        if ENGINE_SOCKET.search(src) or ENGINE_SOCKET.search(dst):
            sockets.append(f"{src}->{dst}")
        if m.get("Type") == "bind" and src:
            why = _host_path_problem(src)
            if why:
                sensitive.append(f"{src}->{dst}{'' if m.get('RW') else ' (ro)'}")
        if str(m.get("Propagation") or "") in ("shared", "rshared"):
            propagated.append(f"{dst} ({m.get('Propagation')})")
    rows.append(result("outside.sensitive_mounts", "fail" if sensitive else "pass",
                       f"sensitive: {_few(sensitive)}" if sensitive else f"{len(mounts)} mounts: {_few(listing) or 'none'}"))
    rows.append(result("outside.docker_socket", "fail" if sockets else "pass", _few(sockets) or "not mounted"))
    rows.append(result("outside.mount_propagation", "fail" if propagated else "pass",
                       _few(propagated) or "none shared"))

    masked = hc.get("MaskedPaths")
    ro_paths = hc.get("ReadonlyPaths")
    if masked is None and ro_paths is None:
        rows.append(skipped("outside.masked_paths", "the engine does not report MaskedPaths/ReadonlyPaths"))
    else:
        missing = [p for p in ("/proc/kcore", "/proc/keys", "/sys/firmware") if p not in (masked or [])]
        missing += [p for p in ("/proc/sys", "/proc/sysrq-trigger") if p not in (ro_paths or [])]
        rows.append(result("outside.masked_paths", "fail" if missing else "pass",
                           f"not masked/read-only: {_few(missing)}" if missing else
                           f"{len(masked or [])} masked, {len(ro_paths or [])} read-only"))

    devs = [f"{d.get('PathOnHost')}->{d.get('PathInContainer')}" for d in hc.get("Devices") or []]
    rules = [str(r) for r in hc.get("DeviceCgroupRules") or []]
    reqs = [str(r.get("Driver") or "gpu") for r in hc.get("DeviceRequests") or []]
    rows.append(result("outside.devices", "fail" if devs or rules or reqs else "pass",
                       _few(devs + rules + reqs) or "none"))

    mem, swap = int(hc.get("Memory") or 0), int(hc.get("MemorySwap") or 0)
    if mem <= 0:
        rows.append(result("outside.memory", "fail", "Memory=0 (unlimited)"))
    elif swap != mem:
        rows.append(result("outside.memory", "fail" if policy is not None else "warn",
                           f"Memory={mem}; MemorySwap={swap} (swap allowed)"))
    else:
        exp_mem = policy.limits.memory_mb << 20 if policy is not None else None
        rows.append(result("outside.memory", "pass" if exp_mem in (None, mem) else "fail", f"Memory={mem}, no swap",
                           f"Memory={exp_mem}, MemorySwap=Memory" if exp_mem else None))

    nano, quota, shares = int(hc.get("NanoCpus") or 0), int(hc.get("CpuQuota") or 0), int(hc.get("CpuShares") or 0)
    if nano or quota:
        exp_nano = int(policy.limits.cpus * 1e9) if policy is not None else None
        ok = exp_nano is None or nano == exp_nano
        rows.append(result("outside.cpu", "pass" if ok else "fail", f"NanoCpus={nano} CpuQuota={quota}",
                           f"NanoCpus={exp_nano}" if exp_nano else None))
    else:
        rows.append(result("outside.cpu", "warn" if shares else "fail",
                           f"CpuShares={shares} (relative weight only)" if shares else "no CPU limit"))

    pids = hc.get("PidsLimit")
    exp_p = policy.limits.pids if policy is not None else None
    ok = isinstance(pids, int) and pids > 0 and exp_p in (None, pids)
    rows.append(result("outside.pids", "pass" if ok else "fail", f"PidsLimit={pids}",
                       f"PidsLimit={exp_p}" if exp_p else None))

    ul = {str(u.get("Name")): (u.get("Soft"), u.get("Hard")) for u in hc.get("Ulimits") or []}
    want = ("nofile", "nproc", "core")
    ok = all(k in ul for k in want) and ul.get("core") == (0, 0)
    rows.append(result("outside.ulimits", "pass" if ok else "warn",
                       ", ".join(f"{k}={v[0]}" for k, v in sorted(ul.items())) or "engine defaults"))

    rp = hc.get("RestartPolicy") or {}
    name, retries = str(rp.get("Name") or "no"), int(rp.get("MaximumRetryCount") or 0)
    ok = name in ("no", "") or (name == "on-failure" and 0 < retries <= 5)
    rows.append(result("outside.restart_policy", "pass" if ok else "fail",
                       f"{name}" + (f":{retries}" if name == "on-failure" else "")))

    parent = str(hc.get("CgroupParent") or "")
    rows.append(result("outside.cgroup_parent", "pass" if not parent else "info", parent or "default"))

    pid = int(((attrs.get("State") or {}).get("Pid")) or 0)
    if not read_host_cgroups:
        pass
    elif pid <= 0:
        rows.append(skipped("outside.host_cgroup", "the container is not running"))
    else:
        lim = host_cgroup_limits(pid)
        unset = [k for k, v in lim.items() if _finite(v) is None]
        rows.append(result("outside.host_cgroup", "fail" if unset else "pass",
                           ", ".join(f"{k}={v}" for k, v in lim.items()) + (f"; unlimited: {', '.join(unset)}" if unset else "")))

    hits = []
    for kv in cfg.get("Env") or []:
        k, _, v = str(kv).partition("=")
        if SECRET_NAME.search(k):
            hits.append(f"{k} [name]")
        elif SECRET_VALUE.search(v):
            hits.append(f"{k} [value looks like a key]")
    rows.append(result("outside.env_secrets", "fail" if hits else "pass",
                       ("names only: " + _few(hits)) if hits else f"{len(cfg.get('Env') or [])} variables, none secret-looking"))

    rt = str(hc.get("Runtime") or info.get("DefaultRuntime") or "runc")
    if policy is not None:
        rows.append(result("outside.runtime", "pass" if rt == policy.runtime else "fail", rt, policy.runtime))
    else:
        rows.append(result("outside.runtime", "info",
                           rt + (" (gVisor user-space kernel)" if rt == "runsc" else " (shares the host kernel)")))

    if spec_body is not None:
        rows.append(_spec_match(hc, cfg, spec_body))
    return rows


def _spec_match(hc: dict[str, Any], cfg: dict[str, Any], spec_body: dict[str, Any]) -> CheckResult:
    shc = spec_body.get("HostConfig") or {}
    diffs = []
    for k in SPEC_FIELDS:
        a, b = hc.get(k), shc.get(k)
        if not (a == b or (_empty(a) and _empty(b))):
            diffs.append(f"{k}: {a!r} != {b!r}")
    ul_a = sorted((u.get("Name"), u.get("Soft"), u.get("Hard")) for u in hc.get("Ulimits") or [])
    ul_b = sorted((u.get("Name"), u.get("Soft"), u.get("Hard")) for u in shc.get("Ulimits") or [])
    if ul_a != ul_b:
        diffs.append("Ulimits differ")
    if sorted(hc.get("Tmpfs") or {}) != sorted(shc.get("Tmpfs") or {}):
        diffs.append(f"Tmpfs {sorted(hc.get('Tmpfs') or {})} != {sorted(shc.get('Tmpfs') or {})}")
    if str(cfg.get("User") or "") != str(spec_body.get("User") or ""):
        diffs.append(f"User {cfg.get('User')!r} != {spec_body.get('User')!r}")
    a_opts = sorted(o for o in hc.get("SecurityOpt") or [] if not str(o).startswith("seccomp"))
    b_opts = sorted(o for o in shc.get("SecurityOpt") or [] if not str(o).startswith("seccomp"))
    if a_opts != b_opts:
        diffs.append(f"SecurityOpt {a_opts} != {b_opts}")
    if diffs:
        return result("outside.spec_matches_policy", "fail", _few(diffs, 4))
    return result("outside.spec_matches_policy", "pass",
                  f"{len(SPEC_FIELDS) + 4} hardening fields equal the compiled spec")


def evaluate_engine(info: dict[str, Any], bridge_options: dict[str, Any] | None = None) -> list[CheckResult]:
    """Host-wide settings: reported as info/warn, never failing a container's audit."""
    sec = [str(s) for s in info.get("SecurityOptions") or []]
    joined = " ".join(sec)
    rows = []
    if "name=userns" in joined or "name=rootless" in joined:
        rows.append(result("engine.userns_remap", "info",
                           "rootless engine" if "rootless" in joined else "userns-remap enabled"))
    else:
        rows.append(result("engine.userns_remap", "warn",
                           "neither userns-remap nor rootless: uid 0 in a container is uid 0 on the host "
                           "(sandboxes never run as uid 0, but a runtime escape would land as root)"))
    rows.append(result("engine.live_restore", "info", "enabled" if info.get("LiveRestoreEnabled") else
                       "disabled (containers stop with the daemon; sandboxes are disposable anyway)"))
    icc = None if bridge_options is None else str(bridge_options.get("com.docker.network.bridge.enable_icc", "true"))
    if icc is None:
        rows.append(result("engine.icc", "info", "default bridge options not readable"))
    else:
        rows.append(result("engine.icc", "warn" if icc == "true" else "info",
                           "enabled on docker0: containers on the default bridge reach each other (sandboxes have no network)"
                           if icc == "true" else "disabled"))
    runtimes = sorted((info.get("Runtimes") or {}).keys())
    rows.append(result("engine.default_runtime", "info", str(info.get("DefaultRuntime"))))
    rsc = (info.get("Runtimes") or {}).get("runsc") or {}
    rsc_args = rsc.get("runtimeArgs") or rsc.get("args") or []
    if "runsc" in runtimes:
        seccomp_ok = "--oci-seccomp" in rsc_args
        rows.append(result("engine.runtimes", "info" if seccomp_ok else "warn",
                           f"{', '.join(runtimes)}; runsc args {rsc_args}"
                           + ("" if seccomp_ok else " (without --oci-seccomp runsc ignores the seccomp profile)")))
    else:
        rows.append(result("engine.runtimes", "warn", f"{', '.join(runtimes)}; runsc (gVisor) not registered"))
    rows.append(result("engine.seccomp", "info" if "seccomp" in joined else "warn",
                       "available" if "seccomp" in joined else "not available"))
    lsm = [s for s in ("apparmor", "selinux") if s in joined]
    rows.append(result("engine.lsm", "info", ", ".join(lsm) or "neither AppArmor nor SELinux"))
    # The engine's runc against the releases that fixed the escapes SECURITY.md names (as `sandbox doctor`).
    from sandbox.audit.hostfacts import runc_facts, runc_verdict

    status, detail, fix = runc_verdict(runc_facts(info))
    rows.append(result("engine.runc_fixes", "info" if status == "ok" else "warn",
                       detail + (f"; fix: {fix}" if fix else "")))
    runc = (info.get("RuncCommit") or {}).get("ID")
    rows.append(result("engine.versions", "info",
                       f"engine {info.get('ServerVersion')}, runc {runc}, containerd "
                       f"{(info.get('ContainerdCommit') or {}).get('ID')}, kernel {info.get('KernelVersion')}, "
                       f"cgroup v{info.get('CgroupVersion')} ({info.get('CgroupDriver')})"))
    return rows

