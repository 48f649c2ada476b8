"""Build the sandbox images offline.

No registry is reachable, so an image is a debootstrap root filesystem plus the
in-sandbox agent, imported with ``docker import``. The cached rootfs is keyed
by the packages it holds and the image tag by the whole recipe and the agent's
source, so running the build again does nothing when nothing changed.
Hardening happens while the tar is written: stripped paths are left out and
every setuid/setgid bit is cleared, without touching the cached rootfs.

The agent's modules ship with their bytecode, compiled by the image's own python3
(run chrooted in the cached rootfs; nothing is written there) as checked-hash .pyc
files: the root filesystem is read-only, so without them every sandbox would compile
the agent from source at start (measured: ~6 ms of every create). A .pyc that does not
match its source is ignored by python, so the source stays what runs.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from sandbox import paths

IMAGES_DIR = paths.SHIPPED_RECIPES_DIR  # shipped as package data
AGENT_DIR = paths.PACKAGE_DIR / "agent"  # shipped as package data
AGENT_TARGET = "/opt/sandbox-agent"
BUILD_FORMAT = "agent-pyc-1"  # how the tar is made (part of the image tag: a change rebuilds)


def rootfs_cache() -> Path:
    """Where debootstrapped root filesystems are kept (:func:`sandbox.paths.rootfs_cache_dir`:
    ``$SANDBOX_ROOTFS_CACHE``, else /var/cache/sandbox/rootfs for root), read at build time."""
    return paths.rootfs_cache_dir()

Step = Callable[[str], None]


@dataclass(frozen=True)
class Recipe:
    name: str
    suite: str
    variant: str
    packages: tuple[str, ...]
    user: dict[str, object]
    strip: tuple[str, ...]
    env: dict[str, str]
    source_text: str

    @property
    def rootfs_key(self) -> str:
        blob = json.dumps([self.suite, self.variant, sorted(self.packages)])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def image_tag(self) -> str:
        h = hashlib.sha256(self.source_text.encode())
        h.update(BUILD_FORMAT.encode())
        for f in sorted(AGENT_DIR.glob("*.py")):
            h.update(f.name.encode())
            h.update(f.read_bytes())
        return f"{self.name}:{h.hexdigest()[:12]}"


def load_recipe(path: Path) -> Recipe:
    text = path.read_text()
    d = yaml.safe_load(text)
    return Recipe(name=d["name"], suite=d["suite"], variant=d.get("variant", "minbase"),
                  packages=tuple(d.get("packages", [])), user=dict(d["user"]), strip=tuple(d.get("strip", [])),
                  env=dict(d.get("env", {})), source_text=text)


def recipes() -> list[Recipe]:
    found = sorted(IMAGES_DIR.glob("*/image.yaml"))
    if not found:
        raise RuntimeError(f"no image recipes in {IMAGES_DIR} (a broken install: recipes ship as package data)")
    return [load_recipe(p) for p in found]


def ensure_rootfs(r: Recipe, step: Step) -> Path:
    cache = rootfs_cache()
    dest = cache / r.rootfs_key
    if (dest / ".complete").exists():
        step(f"rootfs {r.rootfs_key} cached")
        return dest
    if shutil.which("debootstrap") is None:
        raise RuntimeError("debootstrap is not installed (apt-get install -y debootstrap)")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{r.rootfs_key}.", dir=cache))
    step(f"debootstrap {r.suite} ({len(r.packages)} extra packages; takes a few minutes)")
    cmd = ["debootstrap", f"--variant={r.variant}", f"--include={','.join(r.packages)}", r.suite, str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"debootstrap failed ({proc.returncode}): {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    (tmp / ".complete").touch()
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def _user_files(rootfs: Path, r: Recipe) -> dict[str, bytes]:
    u = r.user
    passwd = (rootfs / "etc/passwd").read_text()
    group = (rootfs / "etc/group").read_text()
    passwd += f"{u['name']}:x:{u['uid']}:{u['gid']}:sandbox:{u['home']}:/bin/bash\n"
    group += f"{u['name']}:x:{u['gid']}:\n"
    return {"etc/passwd": passwd.encode(), "etc/group": group.encode()}


# Run by the image's python3: compile each agent module as the agent will import it
# (-I -S, no optimisation), as a checked-hash .pyc (valid whatever the file times in the tar).
_COMPILE_AGENT = """
import base64, importlib.util, json, sys
from importlib import _bootstrap_external as be
out = {}
for name, src in json.load(sys.stdin).items():
    data = base64.b64decode(src)
    code = compile(data, "%s/" + name, "exec", dont_inherit=True)
    out[name] = [sys.implementation.cache_tag,
                 base64.b64encode(be._code_to_hash_pyc(code, importlib.util.source_hash(data), True)).decode()]
json.dump(out, sys.stdout)
""" % AGENT_TARGET


def agent_bytecode(rootfs: Path, step: Step | None = None) -> dict[str, bytes]:
    """``__pycache__/<module>.<tag>.pyc`` -> bytes for every agent module, compiled by the
    rootfs's own python3 (chrooted; needs root). Empty when that is not possible: the agent
    then runs from source, as before."""
    sources = {f.name: base64.b64encode(f.read_bytes()).decode() for f in sorted(AGENT_DIR.glob("*.py"))}
    try:
        proc = subprocess.run(["chroot", str(rootfs), "/usr/bin/python3", "-I", "-S", "-c", _COMPILE_AGENT],
                              input=json.dumps(sources), capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip()[-300:])
        done = json.loads(proc.stdout)
    except (OSError, RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
        if step:
            step(f"agent bytecode not compiled ({type(e).__name__}: {e}); the agent will compile at start")
        return {}
    out: dict[str, bytes] = {}
    for name, (tag, pyc) in done.items():
        if not str(tag).replace("-", "").isalnum():
            continue
        out[f"__pycache__/{name[:-3]}.{tag}.pyc"] = base64.b64decode(pyc)
    return out


def write_image_tar(rootfs: Path, r: Recipe, out: io.BufferedIOBase, step: Step | None = None) -> int:
    """Write the hardened image tar; returns how many setuid/setgid bits were cleared."""
    stripped = tuple(p.strip("/") for p in r.strip) + ("dev", "proc", "sys", "run", "tmp", ".complete")
    overrides = _user_files(rootfs, r)
    cleared = 0

    def filt(ti: tarfile.TarInfo) -> tarfile.TarInfo | None:
        nonlocal cleared
        name = ti.name.removeprefix("./")
        for s in stripped:
            if name == s and ti.isdir() and s in ("dev", "proc", "sys", "run", "tmp"):
                return ti  # keep the empty mount point
            if name.startswith(s + "/") or name == s:
                return None
        if name in overrides or ti.ischr() or ti.isblk():
            return None
        if ti.mode & 0o6000:
            ti.mode &= ~0o6000
            cleared += 1
        return ti

    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        tar.add(str(rootfs), arcname=".", filter=filt)
        for name, data in overrides.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode = len(data), 0o644
            tar.addfile(ti, io.BytesIO(data))
        pycs = agent_bytecode(rootfs, step)
        dirs = [AGENT_TARGET.strip("/"), "workspace"] + ([f"{AGENT_TARGET.strip('/')}/__pycache__"] if pycs else [])
        for d in dirs:
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(ti)
        files = {f.name: f.read_bytes() for f in sorted(AGENT_DIR.glob("*.py"))}
        files.update(pycs)
        for name, data in files.items():
            ti = tarfile.TarInfo(f"{AGENT_TARGET.strip('/')}/{name}")
            ti.size, ti.mode = len(data), 0o644
            tar.addfile(ti, io.BytesIO(data))
    return cleared


def image_present(client: "docker.DockerClient", tag: str) -> bool:  # type: ignore[name-defined] # noqa: F821
    import docker.errors

    try:
        client.images.get(tag)
        return True
    except docker.errors.ImageNotFound:
        return False


def build(client: "docker.DockerClient", r: Recipe, step: Step, force: bool = False) -> str:  # type: ignore[name-defined] # noqa: F821
    """Build (or find) the image for a recipe; returns the content-hash tag, also tagged :latest."""
    tag = r.image_tag()
    repo = r.name
    if not force and image_present(client, tag):
        step(f"{tag} up to date")
        client.images.get(tag).tag(repo, "latest")
        return tag
    rootfs = ensure_rootfs(r, step)
    step("writing hardened image tar")
    with tempfile.NamedTemporaryFile(prefix="sandbox-image.", suffix=".tar", dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        cleared = write_image_tar(rootfs, r, tmp, step)  # type: ignore[arg-type]
        tmp.flush()
        step(f"cleared {cleared} setuid/setgid bits; importing into Docker")
        changes = [f"USER {r.user['uid']}:{r.user['gid']}", "WORKDIR /workspace"]
        changes += [f"ENV {k}={v}" for k, v in r.env.items()]
        changes += [f"LABEL org.sandbox.recipe={tag}"]
        client.api.import_image_from_file(tmp.name, repository=repo, tag=tag.split(":", 1)[1], changes=changes)
    client.images.get(tag).tag(repo, "latest")
    step(f"built {tag}")
    return tag
