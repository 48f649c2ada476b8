"""Host checks: can this machine run hardened sandboxes, and what to fix if not."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""


def run_checks(profile: str = "default", canaries: bool = True) -> list[Check]:
    out: list[Check] = []
    try:
        import docker

        client = docker.from_env(timeout=10)
        info = client.info()
        ver = client.version()
    except Exception as e:  # noqa: BLE001 - any failure here means "no engine"
        return [Check("engine", "fail", f"Docker engine not reachable: {type(e).__name__}",
                      "apt-get install -y docker.io && dockerd & (or run .ci/setup)")]
    out.append(Check("engine", "ok", f"Docker {ver.get('Version')} (API {ver.get('ApiVersion')})"))
    cg = info.get("CgroupVersion", "?")
    out.append(Check("cgroups", "ok", f"cgroup v{cg}, driver {info.get('CgroupDriver')}"))
    sec = " ".join(info.get("SecurityOptions") or [])
    out.append(Check("seccomp", "ok" if "seccomp" in sec else "fail", sec or "no security options reported",
                     "" if "seccomp" in sec else "use an engine built with seccomp support"))
    if "userns" in sec:
        out.append(Check("userns-remap", "ok", "enabled: container root maps to an unprivileged host uid"))
    else:
        out.append(Check("userns-remap", "warn", "not enabled (sandboxes still run as a non-root uid)",
                         "consider dockerd --userns-remap=default or rootless Docker"))
    runtimes = sorted((info.get("Runtimes") or {}).keys())
    out.append(Check("runtimes", "ok", ", ".join(runtimes)))
    if "runsc" in runtimes:
        args = (info.get("Runtimes") or {}).get("runsc", {}).get("runtimeArgs") or []
        if "--oci-seccomp" in args:
            out.append(Check("gvisor", "ok", "runsc registered with --oci-seccomp: runtime: runsc profiles "
                                             "get a user-space kernel and their seccomp filter"))
        else:
            out.append(Check("gvisor", "fail", "runsc is registered without --oci-seccomp: it silently ignores "
                                               "every sandbox's seccomp profile",
                             "add --oci-seccomp to its runtimeArgs in /etc/docker/daemon.json (./run setup does), "
                             "then kill -HUP dockerd"))
    else:
        out.append(Check("gvisor", "warn", "runsc not registered",
                         "apt-get install runsc and register it in /etc/docker/daemon.json"))
    for name in ("debootstrap", "mkfs.ext4"):
        out.append(Check(name, "ok" if shutil.which(name) else "warn",
                         shutil.which(name) or "missing", "" if shutil.which(name) else f"apt-get install {name}"))
    from sandbox import images as im

    for r in im.recipes():
        tag = r.image_tag()
        present = im.image_present(client, tag)
        out.append(Check(f"image {r.name}", "ok" if present else "fail", tag if present else f"{tag} missing",
                         "" if present else "sandbox images build"))
    if Path("/sys/fs/cgroup/pids").exists() or Path("/sys/fs/cgroup/cgroup.controllers").exists():
        out.append(Check("limit counters", "ok" if os.access("/sys/fs/cgroup", os.R_OK) else "warn",
                         "host can read the sandboxes' OOM and pids counters"))
    if canaries and all(c.status != "fail" for c in out):
        # Attack canaries in a real sandbox: the host may look right and still not isolate.
        from sandbox.audit.selftest import doctor_check

        out.append(doctor_check(profile))
    return out
