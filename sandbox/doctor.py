"""Host checks: can this machine run hardened sandboxes, and what to fix if not.

Every row says what was found in words and, when it is not ok, a fix that exists on a
Debian-like host. The runc row compares the engine's runc with the releases that fixed
the escapes SECURITY.md names, and reads the distribution's changelog for backports
(Debian keeps its version number and patches the CVE: 1.1.5+ds1-1+deb12u1 carries the
CVE-2024-21626 fix while upstream 1.1.5 does not).
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


ENGINE_FIX = ("start the engine (`systemctl start docker`, or `dockerd >/var/log/dockerd.log 2>&1 &` where there is "
              "no systemd); install it with `apt-get install docker.io` (or `./run setup` in a source checkout)")


def engine_error_words(e: BaseException) -> str:
    """Why the Docker engine could not be reached, in words (not an exception class name)."""
    chain: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and len(chain) < 8:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    text = " ".join(str(x) for x in chain)
    host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if any(isinstance(x, PermissionError) for x in chain) or "Permission denied" in text:
        return (f"permission denied on the engine socket {host}: run as root, or as a member of the "
                "`docker` group (which is root-equivalent)")
    if any(isinstance(x, FileNotFoundError) for x in chain) or "No such file or directory" in text:
        return f"no engine socket at {host}: the Docker engine is not running (or DOCKER_HOST points elsewhere)"
    if any(isinstance(x, ConnectionRefusedError) for x in chain) or "Connection refused" in text:
        return f"the engine socket {host} refuses connections: dockerd is not running"
    if "timed out" in text.lower() or any(isinstance(x, TimeoutError) for x in chain):
        return f"the engine at {host} did not answer in time (overloaded or hung dockerd)"
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"{first[:200]} (engine at {host})"


# ---------------------------------------------------------------- runc and its escapes

# (CVE, {release line: first fixed version}, what it is). A line not listed and older than
# every listed one is unfixed; a newer line than every listed one is fixed.
RUNC_FIXES: tuple[tuple[str, dict[tuple[int, int], tuple[int, ...]], str], ...] = (
    ("CVE-2024-21626", {(1, 1): (1, 1, 12)}, "leaked host fd: container escape via WORKDIR/exec (Leaky Vessels)"),
    ("CVE-2025-31133", {(1, 2): (1, 2, 8), (1, 3): (1, 3, 3), (1, 4): (1, 4, 0, -1, 3)},
     "maskedPaths /dev/null swapped for a symlink: host procfs writes"),
    ("CVE-2025-52565", {(1, 2): (1, 2, 8), (1, 3): (1, 3, 3), (1, 4): (1, 4, 0, -1, 3)},
     "/dev/console bind-mount race: host procfs writes"),
    ("CVE-2025-52881", {(1, 2): (1, 2, 8), (1, 3): (1, 3, 3), (1, 4): (1, 4, 0, -1, 3)},
     "LSM bypass and procfs write redirection via shared mounts"),
)
_VER = re.compile(r"v?(\d+)\.(\d+)\.(\d+)(?:-rc\.?(\d+))?")


def parse_runc_version(text: str) -> tuple[int, ...] | None:
    """'1.1.5+ds1-1+deb12u1' -> (1, 1, 5, 0, 0); 'v1.4.0-rc.3' -> (1, 4, 0, -1, 3) (an rc sorts before its release)."""
    m = _VER.search(text or "")
    if not m:
        return None
    base = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
    return base + ((-1, int(m.group(4))) if m.group(4) else (0, 0))


def _norm(v: tuple[int, ...]) -> tuple[int, ...]:
    return v + (0, 0) if len(v) == 3 else v


def upstream_fixed(cve: str, version: tuple[int, ...]) -> bool:
    lines = next(f for c, f, _ in RUNC_FIXES if c == cve)
    line = version[:2]
    if line in lines:
        return _norm(version) >= _norm(lines[line])
    return line > max(lines)  # a later release line carries it; an earlier one does not


@dataclass
class RuncFacts:
    version: str | None          # as the engine reports it
    path: str | None
    package: str | None          # "runc 1.1.5+ds1-1+deb12u1" when dpkg owns the binary
    changelog: str | None        # path of the distribution changelog read
    backported: tuple[str, ...]  # CVEs the changelog names


def _dpkg_owner(path: str) -> tuple[str, str] | None:
    if not shutil.which("dpkg-query"):
        return None
    real = os.path.realpath(path)
    for p in dict.fromkeys([path, real, real.replace("/usr/", "/", 1)]):
        try:
            out = subprocess.run(["dpkg-query", "-S", p], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        if out.returncode == 0 and ":" in out.stdout:
            pkg = out.stdout.split(":", 1)[0].strip()
            ver = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", pkg], capture_output=True, text=True,
                                 timeout=10).stdout.strip()
            return pkg, ver
    return None


def _changelog_cves(pkg: str) -> tuple[str | None, tuple[str, ...]]:
    for name in ("changelog.Debian.gz", "changelog.gz"):
        p = Path("/usr/share/doc") / pkg / name
        if p.is_file():
            try:
                with gzip.open(p, "rt", errors="replace") as f:
                    text = f.read(4 << 20)
            except OSError:
                continue
            cves = tuple(c for c, _, _ in RUNC_FIXES if c in text)
            return str(p), cves
    return None, ()


def runc_facts(info: dict[str, Any]) -> RuncFacts:
    version = (info.get("RuncCommit") or {}).get("ID") or None
    rt = (info.get("Runtimes") or {}).get("runc") or {}
    path = shutil.which(str(rt.get("path") or "runc")) or None
    if not version and path:
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
            version = out.splitlines()[0].removeprefix("runc version ").strip() if out else None
        except (OSError, subprocess.SubprocessError):
            pass
    package = changelog = None
    backported: tuple[str, ...] = ()
    owner = _dpkg_owner(path) if path else None
    if owner:
        pkg, pver = owner
        package = f"{pkg} {pver}"
        # The changelog describes the installed package; it speaks for the engine's runc only
        # when that is this package's binary (same version string).
        if version and (pver == version or pver.split(":")[-1] == version):
            changelog, backported = _changelog_cves(pkg)
    return RuncFacts(version, path, package, changelog, backported)


def runc_check(info: dict[str, Any]) -> Check:
    f = runc_facts(info)
    if not f.version:
        return Check("runc", "warn", "the engine does not report its runc version and no runc binary was found",
                     "check `docker info` (Runc Version); keep runc >= 1.2.8 / 1.3.3 / 1.4.0-rc.3")
    parsed = parse_runc_version(f.version)
    if parsed is None:
        return Check("runc", "warn", f"runc {f.version}: version not understood; cannot tell which fixes it carries",
                     "keep runc >= 1.2.8 / 1.3.3 / 1.4.0-rc.3 (fixes CVE-2024-21626 and the 2025 escapes)")
    fixed, missing = [], []
    for cve, _, what in RUNC_FIXES:
        if upstream_fixed(cve, parsed):
            fixed.append(cve)
        elif cve in f.backported:
            fixed.append(f"{cve} (backported)")
        else:
            missing.append(f"{cve} ({what})")
    where = f"runc {f.version}" + (f" from package {f.package}" if f.package else "") + \
        (f"; backports read from {f.changelog}" if f.changelog else "")
    if not missing:
        return Check("runc", "ok", f"{where}: carries the fixes for {', '.join(fixed)}")
    detail = f"{where}: MISSING fixes for {'; '.join(missing)}" + (f"; has {', '.join(fixed)}" if fixed else "")
    # CVE-2024-21626 is reachable through `runc exec` into a running container; the 2025 ones need an
    # attacker-controlled image or mount configuration when the container is created, which sandbox
    # never gives a workload (its own image, read-only root, fixed mounts). Both are named; only the
    # first fails the doctor.
    status = "fail" if any(m.startswith("CVE-2024-21626") for m in missing) else "warn"
    if status == "warn":
        detail += ("; the missing ones need an attacker-controlled image or mounts at container creation, "
                   "which sandbox does not give a workload: upgrade anyway")
    return Check("runc", status, detail,
                 "upgrade runc to >= 1.2.8, 1.3.3 or 1.4.0-rc.3 (your distribution's security update, or "
                 "containerd.io from Docker's repository); until then prefer `runtime: runsc` profiles")


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
    from sandbox.audit.runner import package_version

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
        if "--oci-seccomp" in args:
            out.append(Check("gvisor", "ok", "runsc registered with --oci-seccomp: runtime: runsc profiles "
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
    from sandbox.audit.runner import package_version

    return {"ok": all(c.status != "fail" for c in checks), "version": package_version(),
            "checks": [c.to_dict() for c in checks]}
