"""Checkpoints of a session's workspace: taken when a run goes idle, restorable byte for byte.

A checkpoint is a full tree under `<store>/sessions/<session>/checkpoints/<id>/files`,
with a `manifest.json` (every entry's type, mode, size, sha256 or link target)
and a content digest over the manifest. It is cheap because files unchanged
since the previous checkpoint are hard links to that checkpoint's copy, and
only changed files are copied (the workspace is its own filesystem, so nothing
in a checkpoint is ever linked to a live workspace file).

Copy-on-write discipline: a file in a checkpoint is never modified in place,
only created (a copy) or linked (from an older checkpoint), so linking never
lets one checkpoint change another. "Unchanged" is decided by the workspace
file's inode, size, mtime and ctime: ctime cannot be set from inside the
sandbox (utimensat sets mtime, and changes ctime), so a tool cannot hide a
change from the next checkpoint by restoring an mtime.

Only regular files, directories and symlinks (their target text, never
followed) are kept; fifos, sockets and devices are skipped and counted. All
work happens while no sandbox runs over the workspace (the session's run lock
is held), so nothing can swap paths under the walk.

Bounded per session: at most `max_count` checkpoints and `max_bytes` of
distinct file data; the oldest are dropped first. A single checkpoint larger
than `max_bytes` is not kept (and said so).

A cluster session (``SessionStore(host_workspaces=False)``) has no workspace tree on the worker:
between its sandboxes the store keeps the archive the sandbox itself wrote (sandbox.worker.pool),
opaque bytes the worker never unpacks. Its checkpoints are those archives (``kind: archive``):
`<id>/workspace.tar`, a hard link to the archive as it was when the run went idle (an archive is
only ever replaced, never written in place, so the link keeps those bytes), with its sha256 as
the digest and no per-file manifest (reading one would mean parsing what a sandbox wrote).
Restoring one makes it the session's archive again (:meth:`Checkpoints.restore_archive`): the
session's next sandbox unpacks it, inside, under its policy. A sandbox can put anything into its
own archive; a checkpoint of it only ever goes back into a sandbox of the same session.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import secrets
import shutil
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DEFAULT_MAX_COUNT = 5
ARCHIVE_NAME = "workspace.tar"  # an archive checkpoint's one file
DEFAULT_MAX_BYTES = 1 << 30
_CHUNK = 1 << 20
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class CheckpointError(Exception):
    pass


@dataclass
class CheckpointInfo:
    id: str
    created_at: float
    digest: str  # sha256 over the manifest: ties a workspace state to the trail
    files: int
    bytes_total: int  # bytes of file data the checkpoint represents
    bytes_new: int  # bytes copied for it (the rest are hard links to the previous checkpoint)
    calls: int  # tool calls since the previous checkpoint
    skipped: int = 0  # fifos, sockets, devices
    ms: float = 0.0
    kind: str = "tree"  # "tree": files and a manifest (host workspaces); "archive": a cluster sandbox's archive

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Checkpoints:
    def __init__(self, session_dir: Path, *, max_count: int = DEFAULT_MAX_COUNT,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.dir = Path(session_dir) / "checkpoints"
        self.max_count = max(1, max_count)
        self.max_bytes = max_bytes

    # ------------------------------------------------------------------ listing

    def list(self) -> builtins.list[CheckpointInfo]:
        out: builtins.list[CheckpointInfo] = []
        if not self.dir.is_dir():
            return out
        for d in self.dir.iterdir():
            m = _load(d / "manifest.json")
            if m is not None:
                out.append(CheckpointInfo(**m["info"]))
        return sorted(out, key=lambda c: (c.created_at, c.id))

    def get(self, checkpoint_id: str) -> tuple[CheckpointInfo, dict[str, Any]]:
        if not checkpoint_id or "/" in checkpoint_id or checkpoint_id.startswith("."):
            raise CheckpointError(f"no checkpoint {checkpoint_id[:60]!r}")
        m = _load(self.dir / checkpoint_id / "manifest.json")
        if m is None:
            raise CheckpointError(f"no checkpoint {checkpoint_id[:60]!r} in {self.dir}")
        return CheckpointInfo(**m["info"]), m["entries"]

    def stored_bytes(self) -> int:
        """Distinct bytes of file data held by all checkpoints (hard links counted once)."""
        seen: set[int] = set()
        total = 0
        for root, _dirs, files in os.walk(self.dir):
            for name in files:
                st = os.lstat(os.path.join(root, name))
                if stat.S_ISREG(st.st_mode) and st.st_ino not in seen:
                    seen.add(st.st_ino)
                    total += st.st_size
        return total

    # ------------------------------------------------------------------ taking one

    def create(self, workspace: Path, *, calls: int = 0) -> CheckpointInfo | None:
        """Record the workspace (no sandbox may run over it). None if it alone exceeds `max_bytes`."""
        started = time.perf_counter()
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        prev = self.list()
        prev_entries: dict[str, Any] = {}
        prev_files: Path | None = None
        if prev:
            _, prev_entries = self.get(prev[-1].id)
            prev_files = self.dir / prev[-1].id / "files"
        cid = f"ckpt_{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}_{secrets.token_hex(3)}"
        tmp = self.dir / f".{cid}.tmp"
        files = tmp / "files"
        files.mkdir(parents=True, mode=0o700)
        entries: dict[str, Any] = {}
        bytes_total = bytes_new = skipped = 0
        root = Path(workspace)
        try:
            for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
                rel_dir = os.path.relpath(dirpath, root)
                for name in sorted(dirnames + filenames):
                    rel = os.path.normpath(os.path.join(rel_dir, name))
                    src = os.path.join(dirpath, name)
                    st = os.lstat(src)
                    dst = files / rel
                    if stat.S_ISDIR(st.st_mode):
                        dst.mkdir(mode=0o700)
                        entries[rel] = {"type": "d", "mode": stat.S_IMODE(st.st_mode)}
                    elif stat.S_ISLNK(st.st_mode):
                        target = os.readlink(src)
                        os.symlink(target, dst)
                        entries[rel] = {"type": "l", "target": target}
                    elif stat.S_ISREG(st.st_mode):
                        key = [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
                        old = prev_entries.get(rel)
                        if old and old.get("type") == "f" and old.get("src") == key and prev_files is not None:
                            os.link(prev_files / rel, dst)  # unchanged: share the older checkpoint's copy
                            sha = old["sha256"]
                        else:
                            sha = _copy(src, dst)
                            bytes_new += st.st_size
                        bytes_total += st.st_size
                        entries[rel] = {"type": "f", "mode": stat.S_IMODE(st.st_mode), "size": st.st_size,
                                        "sha256": sha, "src": key}
                    else:
                        skipped += 1
                # os.walk descends into dirnames: real directories only (symlinks are not followed).
            info = CheckpointInfo(id=cid, created_at=time.time(), digest=manifest_digest(entries),
                                  files=sum(1 for e in entries.values() if e["type"] == "f"), bytes_total=bytes_total,
                                  bytes_new=bytes_new, calls=calls, skipped=skipped)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if bytes_new > self.max_bytes:
            shutil.rmtree(tmp, ignore_errors=True)
            return None
        info.ms = round((time.perf_counter() - started) * 1000, 1)
        return self._publish(tmp, info, entries)

    def create_from_archive(self, archive: Path, *, calls: int = 0) -> CheckpointInfo | None:
        """A cluster session's checkpoint: its stored workspace archive as it is now, linked (the
        caller holds the run lock: no sandbox replaces it meanwhile). None if there is no archive
        or it alone exceeds `max_bytes`. The archive is read only to hash it, never unpacked."""
        started = time.perf_counter()
        try:
            st = os.lstat(archive)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{archive} is not a regular file")
        if st.st_size > self.max_bytes:
            return None
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        prev = [c for c in self.list() if c.kind == "archive"]
        prev_file = self.dir / prev[-1].id / ARCHIVE_NAME if prev else None
        cid = f"ckpt_{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}_{secrets.token_hex(3)}"
        tmp = self.dir / f".{cid}.tmp"
        tmp.mkdir(mode=0o700)
        try:
            dst = tmp / ARCHIVE_NAME
            sha = _link_or_copy(Path(archive), dst)
            same = prev_file is not None and prev_file.exists() and os.path.samestat(os.lstat(prev_file), os.lstat(dst))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        info = CheckpointInfo(id=cid, created_at=time.time(), digest="sha256:" + sha, files=0,
                              bytes_total=st.st_size, bytes_new=0 if same else st.st_size, calls=calls,
                              kind="archive")
        info.ms = round((time.perf_counter() - started) * 1000, 1)
        return self._publish(tmp, info, {})

    def _publish(self, tmp: Path, info: CheckpointInfo, entries: dict[str, Any]) -> CheckpointInfo:
        """The checkpoint staged in `tmp` appears whole (its manifest, then one rename) or not at all;
        then the oldest beyond the count and byte bounds go."""
        try:
            _dump(tmp / "manifest.json", {"info": info.to_dict(), "entries": entries})
            os.replace(tmp, self.dir / info.id)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune(keep=info.id)
        return info

    def restore_archive(self, checkpoint_id: str, archive: Path) -> CheckpointInfo:
        """Make the cluster session's stored archive exactly this checkpoint's (caller holds the run
        lock; the session's next sandbox unpacks it). Checked against its digest first."""
        info, _ = self.get(checkpoint_id)
        if info.kind != "archive":
            raise CheckpointError(f"checkpoint {checkpoint_id} is a workspace tree (a host workspace), "
                                  "not a cluster workspace archive")
        src = self.dir / checkpoint_id / ARCHIVE_NAME
        if "sha256:" + _sha256(src) != info.digest:
            raise CheckpointError(f"checkpoint {checkpoint_id}: {ARCHIVE_NAME} does not match its recorded digest")
        tmp = Path(archive).with_name(f".{Path(archive).name}.{secrets.token_hex(4)}.tmp")
        try:
            _link_or_copy(src, tmp)
            os.replace(tmp, archive)
        finally:
            tmp.unlink(missing_ok=True)
        return info

    def _prune(self, keep: str) -> builtins.list[str]:
        dropped: builtins.list[str] = []
        cps = self.list()
        while len(cps) > self.max_count or (len(cps) > 1 and self.stored_bytes() > self.max_bytes):
            oldest = cps.pop(0)
            if oldest.id == keep:
                break
            shutil.rmtree(self.dir / oldest.id, ignore_errors=True)
            dropped.append(oldest.id)
        return dropped

    # ------------------------------------------------------------------ restoring

    def restore(self, checkpoint_id: str, workspace: Path) -> CheckpointInfo:
        """Make the workspace exactly the checkpoint (no sandbox may run over it; caller holds the run lock)."""
        info, entries = self.get(checkpoint_id)
        if info.kind != "tree":
            raise CheckpointError(f"checkpoint {checkpoint_id} is a cluster workspace archive: it is restored "
                                  "into the session store (restore_into_store), never unpacked on this host")
        files = self.dir / checkpoint_id / "files"
        # Check the checkpoint before touching the workspace: content and manifest both.
        if manifest_digest(entries) != info.digest:
            raise CheckpointError(f"checkpoint {checkpoint_id}: manifest does not match its digest")
        for rel, e in entries.items():
            if e["type"] == "f" and _sha256(files / rel) != e["sha256"]:
                raise CheckpointError(f"checkpoint {checkpoint_id}: {rel} does not match its recorded content")
        root = Path(workspace)
        for child in list(root.iterdir()):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        order = sorted(entries, key=lambda r: (r.count("/"), r))
        for rel in order:
            e = entries[rel]
            if e["type"] == "d":
                (root / rel).mkdir(mode=0o700)
            elif e["type"] == "f":
                _copy(str(files / rel), root / rel)
        # Symlinks last: no path used above goes through one. Modes last: read-only dirs were writable above.
        for rel in order:
            e = entries[rel]
            if e["type"] == "l":
                os.symlink(e["target"], root / rel)
        for rel in reversed(order):
            e = entries[rel]
            if e["type"] in ("d", "f"):
                os.chmod(root / rel, e["mode"])
        return info

    def remove_all(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def restore_into_store(store: Any, session_id: str, workspace: str, checkpoint_id: str) -> CheckpointInfo:
    """Restore a session's checkpoint where its workspace lives (caller holds the session's run lock):
    a tree into the mounted workspace, an archive (a cluster session) as the store's archive."""
    cps = Checkpoints(store.session_dir(session_id))
    info, _ = cps.get(checkpoint_id)
    if info.kind == "archive":
        return cps.restore_archive(checkpoint_id, store.workspace_archive(workspace))
    return cps.restore(checkpoint_id, store.ensure_mounted(workspace))


# ---------------------------------------------------------------------- helpers

def _link_or_copy(src: Path, dst: Path) -> str:
    """`dst` as a hard link to `src` (a copy across filesystems); returns the sha256 of its bytes."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        return _copy(str(src), dst)
    return _sha256(dst)


def manifest_digest(entries: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for rel in sorted(entries):
        e = entries[rel]
        if e["type"] == "f":
            line = f"f {e['mode']:o} {e['sha256']} {rel}"
        elif e["type"] == "d":
            line = f"d {e['mode']:o} {rel}"
        else:
            line = f"l {json.dumps(e['target'])} {rel}"
        h.update(json.dumps(line).encode() + b"\n")
    return "sha256:" + h.hexdigest()


def workspace_digest(workspace: Path) -> str:
    """The digest a checkpoint of this workspace would have (tests, and `sandbox session checkpoints --verify`)."""
    entries: dict[str, Any] = {}
    root = Path(workspace)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            if stat.S_ISDIR(st.st_mode):
                entries[rel] = {"type": "d", "mode": stat.S_IMODE(st.st_mode)}
            elif stat.S_ISLNK(st.st_mode):
                entries[rel] = {"type": "l", "target": os.readlink(p)}
            elif stat.S_ISREG(st.st_mode):
                entries[rel] = {"type": "f", "mode": stat.S_IMODE(st.st_mode), "sha256": _sha256(Path(p))}
    return manifest_digest(entries)


def _copy(src: str, dst: Path) -> str:
    """Copy a regular file's bytes without following a symlink at `src`; return its sha256."""
    h = hashlib.sha256()
    # O_NONBLOCK: a path swapped for a fifo after the walk's lstat must not hang the worker.
    fd = os.open(src, os.O_RDONLY | _NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(f"{src} is not a regular file")
        out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            while chunk := os.read(fd, _CHUNK):
                h.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view):]
        finally:
            os.close(out)
    finally:
        os.close(fd)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | os.O_CLOEXEC)
    try:
        while chunk := os.read(fd, _CHUNK):
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def _load(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "info" in data and "entries" in data else None


def _dump(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, separators=(",", ":")))
