"""Facts about this host that both the audit report and `sandbox doctor` state: the package and
runtime versions, whether the engine's runc carries the fixes for known escapes (distribution
backports read from the package changelog), and why an engine could not be reached, in words.

No import of the CLI, the doctor or the runner: both sides import this.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def package_version() -> str:
    try:
        from sandbox import __version__

        return str(__version__)
    except ImportError:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("sandbox")
        except PackageNotFoundError:
            return "unknown (not installed)"


def runtime_version(info: dict[str, Any], runtime: str | None) -> str:
    """runc's version as the engine reports it; runsc's from its own binary (the engine does not say)."""
    if runtime in (None, "runc", "io.containerd.runc.v2"):
        rid = (info.get("RuncCommit") or {}).get("ID")
        return f"runc {rid}" if rid else "runc (version not reported by the engine)"
    path = ((info.get("Runtimes") or {}).get(runtime) or {}).get("path") or runtime
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"{runtime} (version unknown: {type(e).__name__})"
    first = out.strip().splitlines()[:1]
    return first[0][:120] if first else f"{runtime} (version unknown)"


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


def runc_verdict(f: RuncFacts) -> tuple[str, str, str]:
    """(ok | warn | fail, detail, fix) for the engine's runc."""
    if not f.version:
        return ("warn", "the engine does not report its runc version and no runc binary was found",
                "check `docker info` (Runc Version); keep runc >= 1.2.8 / 1.3.3 / 1.4.0-rc.3")
    parsed = parse_runc_version(f.version)
    if parsed is None:
        return ("warn", f"runc {f.version}: version not understood; cannot tell which fixes it carries",
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
        return ("ok", f"{where}: carries the fixes for {', '.join(fixed)}", "")
    detail = f"{where}: MISSING fixes for {'; '.join(missing)}" + (f"; has {', '.join(fixed)}" if fixed else "")
    # CVE-2024-21626 is reachable through `runc exec` into a running container; the 2025 ones need an
    # attacker-controlled image or mount configuration when the container is created, which sandbox
    # never gives a workload (its own image, read-only root, fixed mounts). Both are named; only the
    # first fails the doctor.
    status = "fail" if any(m.startswith("CVE-2024-21626") for m in missing) else "warn"
    if status == "warn":
        detail += ("; the missing ones need an attacker-controlled image or mounts at container creation, "
                   "which sandbox does not give a workload: upgrade anyway")
    return (status, detail,
            "upgrade runc to >= 1.2.8, 1.3.3 or 1.4.0-rc.3 (your distribution's security update, or "
            "containerd.io from Docker's repository); until then prefer `runtime: runsc` profiles")


