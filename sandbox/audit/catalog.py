"""Every check the audit knows: id -> title, CIS id, severity, default expectation.

One table so the report, the JUnit export, the self-test and SECURITY.md name
checks the same way. CIS ids are recommendation numbers of section 5
("Container Runtime") of the benchmark named in :data:`CIS_BENCHMARK`; a check
with no CIS counterpart (most kernel-escape probes) has none.
"""

from __future__ import annotations

from dataclasses import dataclass

from sandbox.audit.model import CheckResult, Severity, Status, Where

# The benchmark edition the `cis` ids below are numbered in (5.28 = PIDs cgroup limit,
# 5.31 = Docker socket not mounted, as in v1.2.0's section 5). Reports print it, so a
# reviewer looks the ids up in the right document.
CIS_BENCHMARK = "CIS Docker Benchmark v1.2.0 (2019-07-29), section 5 \"Container Runtime\""


@dataclass(frozen=True)
class CheckDef:
    id: str
    title: str
    where: Where
    severity: Severity
    expected: str
    cis: str | None = None


_DEFS: tuple[CheckDef, ...] = (
    # ---- inside: identity and privilege
    CheckDef("inside.user", "Runs as a non-root user", "inside", "critical", "uid and gid not 0", None),
    CheckDef("inside.groups", "No privileged supplementary groups", "inside", "high", "no group 0", None),
    CheckDef("inside.caps", "No capabilities (CapInh/Prm/Eff/Bnd/Amb empty)", "inside", "critical",
             "all capability sets empty", "5.3"),
    CheckDef("inside.no_new_privs", "no_new_privs set", "inside", "high", "NoNewPrivs = 1", "5.25"),
    CheckDef("inside.seccomp_mode", "Seccomp filter active", "inside", "high", "Seccomp mode 2 (filter)", "5.21"),
    CheckDef("inside.seccomp_blocked", "Dangerous syscalls refused (sample)", "inside", "high",
             "every sampled call fails with EPERM/ENOSYS", "5.21"),
    CheckDef("inside.setid_files", "No usable setuid/setgid files", "inside", "high",
             "none, or inert (nosuid mount or no_new_privs)", None),
    # ---- inside: filesystem
    CheckDef("inside.rootfs_read_only", "Root filesystem read-only", "inside", "high",
             "/ mounted ro; creating files in /, /etc, /usr/bin fails", "5.12"),
    CheckDef("inside.writable_paths", "Writable paths limited to workspace and tmpfs", "inside", "medium",
             "writable mounts only the workspace and tmpfs", None),
    CheckDef("inside.host_devices", "No host devices", "inside", "high",
             "/dev holds only null, zero, full, random, urandom, tty, ptmx; no device nodes elsewhere", "5.17"),
    CheckDef("inside.proc_sys", "/proc/sys not writable", "inside", "high", "/proc/sys read-only or absent", None),
    CheckDef("inside.sys", "/sys not writable", "inside", "high", "/sys read-only; sysfs knobs not writable", None),
    CheckDef("inside.masked_paths", "/proc/kcore and other kernel files masked", "inside", "medium",
             "/proc/kcore, /proc/keys, /proc/timer_list, /sys/firmware ... absent or masked", None),
    CheckDef("inside.sysrq_trigger", "/proc/sysrq-trigger not writable", "inside", "high", "cannot be opened for writing",
             None),
    CheckDef("inside.core_pattern", "core_pattern not writable (host code execution on crash)", "inside", "critical",
             "/proc/sys/kernel/core_pattern cannot be opened for writing", None),
    CheckDef("inside.usermode_helpers", "Kernel usermode-helper hooks not writable", "inside", "critical",
             "modprobe, uevent_helper, binfmt_misc register cannot be opened for writing", None),
    # ---- inside: escapes
    CheckDef("inside.engine_socket", "No Docker/containerd socket reachable", "inside", "critical",
             "no engine socket at any known path, on any filesystem or in the abstract namespace", "5.31"),
    CheckDef("inside.fd_leaks", "No descriptors leading outside the container (CVE-2024-21626 class)", "inside",
             "critical", "no fd, cwd or root of any visible process resolves outside the root filesystem", None),
    CheckDef("inside.runtime_exe", "Runtime binary not writable via /proc/PID/exe (CVE-2019-5736 class)",
             "inside", "critical", "opening /proc/self/exe and /proc/1/exe for writing fails, also via O_PATH", None),
    CheckDef("inside.release_agent", "cgroup release_agent not writable (CVE-2022-0492 class)", "inside", "critical",
             "no mounted release_agent writable; unshare+mount of a cgroup v1 hierarchy fails", None),
    CheckDef("inside.keyring", "Kernel keyring unavailable", "inside", "medium", "keyctl refused", None),
    CheckDef("inside.ptrace", "ptrace denied", "inside", "high",
             "PTRACE_ATTACH and process_vm_readv on an own sibling refused", None),
    CheckDef("inside.userns", "User namespaces cannot be created", "inside", "high", "unshare(CLONE_NEWUSER) refused",
             None),
    CheckDef("inside.pid_namespace", "Host processes not visible", "inside", "high",
             "own pid namespace (no kthreadd)", "5.15"),
    # ---- inside: limits
    CheckDef("inside.limit_pids", "pids limit present", "inside", "medium", "pids.max set", "5.28"),
    CheckDef("inside.limit_memory", "Memory limit present", "inside", "medium", "memory limit set", "5.10"),
    CheckDef("inside.limit_cpu", "CPU limit present", "inside", "low", "CFS quota set", "5.11"),
    CheckDef("inside.fork_bounded", "Process limit effective (bounded fork test)", "inside", "medium",
             "fork fails at or below the limit", "5.28"),
    # ---- inside: network and secrets
    CheckDef("inside.no_route", "No route out", "inside", "high",
             "only lo; no default route (IPv4/IPv6); public addresses unroutable", "5.9"),
    CheckDef("inside.raw_sockets", "Raw and packet sockets unavailable", "inside", "medium",
             "socket(AF_INET, SOCK_RAW) and AF_PACKET refused", None),
    CheckDef("inside.dns", "DNS for outside names fails", "inside", "medium", "resolving example.com fails", None),
    CheckDef("inside.metadata", "Metadata address 169.254.169.254 unreachable", "inside", "high",
             "no route; connect fails at once with ENETUNREACH (no packet sent)", None),
    CheckDef("inside.env_secrets", "Environment free of secrets", "inside", "high",
             "no variable named like KEY/TOKEN/SECRET/PASSWORD; no value like sk-ant-", None),
    # ---- inside: egress L7 (credentials the proxy injects, its session CA, SNI pinning)
    CheckDef("inside.egress_secrets", "No configured egress secret readable in the sandbox", "inside", "critical",
             "no credential the policy injects (nor its header or Basic form) in any process environment or "
             "command line, or in files under the writable paths and /run/sandbox-egress", None),
    CheckDef("inside.egress_trust_store", "Trust store: host roots plus the name-constrained session CA only",
             "inside", "high",
             "the CA bundle(s) the sandbox is pointed at hold only the host's roots and the session CA; the CA "
             "is name-constrained to exactly the terminated hosts; its private key is nowhere inside", None),
    CheckDef("inside.egress_sni", "A tunnel naming another host in its ClientHello is refused", "inside", "high",
             "every TLS-port rule pins the SNI; a ClientHello naming another host than the CONNECT target gets the "
             "proxy's refusal (its own audit record says sni-mismatch), never the upstream", None),
    # ---- inside: the host-agent channel (PID 1) and host facts
    CheckDef("inside.agent_channel", "Host-agent channel unreachable from the workload", "inside", "critical",
             "opening /proc/1/fd/0 (requests) and /proc/1/fd/1 (results), or any /proc/1/fd/*, fails", None),
    CheckDef("inside.agent_memory", "Agent memory and environment unreadable", "inside", "critical",
             "PID 1 not dumpable; /proc/1/mem and /proc/1/environ cannot be opened", None),
    CheckDef("inside.agent_signals", "Agent cannot be stopped or killed", "inside", "high",
             "SIGSTOP, SIGTERM and SIGKILL sent to PID 1 change nothing: it keeps running, not stopped", None),
    CheckDef("inside.host_facts", "Host facts masked", "inside", "medium",
             "/sys/kernel/vmcoreinfo, /proc/config.gz and the spec's masked paths unreadable or empty", None),
    # ---- outside: docker inspect
    CheckDef("outside.privileged", "Not privileged", "outside", "critical", "Privileged = false", "5.4"),
    CheckDef("outside.user", "Configured user is not root", "outside", "high", "Config.User set, not 0/root", None),
    CheckDef("outside.capabilities", "Capabilities dropped, none added", "outside", "high",
             "CapDrop ALL, CapAdd empty", "5.3"),
    CheckDef("outside.seccomp", "Seccomp profile applied", "outside", "high", "a seccomp profile, not unconfined",
             "5.21"),
    CheckDef("outside.apparmor", "AppArmor profile", "outside", "medium", "a profile, not unconfined (where AppArmor exists)",
             "5.1"),
    CheckDef("outside.selinux", "SELinux options", "outside", "info", "label options where SELinux is enabled", "5.2"),
    CheckDef("outside.no_new_privileges", "no-new-privileges security option", "outside", "high",
             "SecurityOpt no-new-privileges", "5.25"),
    CheckDef("outside.read_only_rootfs", "Read-only root filesystem", "outside", "high", "ReadonlyRootfs = true", "5.12"),
    CheckDef("outside.pid_mode", "Host PID namespace not shared", "outside", "critical", "PidMode not host", "5.15"),
    CheckDef("outside.network_mode", "Host network namespace not shared", "outside", "critical", "NetworkMode not host",
             "5.9"),
    CheckDef("outside.ipc_mode", "Host IPC namespace not shared", "outside", "high", "IpcMode not host", "5.16"),
    CheckDef("outside.uts_mode", "Host UTS namespace not shared", "outside", "medium", "UTSMode not host", "5.20"),
    CheckDef("outside.userns_mode", "Host user namespace not shared", "outside", "medium",
             "UsernsMode not host (when the engine remaps)", "5.30"),
    CheckDef("outside.cgroupns", "Private cgroup namespace", "outside", "low", "CgroupnsMode private", None),
    CheckDef("outside.network", "No network (default bridge unused)", "outside", "high",
             "NetworkMode none / NetworkDisabled", "5.29"),
    CheckDef("outside.ports", "No published ports", "outside", "medium", "no port bindings", "5.7"),
    CheckDef("outside.sensitive_mounts", "No sensitive host paths mounted", "outside", "critical",
             "no mount of /, /etc, /proc, /sys, /dev, /var/lib/docker, ...", "5.5"),
    CheckDef("outside.docker_socket", "Docker socket not mounted", "outside", "critical",
             "no docker.sock / containerd.sock mount", "5.31"),
    CheckDef("outside.masked_paths", "Kernel paths masked and read-only", "outside", "high",
             "Docker's MaskedPaths and ReadonlyPaths in place (not systempaths=unconfined)", None),
    CheckDef("outside.mount_propagation", "No shared mount propagation", "outside", "medium",
             "no shared/rshared mounts", "5.19"),
    CheckDef("outside.devices", "No host devices", "outside", "high", "Devices and DeviceCgroupRules empty", "5.17"),
    CheckDef("outside.memory", "Memory limited (no swap)", "outside", "medium", "Memory > 0, MemorySwap = Memory",
             "5.10"),
    CheckDef("outside.cpu", "CPU limited", "outside", "low", "NanoCpus or CpuQuota set", "5.11"),
    CheckDef("outside.pids", "PIDs limit", "outside", "medium", "PidsLimit > 0", "5.28"),
    CheckDef("outside.ulimits", "ulimits set", "outside", "low", "nofile, nproc, fsize, core=0 set", "5.18"),
    CheckDef("outside.restart_policy", "No automatic restart", "outside", "low",
             "RestartPolicy no, or on-failure with at most 5 retries", "5.14"),
    CheckDef("outside.cgroup_parent", "Default cgroup parent", "outside", "low", "CgroupParent empty", "5.24"),
    CheckDef("outside.host_cgroup", "Limits enforced by the host's cgroups", "outside", "medium",
             "host-side pids.max, memory limit and CPU quota set for the container's processes", None),
    CheckDef("outside.env_secrets", "Configured environment free of secrets", "outside", "high",
             "no Config.Env variable named like a credential or holding a key", None),
    CheckDef("outside.runtime", "OCI runtime", "outside", "high", "the runtime the policy names", None),
    CheckDef("outside.spec_matches_policy", "Container matches its compiled policy", "outside", "high",
             "hardening fields equal the policy's compiled spec", None),
    CheckDef("outside.uid_unique", "Sandbox uid/gid held by no other live container", "outside", "high",
             "non-root uid and gid that no other running container holds (per-uid kernel limits stay per sandbox)",
             None),
    CheckDef("outside.declared_weakenings", "Weakenings the policy declares", "outside", "info",
             "none; any declared (unsafe: in the profile) is listed", None),
    CheckDef("outside.exec_seccomp", "Processes entering by `docker exec` get the seccomp filter", "outside", "info",
             "runc: yes; runsc (gVisor): no, and said so", None),
    # ---- engine (info/warn only: host configuration, not this container)
    CheckDef("engine.userns_remap", "Engine user-namespace remapping or rootless", "engine", "info",
             "userns-remap or rootless engine", None),
    CheckDef("engine.live_restore", "Engine live-restore", "engine", "info", "reported", None),
    CheckDef("engine.icc", "Inter-container communication on the default bridge", "engine", "info",
             "icc disabled", None),
    CheckDef("engine.default_runtime", "Engine default runtime", "engine", "info", "reported", None),
    CheckDef("engine.runtimes", "OCI runtimes available", "engine", "info", "runsc registered (gVisor)", None),
    CheckDef("engine.seccomp", "Engine seccomp support", "engine", "info", "seccomp available", None),
    CheckDef("engine.lsm", "Engine LSM (AppArmor/SELinux)", "engine", "info", "reported", None),
    CheckDef("engine.versions", "Engine, runc and kernel versions", "engine", "info", "reported", None),
    CheckDef("engine.runc_fixes", "runc carries the fixes for known escapes", "engine", "info",
             "CVE-2024-21626, CVE-2025-31133, -52565, -52881 fixed (runc >= 1.2.8 / 1.3.3 / 1.4.0-rc.3, "
             "or the distribution's backport)", None),
)

CATALOG: dict[str, CheckDef] = {d.id: d for d in _DEFS}


def result(check_id: str, status: Status, observed: str, expected: str | None = None,
           severity: Severity | None = None) -> CheckResult:
    d = CATALOG[check_id]
    return CheckResult(id=d.id, title=d.title, status=status, expected=expected or d.expected,
                       observed=observed, severity=severity or d.severity, where=d.where, cis=d.cis)


def skipped(check_id: str, reason: str) -> CheckResult:
    return result(check_id, "skip", f"could not run: {reason}")


INSIDE_IDS: tuple[str, ...] = tuple(d.id for d in _DEFS if d.where == "inside")
