"""The host-side session store: each session's workspace for its whole life, shared by workers.

A sandbox dies with the process that made it, so nothing a session needs
between runs may live in a container. It lives here, on the host, outside
anything a sandbox can write (the store is 0700 root; a sandbox sees only its
own workspace, bind-mounted):

    <store>/
      owners/<owner>.lock          held (flock) by each live worker: "is that worker alive?"
      journal.kind                 which form the journal takes: "sqlite" or "files" (see journal.py)
      journal.db                   calls started / finished, shared by every worker (outbox.py), or
      journal/                     the same as plain files, for a store on a network filesystem (journal_files.py)
      audit/<session>.jsonl        the session's audit trail, all runs (kept after the session is removed)
      workspaces/<ws>.img          a sparse ext4 image per workspace, size-capped: ENOSPC inside, host untouched
      workspaces/<ws>/             its loop mount (nosuid, nodev), bind-mounted as the sandbox's workspace
      sessions/<session>/meta.json which workspace, created, last activity, last worker, state
      sessions/<session>/run.lock  held (flock) by the worker serving a run: one run per session at a time;
                                   `restore` refuses while it is held
      sessions/<session>/checkpoints/  see checkpoints.py
      sessions/<session>/run/skills/   this run's skills (a capped tmpfs), read-only at /mnt/skills in the sandbox

Workspaces are named apart from sessions so a warm sandbox can be started over
a fresh workspace before anyone knows which session it will serve; the first
session it serves adopts that workspace.

A session's store entry is removed when the session ends (terminated, archived
or deleted, as the API reports) or when nothing happened in it for the
retention period (default 24 h). Workers sharing the store may be several
processes on one host, or hosts (pods) sharing the path on a network filesystem
(flock works across NFSv4 through the kernel's lock emulation). SQLite's own
locking protects the journal on a local filesystem; on a network filesystem the
journal is plain files whose every race is one atomic link(2) (journal.py).

On a cluster (``host_workspaces=False``, the Kubernetes backend) a sandbox cannot mount a host
path: the workspace is the pod's own size-limited volume for the sandbox's life, and between
the sandboxes of one session the store keeps it as an archive the sandbox itself wrote
(``workspaces/<ws>.tar``, see ``sandbox.worker.pool``; taken again during a run, every
``--archive-interval`` seconds after a call): opaque bytes, capped in size, never unpacked or
parsed on the worker's side, fed back into the session's next sandbox. Nothing is mounted then
(no root, no loop device in the worker's pod); its checkpoints are archive checkpoints (links
to the archive as it was when a run went idle, checkpoints.py), and a run's skills are a plain
directory here that is copied into the sandbox. Docker workers whose store is shared by several
hosts (the file journal) work the same way: no kernel mounts a workspace image from a store
that another kernel may mount too.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("sandbox.worker.store")

DEFAULT_RETENTION_S = 24 * 3600.0
_SAFE = re.compile(r"[^A-Za-z0-9_-]")


class StoreError(Exception):
    """The session store cannot do what was asked (named path and reason)."""


class RunActive(StoreError):
    """A run of this session holds its run lock (another worker, or this one)."""


def safe_id(value: str) -> str:
    """A session or owner id as one path component that can never name another directory."""
    s = _SAFE.sub("_", value)[:96]
    if not s or s.strip("_") == "":
        raise StoreError(f"unusable id {value[:40]!r}")
    return s


@dataclass
class SessionMeta:
    session_id: str
    workspace: str
    size_mb: int
    created_at: float
    last_activity: float
    state: str = "idle"  # idle | running | parked (its sandbox kept); trust it only while the run lock is held
    worker: str | None = None
    runs: int = 0
    calls_since_checkpoint: int = 0


def _flock(path: Path, *, blocking: bool) -> IO[bytes] | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    f = os.fdopen(fd, "r+b")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        f.close()
        return None
    return f


def _unlock(f: IO[bytes] | None) -> None:
    if f is None:
        return
    try:
        fcntl.flock(f, fcntl.LOCK_UN)
    finally:
        f.close()


class RunLock:
    """Held while a worker serves a run of one session (or while a checkpoint is restored)."""

    def __init__(self, f: IO[bytes], session_id: str) -> None:
        self._f: IO[bytes] | None = f
        self.session_id = session_id

    def release(self) -> None:
        f, self._f = self._f, None
        _unlock(f)

    @property
    def held(self) -> bool:
        return self._f is not None


class SessionStore:
    def __init__(self, root: Path, *, retention_s: float = DEFAULT_RETENTION_S, host_workspaces: bool = True) -> None:
        self.root = Path(root)
        self.retention_s = retention_s
        # False: sandboxes run elsewhere (a cluster) and keep their workspace in a volume of their own;
        # the store keeps archives, not mounted filesystems (module docstring).
        self.host_workspaces = host_workspaces
        for d in (self.root, self.root / "owners", self.root / "audit", self.root / "workspaces",
                  self.root / "sessions"):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        self._owner_lock: IO[bytes] | None = None
        self.owner: str | None = None

    # ------------------------------------------------------------------ owners (worker liveness)

    def register_owner(self, owner: str) -> None:
        """Hold `owners/<owner>.lock` for this process's life: the journal asks it who is alive."""
        f = _flock(self.root / "owners" / f"{safe_id(owner)}.lock", blocking=False)
        if f is None:
            raise StoreError(f"owner {owner!r} is already registered in {self.root}")
        self._owner_lock, self.owner = f, owner

    def owner_alive(self, owner: str) -> bool:
        if owner == self.owner:
            return True
        path = self.root / "owners" / f"{safe_id(owner)}.lock"
        if not path.exists():
            return False
        f = _flock(path, blocking=False)
        if f is None:
            return True
        try:
            path.unlink(missing_ok=True)  # a dead owner's file: tidy
        finally:
            _unlock(f)
        return False

    def close(self) -> None:
        if self._owner_lock is not None and self.owner is not None:
            (self.root / "owners" / f"{safe_id(self.owner)}.lock").unlink(missing_ok=True)
        _unlock(self._owner_lock)
        self._owner_lock = None

    # ------------------------------------------------------------------ paths

    def session_dir(self, session_id: str) -> Path:
        return self.root / "sessions" / safe_id(session_id)

    def trail_path(self, session_id: str) -> Path:
        return self.root / "audit" / f"{safe_id(session_id)}.jsonl"

    def workspace_dir(self, ws: str) -> Path:
        return self.root / "workspaces" / safe_id(ws)

    def journal_path(self) -> Path:
        """The SQLite journal (a store on a local filesystem; see journal.py)."""
        return self.root / "journal.db"

    def journal_dir(self) -> Path:
        """The journal as plain files (a store on a network filesystem; see journal_files.py)."""
        return self.root / "journal"

    def journal_kind_path(self) -> Path:
        """Which of the two this store uses, decided by its first worker (journal.py)."""
        return self.root / "journal.kind"

    # ------------------------------------------------------------------ metadata

    def meta(self, session_id: str) -> SessionMeta | None:
        try:
            data = json.loads((self.session_dir(session_id) / "meta.json").read_text())
            return SessionMeta(**data)
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as e:
            raise StoreError(f"{self.session_dir(session_id) / 'meta.json'}: unreadable ({e})") from None

    def _write_meta(self, meta: SessionMeta) -> None:
        d = self.session_dir(meta.session_id)
        tmp = d / f".meta.{secrets.token_hex(4)}.tmp"
        tmp.write_text(json.dumps(asdict(meta), indent=1))
        os.replace(tmp, d / "meta.json")

    def update(self, session_id: str, **changes: Any) -> SessionMeta | None:
        with self._meta_lock(session_id):
            meta = self.meta(session_id)
            if meta is None:
                return None
            for k, v in changes.items():
                setattr(meta, k, v)
            self._write_meta(meta)
            return meta

    @contextmanager
    def _meta_lock(self, session_id: str) -> Iterator[None]:
        d = self.session_dir(session_id)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        f = _flock(d / "meta.lock", blocking=True)
        try:
            yield
        finally:
            _unlock(f)

    def sessions(self) -> list[SessionMeta]:
        out = []
        for d in sorted((self.root / "sessions").iterdir()):
            try:
                m = json.loads((d / "meta.json").read_text())
                out.append(SessionMeta(**m))
            except (OSError, ValueError, TypeError):
                continue
        return out

    # ------------------------------------------------------------------ run lock

    def try_lock_run(self, session_id: str) -> RunLock | None:
        d = self.session_dir(session_id)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        f = _flock(d / "run.lock", blocking=False)
        return None if f is None else RunLock(f, session_id)

    def want(self, session_id: str) -> None:
        """Ask whoever keeps this session's sandbox parked to let go of its run lock (seen within ~1 s).

        The request is a fresh random token, replaced atomically: the parked side compares it with
        the token it saw when it parked, never a file time with its own clock (hosts sharing a store
        need not agree on the time)."""
        d = self.session_dir(session_id)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = d / f".wanted-{secrets.token_hex(8)}"
        tmp.write_text(secrets.token_hex(16))
        os.replace(tmp, d / "wanted")

    def wanted_mark(self, session_id: str) -> str | None:
        """The session's last request (see `want`), to be compared by `wanted_since`."""
        try:
            return (self.session_dir(session_id) / "wanted").read_text()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def wanted_since(self, session_id: str, mark: str | None) -> bool:
        """Has the session been wanted since `mark` (its `wanted_mark` then) was taken?"""
        now = self.wanted_mark(session_id)
        return now is not None and now != mark

    def run_active(self, session_id: str) -> bool:
        lock = self.try_lock_run(session_id)
        if lock is None:
            return True
        lock.release()
        return False

    # ------------------------------------------------------------------ workspaces

    def new_workspace(self, size_mb: int) -> str:
        """A fresh size-capped workspace (sparse ext4 image, loop-mounted); returns its id.

        Until a session adopts it, it is marked with its creator (`<ws>.owner`), so the warm
        workspaces of a worker that died can be told from those of a live one."""
        ws = f"ws_{secrets.token_hex(8)}"
        if self.owner is not None:
            (self.root / "workspaces" / f"{ws}.owner").write_text(self.owner)
        if self.host_workspaces:
            make_ext4_workspace(self.root / "workspaces", ws, size_mb)
        return ws

    def workspace_archive(self, ws: str) -> Path:
        """Where a cluster session's workspace is kept between its sandboxes (``host_workspaces=False``)."""
        return self.root / "workspaces" / f"{safe_id(ws)}.tar"

    def self_check(self) -> None:
        """Make and remove a tiny workspace: a store that cannot cap workspaces serves nothing."""
        if not self.host_workspaces:
            # Nothing is mounted: the store must only hold files (archives, journal, trails, locks).
            probe = self.root / "workspaces" / f".probe-{secrets.token_hex(4)}"
            try:
                probe.write_bytes(b"ok")
            finally:
                probe.unlink(missing_ok=True)
            return
        ws = self.new_workspace(8)
        try:
            probe = self.workspace_dir(ws) / ".probe"
            probe.write_bytes(b"ok")
            if not os.path.ismount(self.workspace_dir(ws)):
                raise StoreError(f"{self.workspace_dir(ws)} is not a mount point after mounting it")
        finally:
            self.remove_workspace(ws)

    def ensure_mounted(self, ws: str) -> Path:
        """The workspace's mount point, mounting its image again if needed (e.g. after a host reboot)."""
        if not self.host_workspaces:
            raise StoreError(f"workspace {ws} is kept as an archive for cluster sandboxes; it has no host mount")
        mnt = self.workspace_dir(ws)
        img = self.root / "workspaces" / f"{safe_id(ws)}.img"
        if os.path.ismount(mnt):
            return mnt
        if not img.is_file():
            raise StoreError(f"workspace image {img} is missing")
        mnt.mkdir(mode=0o700, exist_ok=True)
        _mount(img, mnt)
        return mnt

    def open_session(self, session_id: str, size_mb: int, *, adopt: str | None = None,
                     worker: str | None = None) -> tuple[SessionMeta, bool]:
        """The session's entry, created (with a new workspace, or adopting `adopt`) if it has none.

        Returns (meta, created)."""
        with self._meta_lock(session_id):
            meta = self.meta(session_id)
            created = meta is None
            now = time.time()
            if meta is None:
                ws = adopt or self.new_workspace(size_mb)
                meta = SessionMeta(session_id=session_id, workspace=ws, size_mb=size_mb, created_at=now,
                                   last_activity=now)
            meta.last_activity = now
            meta.worker = worker
            meta.state = "running"
            self._write_meta(meta)
        if self.host_workspaces:
            self.ensure_mounted(meta.workspace)
        return meta, created

    def skills_dir(self, session_id: str, *, size_mb: int, inodes: int) -> Path:
        """`sessions/<s>/run/skills`: where the SDK puts this run's skills, a small tmpfs (size and inode
        capped, nosuid, nodev) that the sandbox mounts read-only. A bomb of an archive fills it and fails;
        the host is untouched. Kept if already mounted (a parked sandbox still has it)."""
        run = self.session_dir(session_id) / "run"
        d = run / "skills"
        if not self.host_workspaces:
            # A cluster: no mount (no root in the worker's pod); the skills are copied into the pod
            # once the SDK has placed them (sandbox.worker.pool.install_skills, capped there).
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            return d
        if os.path.ismount(d):
            return d
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        # mount(2) itself, not a `mount` process: this is on the way to the session's first call.
        _mount_tmpfs(d, f"size={size_mb}m,nr_inodes={inodes},mode=0755")
        return d

    def release_skills_dir(self, session_id: str) -> None:
        d = self.session_dir(session_id) / "run" / "skills"
        if os.path.ismount(d):
            _umount_lazy(d)
        elif not self.host_workspaces:
            shutil.rmtree(d, ignore_errors=True)

    def remove_workspace(self, ws: str) -> None:
        remove_ext4_workspace(self.root / "workspaces", safe_id(ws))
        self.workspace_archive(ws).unlink(missing_ok=True)

    def remove_session(self, session_id: str, *, lock: RunLock | None = None) -> bool:
        """Delete the session's workspace, checkpoints and metadata (not its audit trail).

        Refused (False) while another run holds the session's run lock; `lock` is the caller's own."""
        own = lock is not None and lock.held
        run = lock if own else self.try_lock_run(session_id)
        if run is None:
            return False
        try:
            meta = self.meta(session_id)
            if meta is not None:
                self.remove_workspace(meta.workspace)
            self.release_skills_dir(session_id)
            d = self.session_dir(session_id)
            # Everything but the lock file we hold, then the directory itself.
            for child in d.iterdir():
                if child.name == "run.lock":
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
            (d / "run.lock").unlink(missing_ok=True)
            try:
                d.rmdir()
            except OSError:
                pass
            return True
        finally:
            if not own:
                run.release()

    def expired(self, now: float | None = None) -> list[SessionMeta]:
        now = time.time() if now is None else now
        return [m for m in self.sessions() if now - m.last_activity > self.retention_s]

    def workspace_bytes(self, ws: str) -> int:
        """Bytes the store holds for a workspace, whichever form it has on disk, so a reader that
        did not build the store (``sandbox session list``) reports it right: a mounted image's used
        space; an image not mounted (a host rebooted), its allocated blocks; an archive (a store
        shared by hosts, a cluster), its size. Never the filesystem under an empty mount point."""
        mnt = self.workspace_dir(ws)
        if os.path.ismount(mnt):
            try:
                st = os.statvfs(mnt)
            except OSError:
                return 0
            return (st.f_blocks - st.f_bfree) * st.f_frsize
        for kept in (self.root / "workspaces" / f"{safe_id(ws)}.img", self.workspace_archive(ws)):
            try:
                st2 = kept.stat()
            except OSError:
                continue
            return st2.st_blocks * 512 if kept.suffix == ".img" else st2.st_size
        return 0

    def orphan_workspaces(self, older_than_s: float = 60.0) -> list[str]:
        """Workspaces no session adopted and whose creating worker is gone (its warm sandboxes)."""
        used = {m.workspace for m in self.sessions()}
        out = []
        # Host workspaces are images; a cluster store has only owner markers until a workspace is saved.
        pattern = "*.img" if self.host_workspaces else "*.owner"
        for img in (self.root / "workspaces").glob(pattern):
            ws = img.name.rsplit(".", 1)[0]
            try:
                if ws in used or time.time() - img.stat().st_mtime < older_than_s:
                    continue
                owner = (self.root / "workspaces" / f"{ws}.owner").read_text().strip()
            except FileNotFoundError:
                owner = ""
            if ws in {m.workspace for m in self.sessions()}:  # adopted meanwhile
                continue
            if not owner or not self.owner_alive(owner):
                out.append(ws)
        return out


def unmount_under(root: Path) -> list[str]:
    """Lazily unmount every mount below `root` (workspaces, skills): before deleting a throwaway store."""
    prefix = str(Path(root).resolve()) + "/"
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split()[1].replace("\\040", " ") for line in f]
    except OSError:
        return []
    done = []
    for mnt in sorted((m for m in mounts if m.startswith(prefix)), reverse=True):
        _umount_lazy(Path(mnt))
        done.append(mnt)
    return done


def chown_tree(root: Path, uid: int, gid: int) -> int:
    """Give `root` and everything under it to uid:gid (never following symlinks); returns entries changed.

    Called only while no sandbox runs over the tree, so nothing can swap a path under the walk."""
    changed = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in [*dirnames, *filenames, None]:
            p = dirpath if name is None else os.path.join(dirpath, name)
            try:
                s = os.lstat(p)
                if (s.st_uid, s.st_gid) != (uid, gid):
                    os.lchown(p, uid, gid)
                    changed += 1
            except FileNotFoundError:
                continue
    return changed


# ---------------------------------------------------------------------- ext4 workspaces

def make_ext4_workspace(root: Path, ws: str, size_mb: int) -> Path:
    """A size-capped ext4 filesystem in a sparse file, loop-mounted (nosuid, nodev)."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    img, mnt = root / f"{ws}.img", root / ws
    try:
        with open(img, "xb") as f:
            f.truncate(size_mb << 20)
        _run(["mkfs.ext4", "-q", "-m", "0", "-E", "root_owner=0:0,lazy_itable_init=1", str(img)])
        mnt.mkdir(mode=0o700)
        _mount(img, mnt)
        shutil.rmtree(mnt / "lost+found", ignore_errors=True)
        os.chmod(mnt, 0o700)
    except BaseException:
        remove_ext4_workspace(root, ws)
        raise
    return mnt


def remove_ext4_workspace(root: Path, ws: str) -> None:
    mnt, img = root / ws, root / f"{ws}.img"
    (root / f"{ws}.owner").unlink(missing_ok=True)
    if os.path.ismount(mnt):
        _umount_lazy(mnt)
    if mnt.exists() and not os.path.ismount(mnt):
        shutil.rmtree(mnt, ignore_errors=True)
    img.unlink(missing_ok=True)


def _mount(img: Path, mnt: Path) -> None:
    _run(["mount", "-o", "loop,nosuid,nodev", str(img), str(mnt)])


_MS_NOSUID, _MS_NODEV, _MNT_DETACH = 2, 4, 2


@functools.cache
def _libc() -> Any:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _mount_tmpfs(target: Path, options: str) -> None:
    """A nosuid, nodev tmpfs named `sandbox-skills` at `target` (mount(2), as `mount -t tmpfs` does)."""
    import ctypes

    rc = _libc().mount(b"sandbox-skills", os.fsencode(target), b"tmpfs", ctypes.c_ulong(_MS_NOSUID | _MS_NODEV),
                       options.encode())
    if rc != 0:
        err = ctypes.get_errno()
        raise StoreError(f"cannot mount the skills tmpfs at {target}: {os.strerror(err)}")


def _umount_lazy(target: Path) -> None:
    """umount2(MNT_DETACH), as `umount -l`; best effort (a failure leaves the mount to the next start)."""
    import ctypes

    if _libc().umount2(os.fsencode(target), ctypes.c_int(_MNT_DETACH)) != 0:
        log.debug("cannot unmount %s: %s", target, os.strerror(ctypes.get_errno()))


def _run(argv: list[str]) -> None:
    try:
        subprocess.run(argv, check=True, capture_output=True, timeout=60)
    except FileNotFoundError:
        raise StoreError(f"{argv[0]} is not installed (disk-backed workspaces need e2fsprogs and mount)") from None
    except subprocess.CalledProcessError as e:
        err = (e.stderr or b"").decode("utf-8", "replace").strip()[-300:]
        raise StoreError(f"{' '.join(argv[:2])} failed for {argv[-1]}: {err or e}") from None
