"""Host checks: can this machine run hardened sandboxes, and what to fix if not.

Every row says what was found in words and, when it is not ok, a fix that exists on a
Debian-like host. The runc row compares the engine's runc with the releases that fixed
the escapes SECURITY.md names, and reads the distribution's changelog for backports
(Debian keeps its version number and patches the CVE: 1.1.5+ds1-1+deb12u1 carries the
CVE-2024-21626 fix while upstream 1.1.5 does not).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sandbox.audit.hostfacts import (  # noqa: F401 - re-exported: the doctor's vocabulary
    ENGINE_FIX,
    RUNC_FIXES,
    RuncFacts,
    engine_error_words,
    package_version,
    parse_runc_version,
    runc_facts,
    runc_verdict,
    upstream_fixed,
)


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


# ---- gVisor's platform (PPERF, issue 11) ----
# Measured on this project's 2-core host (bench/bench_gvisor.py): runsc 20221219 has ptrace and
# kvm (no systrap); kvm hangs after machine setup inside this VM (its CPU shows no vmx/svm: no
# nested virtualisation behind /dev/kvm); ptrace passes the boundary
# tests. ./run registers the platform named by SANDBOX_RUNSC_PLATFORM, ptrace by default.


def runsc_platform(info: dict[str, Any]) -> str:
    """The platform the engine's runsc registration uses (its --platform runtime argument), or
    "default" when it names none (runsc's own default: ptrace up to 2023, systrap after)."""
    args = ((info.get("Runtimes") or {}).get("runsc") or {}).get("runtimeArgs") or []
    platform = "default"
    for i, a in enumerate(args):
        if a.startswith("--platform=") or a.startswith("-platform="):
            platform = a.split("=", 1)[1]
        elif a in ("--platform", "-platform") and i + 1 < len(args):
            platform = args[i + 1]
    return platform or "default"


def runc_check(info: dict[str, Any]) -> Check:
    """The engine's runc against the releases that fixed each escape SECURITY.md names."""
    status, detail, fix = runc_verdict(runc_facts(info))
    return Check("runc", status, detail, fix)


# ---------------------------------------------------------------- state and orphans

def state_check() -> Check:
    try:
        from sandbox.paths import state_dir

        d = state_dir()
    except Exception as e:  # noqa: BLE001 - paths may fail on a broken environment
        return Check("state dir", "fail", f"cannot resolve: {e}", "set SANDBOX_STATE_DIR to a writable directory")
    if d.exists() and not os.access(d, os.W_OK | os.X_OK):
        return Check("state dir", "fail", f"{d} is not writable by uid {os.geteuid()}",
                     f"chown it to this user, or set SANDBOX_STATE_DIR (now {os.environ.get('SANDBOX_STATE_DIR') or 'unset'})")
    probe = d if d.exists() else next((p for p in d.parents if p.exists()), Path("/"))
    try:
        st = os.statvfs(probe)
        free = f", {st.f_bavail * st.f_frsize >> 20} MiB free"
    except OSError:
        free = ""
    return Check("state dir", "ok", f"{d}{'' if d.exists() else ' (created on first use)'}{free}"
                 + (" (from SANDBOX_STATE_DIR)" if os.environ.get("SANDBOX_STATE_DIR") else ""))


def orphan_check(client: Any) -> Check:
    import socket

    from sandbox import spec as specmod
    from sandbox.runtime import owner_alive

    try:
        found = client.containers.list(all=True, filters={"label": [f"{specmod.LABEL_MANAGED}=true",
                                                                     f"{specmod.LABEL_HOST}={socket.gethostname()}"]})
    except Exception as e:  # noqa: BLE001
        return Check("orphans", "warn", f"could not list sandboxes: {engine_error_words(e)}")
    orphans = []
    for c in found:
        lab = c.labels or {}
        if not owner_alive(lab.get(specmod.LABEL_OWNER, "")):
            orphans.append(f"{c.name} ({lab.get(specmod.LABEL_SESSION, '?')}, {c.status})")
    if not orphans:
        return Check("orphans", "ok", f"{len(found)} live sandbox(es) on this host, each with a living owner")
    return Check("orphans", "warn", f"{len(orphans)} sandbox(es) whose owning process is gone: "
                 + ", ".join(orphans[:5]) + (" ..." if len(orphans) > 5 else ""),
                 "`sandbox gc` removes them")


def package_check() -> Check:
    return Check("package", "ok", f"sandbox {package_version()}")


# ---------------------------------------------------------------- all rows

def self_test_check(profile: str = "default") -> Check:
    """The attack canaries (sandbox.audit.selftest) as one row."""
    from sandbox.audit.selftest import SelfTestFailed, require_canaries
    from sandbox.policy import load_policy
    from sandbox.runtime import Runtime

    try:
        policy = load_policy(profile)
        rows = require_canaries(Runtime(owner_kind="doctor"), policy)
    except SelfTestFailed as e:
        return Check("self-test", "fail", str(e)[:400], f"run `sandbox audit --profile {profile}` for the full report")
    except Exception as e:  # noqa: BLE001 - the policy did not load, or no engine
        return Check("self-test", "fail", f"{str(e)[:300] or type(e).__name__}", "fix the rows above first")
    return Check("self-test", "ok", f"{len(rows)} canaries held in a {profile} sandbox "
                 "(non-root, no caps, no_new_privs, seccomp, read-only root, no network)")


def neighbour_check(cgroup_version: str, driver: str) -> Check:
    """What this host can and cannot do to keep one session's bombs off its neighbours (issue 14)."""
    missing = []
    if cgroup_version != "2":
        missing += ["memory.high (cgroup v2: reclaim throttled inside a sandbox before its OOM, so a memory "
                    "bomb's reclaim does not stall neighbours)",
                    "io.max on buffered writes (cgroup v1's blkio throttles only direct I/O: a disk flood's "
                    "writeback is shared)",
                    "per-cgroup pressure (PSI)"]
    if driver != "cgroupfs":
        missing.append(f"the startup boost before runc's init (driver {driver}: the boost starts once the "
                       "container runs)")
    if not missing:
        return Check("neighbours", "ok", "cgroup v2 with the cgroupfs driver: CPU weight and quota, pids, "
                                         "memory.max with memory.high at 90% (written by the host at create), "
                                         "a startup boost for every new sandbox; io.max is not set (not built)")
    return Check("neighbours", "warn", "CPU weight, quota, pids and memory limits hold; missing here: "
                 + "; ".join(missing), "boot the host with cgroup v2 (systemd.unified_cgroup_hierarchy=1) "
                 "and Docker's cgroupfs driver")


def run_checks(profile: str = "default", canaries: bool = True) -> list[Check]:
    out: list[Check] = [package_check(), state_check()]
    try:
        import docker

        client = docker.from_env(timeout=10)
        info = client.info()
        ver = client.version()
    except Exception as e:  # noqa: BLE001 - any failure here means "no engine"
        return out + [Check("engine", "fail", f"Docker engine not reachable: {engine_error_words(e)}", ENGINE_FIX)]
    out.append(Check("engine", "ok", f"Docker {ver.get('Version')} (API {ver.get('ApiVersion')}), "
                                     f"kernel {info.get('KernelVersion')}"))
    out.append(runc_check(info))
    cg = info.get("CgroupVersion", "?")
    out.append(Check("cgroups", "ok", f"cgroup v{cg}, driver {info.get('CgroupDriver')}"))
    out.append(neighbour_check(str(cg), str(info.get("CgroupDriver"))))
    sec = " ".join(info.get("SecurityOptions") or [])
    out.append(Check("seccomp", "ok" if "seccomp" in sec else "fail", sec or "no security options reported",
                     "" if "seccomp" in sec else "use an engine built with seccomp support (Debian's docker.io is)"))
    if "userns" in sec or "rootless" in sec:
        out.append(Check("userns-remap", "ok", "enabled: container root maps to an unprivileged host uid"))
    else:
        out.append(Check("userns-remap", "warn", "not enabled (sandboxes still run as non-root uids)",
                         "consider dockerd --userns-remap=default or rootless Docker"))
    runtimes = sorted((info.get("Runtimes") or {}).keys())
    out.append(Check("runtimes", "ok", ", ".join(runtimes)))
    if "runsc" in runtimes:
        args = (info.get("Runtimes") or {}).get("runsc", {}).get("runtimeArgs") or []
        platform = runsc_platform(info)
        if "--oci-seccomp" in args:
            out.append(Check("gvisor", "ok", f"runsc registered with --oci-seccomp, platform {platform}: runtime: runsc profiles "
                                             "get a user-space kernel and their seccomp filter (processes "
                                             "entering by `docker exec` do not; sandbox never enters that way)"))
        else:
            out.append(Check("gvisor", "fail", "runsc is registered without --oci-seccomp: it silently ignores "
                                               "every sandbox's seccomp profile",
                             "add --oci-seccomp to its runtimeArgs in /etc/docker/daemon.json (./run setup does), "
                             "then `kill -HUP $(pidof dockerd)`"))
    else:
        out.append(Check("gvisor", "warn", "runsc not registered",
                         "apt-get install runsc, register it in /etc/docker/daemon.json with --oci-seccomp"))
    for name in ("debootstrap", "mkfs.ext4"):
        path = shutil.which(name)
        out.append(Check(name, "ok" if path else "warn", path or "missing",
                         "" if path else f"apt-get install {'e2fsprogs' if name == 'mkfs.ext4' else name}"))
    from sandbox import images as im

    try:
        recipes = im.recipes()
    except Exception as e:  # noqa: BLE001 - a broken install: say so, do not crash the doctor
        recipes = []
        out.append(Check("images", "fail", f"no image recipes: {e}", "reinstall the package"))
    for r in recipes:
        tag = r.image_tag()
        present = im.image_present(client, tag)
        out.append(Check(f"image {r.name}", "ok" if present else "fail", tag if present else f"{tag} missing",
                         "" if present else "sandbox images build"))
    if Path("/sys/fs/cgroup/pids").exists() or Path("/sys/fs/cgroup/cgroup.controllers").exists():
        out.append(Check("limit counters", "ok" if os.access("/sys/fs/cgroup", os.R_OK) else "warn",
                         "host can read the sandboxes' OOM and pids counters"))
    out.append(orphan_check(client))
    if canaries and all(c.status != "fail" or c.name == "runc" for c in out):
        # Attack canaries in a real sandbox: the host may look right and still not isolate.
        out.append(self_test_check(profile))
    return out


def report(checks: list[Check]) -> dict[str, Any]:
    """The doctor's result as one JSON document."""
    return {"ok": all(c.status != "fail" for c in checks), "version": package_version(),
            "checks": [c.to_dict() for c in checks]}
