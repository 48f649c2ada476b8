"""Compile a validated Policy into the exact Docker Engine API create body.

Pure functions: no Docker, no I/O. The result is what ``POST /containers/create``
receives, so an auditor can read precisely what a sandbox is given and unit
tests can check every hardening flag without an engine.

Two stages: :func:`policy_facts` reduces a validated Policy to plain JSON data (every
setting the body is made of, the OCI seccomp profile and the digest), and
:func:`body_from_facts` makes the create body from those facts and what the runtime
prepared for one sandbox. :func:`compile_spec` is both in a row. The facts are what
:mod:`sandbox.policycache` stores, so a sandbox made from a cached policy gets the
body the same code makes from a freshly loaded one. Only the first stage imports the
policy model and the seccomp compiler.
"""

from __future__ import annotations

import json
import socket
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from sandbox.policy import Policy

AGENT_CMD = ["/usr/bin/python3", "-I", "-S", "/opt/sandbox-agent/agent.py"]
EGRESS_MOUNT = "/run/sandbox-egress"
EGRESS_LISTEN = "127.0.0.1:3128"
SHM_SIZE_MB = 16

LABEL_MANAGED = "org.sandbox.managed"
LABEL_SESSION = "org.sandbox.session"
LABEL_HOST = "org.sandbox.host"
LABEL_OWNER = "org.sandbox.owner"
LABEL_POLICY = "org.sandbox.policy"
LABEL_DIGEST = "org.sandbox.policy-digest"
LABEL_POOL = "org.sandbox.pool"
LABEL_UID = "org.sandbox.uid"
LABEL_GID = "org.sandbox.gid"

# Docker's default masked paths (setting MaskedPaths replaces them, so they are repeated here),
# then host facts a workload has no use for: the kernel's build config and crash-dump layout,
# symbol addresses, loaded modules, the boot command line and boot id, CPU vulnerability
# status, firmware and DMI data, tracing and security filesystems.
MASKED_PATHS: tuple[str, ...] = (
    "/proc/asound", "/proc/acpi", "/proc/interrupts", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
    "/sys/devices/virtual/powercap",
    "/proc/config.gz", "/proc/kallsyms", "/proc/modules", "/proc/cmdline", "/proc/vmallocinfo",
    "/proc/iomem", "/proc/ioports", "/proc/slabinfo", "/proc/pagetypeinfo", "/proc/sys/kernel/random/boot_id",
    "/sys/kernel/vmcoreinfo", "/sys/kernel/notes", "/sys/kernel/debug", "/sys/kernel/tracing",
    "/sys/kernel/security", "/sys/kernel/btf", "/sys/module", "/sys/devices/system/cpu/vulnerabilities",
    "/sys/devices/virtual/dmi", "/sys/class/dmi",
)
READONLY_PATHS: tuple[str, ...] = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")

_ULIMITS = (("nofile", "nofile", 1), ("nproc", "nproc", 1), ("fsize", "fsize_mb", 1 << 20),
            ("core", "core", 1), ("cpu", "cpu_s", 1), ("stack", "stack_mb", 1 << 20))


# Records are NamedTuples, not dataclasses: `dataclasses` imports `inspect`, ~8 ms of a cold
# `sandbox exec` (measured by bench/bench_runtime.py).
class Binds(NamedTuple):
    """Host paths the runtime prepared for one sandbox (not part of the policy itself)."""

    workspace_dir: str | None = None  # host dir for a disk-backed or user-given workspace
    egress_dir: str | None = None     # per-session dir holding the proxy's Unix socket
    ro_mounts: tuple[tuple[str, str], ...] = ()  # (host path, container path), e.g. a session's skills


class Ids(NamedTuple):
    """The uid/gid this sandbox runs as: leased by the runtime, never shared by two live sandboxes."""

    uid: int
    gid: int


def policy_ids(policy: Policy) -> Ids:
    """The pinned ids of a policy, or a placeholder for ``auto`` (for previews: explain, audits of a spec)."""
    u = policy.user
    return _pinned_ids(u.uid, u.gid)


def _pinned_ids(uid: Any, gid: Any) -> Ids:
    return Ids(uid, gid) if isinstance(uid, int) and isinstance(gid, int) else Ids(65534, 65534)


class ContainerSpec(NamedTuple):
    body: dict[str, Any]
    seccomp_profile: dict[str, Any]

    def __repr__(self) -> str:
        return f"ContainerSpec(body={self.body!r})"

    @property
    def host_config(self) -> dict[str, Any]:
        return self.body["HostConfig"]


def egress_env() -> dict[str, str]:
    url = f"http://{EGRESS_LISTEN}"
    env = {"HTTP_PROXY": url, "HTTPS_PROXY": url, "http_proxy": url, "https_proxy": url,
           "ALL_PROXY": url, "NO_PROXY": "localhost,127.0.0.1", "no_proxy": "localhost,127.0.0.1"}
    # The egress proxy always writes this bundle (the host's roots, plus the session CA when the
    # policy terminates a host to inject a credential): sandbox/egress/manager.py CA_ENV_VARS.
    bundle = f"{EGRESS_MOUNT}/ca-bundle.pem"
    env.update({k: bundle for k in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "PIP_CERT", "GIT_SSL_CAINFO",
                                    "AWS_CA_BUNDLE", "CARGO_HTTP_CAINFO", "NIX_SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS")})
    return env


def sandbox_env(policy: Policy, egress: bool) -> dict[str, str]:
    return _sandbox_env(policy.workspace.path, dict(policy.env), egress)


def _sandbox_env(workspace_path: str, policy_env: dict[str, str], egress: bool) -> dict[str, str]:
    # USER/LOGNAME: leased uids have no passwd entry; tools that want a name (getpass, ...) read these.
    env = {"HOME": workspace_path, "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
           "TMPDIR": "/tmp", "PYTHONDONTWRITEBYTECODE": "1", "USER": "sandbox", "LOGNAME": "sandbox"}
    if egress:
        env.update(egress_env())
    env.update(policy_env)
    return env


def labels(policy: Policy, session_id: str, owner: str, extra: dict[str, str] | None = None,
           ids: Ids | None = None) -> dict[str, str]:
    return _labels(policy.name, policy.digest(), session_id, owner, extra, ids)


def _labels(name: str, digest: str, session_id: str, owner: str, extra: dict[str, str] | None = None,
            ids: Ids | None = None) -> dict[str, str]:
    out = {LABEL_MANAGED: "true", LABEL_SESSION: session_id, LABEL_HOST: socket.gethostname(),
           LABEL_OWNER: owner, LABEL_POLICY: name, LABEL_DIGEST: digest}
    if ids is not None:
        out[LABEL_UID], out[LABEL_GID] = str(ids.uid), str(ids.gid)
    out.update(extra or {})
    return out


def _tmpfs_opts(size_mb: int, exec_: bool, uid: int | None = None, gid: int | None = None, mode: str = "1777") -> str:
    opts = ["rw", "nosuid", "nodev", "exec" if exec_ else "noexec", f"size={size_mb}m", f"mode={mode}"]
    if uid is not None:
        opts += [f"uid={uid}", f"gid={gid}"]
    return ",".join(opts)


FACTS_VERSION = 1  # bump when the facts' shape or meaning changes (cached facts are then rebuilt)


def policy_facts(policy: Policy) -> dict[str, Any]:
    """Everything the create body is made of, as plain JSON data: the policy's settings, its
    digest, and its seccomp filter (resolved, adjusted for its runtime) as an OCI profile."""
    from sandbox import seccomp as sc

    flt = sc.for_runtime(sc.compile_filter(policy.seccomp), policy.runtime)
    rl, lim, ws = policy.rlimits, policy.limits, policy.workspace
    return {
        "v": FACTS_VERSION,
        "name": policy.name,
        "digest": policy.digest(),
        "image": policy.image,
        "runtime": policy.runtime,
        "user": {"uid": policy.user.uid, "gid": policy.user.gid},
        "workspace": {"path": ws.path, "backing": ws.backing, "size_mb": ws.size_mb},
        "tmpfs": [{"path": t.path, "size_mb": t.size_mb, "exec": t.exec} for t in policy.tmpfs],
        "read_only_mounts": [{"source": m.source, "target": m.target} for m in policy.read_only_mounts],
        "limits": {"memory_mb": lim.memory_mb, "cpus": lim.cpus, "pids": lim.pids},
        "rlimits": {attr: getattr(rl, attr) for _, attr, _ in _ULIMITS},
        "env": dict(policy.env),
        "egress": bool(policy.egress.enabled),
        "timeouts": {"call_s": policy.timeouts.call_s, "session_s": policy.timeouts.session_s},
        "output": {"max_bytes": policy.output.max_bytes},
        "seccomp_profile": sc.to_oci(flt),
    }


def compile_spec(policy: Policy, session_id: str, binds: Binds = Binds(), owner: str = "cli",
                 image: str | None = None, extra_labels: dict[str, str] | None = None,
                 ids: Ids | None = None) -> ContainerSpec:
    """Policy -> Docker create body. ``binds`` carries host paths the runtime created; ``ids`` the
    uid/gid the runtime leased (defaults to the policy's pinned ids, or a placeholder for ``auto``)."""
    return body_from_facts(policy_facts(policy), session_id, binds, owner, image, extra_labels, ids)


def body_from_facts(facts: dict[str, Any], session_id: str, binds: Binds = Binds(), owner: str = "cli",
                    image: str | None = None, extra_labels: dict[str, str] | None = None,
                    ids: Ids | None = None) -> ContainerSpec:
    """The create body from :func:`policy_facts` and what the runtime prepared for one sandbox."""
    profile = facts["seccomp_profile"]
    egress = facts["egress"]
    if egress and not binds.egress_dir:
        raise ValueError("policy allows egress but no proxy socket directory was prepared")
    u = ids or _pinned_ids(facts["user"]["uid"], facts["user"]["gid"])
    ws = facts["workspace"]
    tmpfs = {t["path"]: _tmpfs_opts(t["size_mb"], t["exec"]) for t in facts["tmpfs"]}
    mounts: list[dict[str, Any]] = []
    if binds.workspace_dir:
        mounts.append({"Type": "bind", "Source": binds.workspace_dir, "Target": ws["path"], "ReadOnly": False,
                       "BindOptions": {"Propagation": "rprivate"}})
    elif ws["backing"] == "tmpfs":
        tmpfs[ws["path"]] = _tmpfs_opts(ws["size_mb"], True, u.uid, u.gid, mode="0700")
    else:
        raise ValueError("a disk-backed workspace needs its host directory")
    for m in facts["read_only_mounts"]:
        mounts.append({"Type": "bind", "Source": m["source"], "Target": m["target"], "ReadOnly": True,
                       "BindOptions": {"Propagation": "rprivate"}})
    for src, target in binds.ro_mounts:
        mounts.append({"Type": "bind", "Source": src, "Target": target, "ReadOnly": True,
                       "BindOptions": {"Propagation": "rprivate"}})
    if egress:
        mounts.append({"Type": "bind", "Source": binds.egress_dir, "Target": EGRESS_MOUNT, "ReadOnly": True,
                       "BindOptions": {"Propagation": "rprivate"}})
    rl = facts["rlimits"]
    ulimits = [{"Name": name, "Soft": rl[attr] * mult, "Hard": rl[attr] * mult} for name, attr, mult in _ULIMITS]
    lim = facts["limits"]
    mem = lim["memory_mb"] << 20
    host_config: dict[str, Any] = {
        "Runtime": facts["runtime"],
        # No docker-init: the agent itself is PID 1 (non-dumpable, no signal handlers, reaps
        # orphans), so no dumpable process of the sandbox ever holds the channel's descriptors.
        "Init": False,
        "ReadonlyRootfs": True,
        "Privileged": False,
        "CapDrop": ["ALL"],
        "CapAdd": None,
        "SecurityOpt": ["no-new-privileges:true", "seccomp=" + json.dumps(profile, separators=(",", ":"))],
        "Memory": mem,
        "MemorySwap": mem,  # equal to Memory: no swap
        "MemoryReservation": 0,
        "NanoCpus": int(lim["cpus"] * 1e9),
        "PidsLimit": lim["pids"],
        "Ulimits": ulimits,
        "OomScoreAdj": 500,  # under host memory pressure, sandboxes go first
        "Tmpfs": tmpfs,
        "Mounts": mounts,
        "ShmSize": SHM_SIZE_MB << 20,
        "IpcMode": "private",
        "PidMode": "",
        "UTSMode": "",
        "UsernsMode": "",
        "CgroupnsMode": "private",
        "NetworkMode": "none",
        "PublishAllPorts": False,
        "PortBindings": {},
        "MaskedPaths": list(MASKED_PATHS),
        "ReadonlyPaths": list(READONLY_PATHS),
        "Devices": [],
        "DeviceCgroupRules": [],
        "GroupAdd": None,
        "RestartPolicy": {"Name": "no"},
        # Output travels over the attach stream; a json-file log would copy an output flood to the host disk.
        "LogConfig": {"Type": "none", "Config": {}},
        # The engine deletes the container as soon as it exits: teardown is one kill, and a
        # sandbox whose agent dies (or whose owner crashed and killed it) leaves nothing behind.
        "AutoRemove": True,
    }
    env = _sandbox_env(ws["path"], facts["env"], egress)
    body: dict[str, Any] = {
        "Image": image or facts["image"],
        "User": f"{u.uid}:{u.gid}",
        "Env": [f"{k}={v}" for k, v in env.items()],
        "Cmd": AGENT_CMD,
        "Entrypoint": None,
        "WorkingDir": ws["path"],
        "Hostname": "sandbox",
        "Domainname": "",
        "NetworkDisabled": True,
        "OpenStdin": True,
        # stdin closes when the attached owner goes away (whatever killed it); the agent then
        # exits, and as PID 1 takes the whole sandbox with it: no sandbox outlives its owner.
        "StdinOnce": True,
        "AttachStdin": True,
        "AttachStdout": True,
        "AttachStderr": True,
        "Tty": False,
        "StopSignal": "SIGKILL",
        "Labels": _labels(facts["name"], facts["digest"], session_id, owner, extra_labels, u),
        "HostConfig": host_config,
    }
    return ContainerSpec(body=body, seccomp_profile=profile)
