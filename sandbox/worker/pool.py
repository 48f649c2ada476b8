"""Session sandboxes and the warm pool.

One sandbox per session, never shared and never reused by another session.
A session's files are not in its sandbox but in its workspace in the session
store (store.py), bind-mounted as /workspace: the sandbox is stopped when a
run ends (or kept `park_grace` seconds when the run ended because of the
control plane, or when the worker is told to keep idle sandboxes) and a new
one is started over the same workspace when work arrives.

A session gets, in order: its own parked sandbox, a warm pool sandbox (only a
session that has no workspace yet: the warm sandbox's fresh workspace becomes
the session's), or a freshly created one over its workspace.

Labels cannot change after a container is created, so a warm sandbox carries
the session label `pool-<id>` (and `org.sandbox.pool`), and the mapping from
that id to the session it serves is kept here, on the worker side, and
logged when it is made. A sandbox created on demand is labelled with its
session directly.

All methods block (they talk to Docker); the worker calls them from threads.

Where sandboxes come from is the worker's backend setting (:func:`open_runtime`, through
:func:`sandbox.backend.open_backend`): ``docker`` hands the worker the same
:class:`sandbox.runtime.Runtime` as ever (host workspaces bind-mounted, as above);
``kubernetes`` hands it a :class:`sandbox.kube.backend.KubeBackend`, whose sandboxes are pods
that cannot mount a host path. There a session's workspace is the pod's own volume while its
sandbox lives; when the sandbox is stopped, the sandbox itself writes its workspace as a tar
stream (`tar` runs inside, under the policy) that the store keeps as opaque, size-capped bytes,
and the session's next sandbox unpacks it, again inside (:func:`save_workspace`,
:func:`restore_workspace`). The worker never parses what a sandbox wrote. During a run the
sandbox writes it again every ``archive_interval`` seconds after a tool call
(:meth:`SessionSandboxes.archive`, started by the worker), and when it is parked, so a pod that
dies loses only what changed since its last archive; each archive replaces the previous one only
once complete, and one sandbox writes one archive at a time (the one at its stop waits for a
periodic one in flight, so the newest is the one kept). When a run goes idle the archive becomes
a checkpoint of the session (sandbox.worker.checkpoints, ``kind: archive``).
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sandbox.policy import Policy
from sandbox.runtime import Runtime, Sandbox, SandboxError
from sandbox.spec import LABEL_POOL

from .admission import Admission, psutil_probe
from .logs import log_event
from .store import RunLock, SessionStore, chown_tree

log = logging.getLogger("sandbox.worker.pool")


@dataclass
class Assignment:
    session_id: str
    sandbox: Sandbox
    source: str  # "pool" | "fresh" | "parked"
    workspace: str | None = None  # the store's workspace id
    parked_until: float | None = None
    run_lock: RunLock | None = None  # held while parked: no other run may use the workspace meanwhile
    wanted_mark: str | None = None  # the session's "wanted" request when it was parked (store.want)
    egress_denials_seen: int = 0
    assigned_at: float = field(default_factory=time.monotonic)
    # Held while this sandbox writes its workspace archive (a cluster): one archive at a time per sandbox,
    # and the last one (at its stop) waits for a periodic one in flight instead of being overwritten by it.
    save_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class WarmPool:
    """Keeps `size` started, unassigned sandboxes of one policy; refills in the background."""

    def __init__(self, runtime: Runtime, policy: Policy, size: int, *, worker_label: str, store: SessionStore,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.runtime = runtime
        self.policy = policy
        self.store = store
        self._workspaces: dict[str, str] = {}  # sandbox id -> its fresh workspace
        self.size = max(0, size)
        self.worker_label = worker_label
        self._on_change = on_change
        self._ready: list[Sandbox] = []
        self._creating = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=max(1, min(self.size, 4)), thread_name_prefix="warm-pool")
        self._thread = threading.Thread(target=self._fill_loop, name="warm-pool-filler", daemon=True)
        self.failures = 0

    def start(self) -> None:
        if self.size:
            self._thread.start()

    @property
    def ready(self) -> int:
        with self._lock:
            return len(self._ready)

    def take(self) -> tuple[Sandbox, str] | None:
        """A ready sandbox and its (empty) workspace id, or None; the pool refills behind it."""
        while True:
            with self._lock:
                if not self._ready:
                    sb = None
                else:
                    sb = self._ready.pop(0)
            self._wake.set()
            if sb is None:
                return None
            with self._lock:
                ws = self._workspaces.pop(sb.id, None)
            if sb.alive and ws is not None:
                self._on_change()
                return sb, ws
            self._discard(sb, ws)  # died while waiting (OOM-killed host, engine restart): never hand it out

    def _discard(self, sb: Sandbox, ws: str | None) -> None:
        sb.destroy()
        if ws is not None:
            self.store.remove_workspace(ws)

    def _fill_loop(self) -> None:
        backoff = 1.0
        while not self._closed.is_set():
            with self._lock:
                missing = self.size - len(self._ready) - self._creating
                self._creating += max(0, missing)
            for _ in range(max(0, missing)):
                self._executor.submit(self._create_one)
            self._wake.wait(timeout=5.0 if self.failures == 0 else backoff)
            self._wake.clear()
            backoff = min(30.0, backoff * 2) if self.failures else 1.0

    def _create_one(self) -> None:
        pool_id = f"pool-{secrets.token_hex(6)}"
        sb: Sandbox | None = None
        ws: str | None = None
        try:
            if self._closed.is_set():
                return
            ws = self.store.new_workspace(self.policy.workspace.size_mb)
            sb = start_over(self.runtime, self.policy, self.store, pool_id, ws,
                            extra_labels={LABEL_POOL: self.worker_label})
            _start_shell(sb)
            self.failures = 0
        except Exception as e:  # noqa: BLE001 - SandboxError, StoreError: retried with back-off
            self.failures += 1
            log.warning("warm pool could not start a sandbox: %s", e)
        finally:
            with self._lock:
                self._creating -= 1
                if sb is not None and ws is not None and not self._closed.is_set():
                    self._ready.append(sb)
                    self._workspaces[sb.id] = ws
                    sb = ws = None
            if sb is not None:
                sb.destroy()
            if ws is not None:
                self.store.remove_workspace(ws)
            self._on_change()

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        self._executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            ready, self._ready = self._ready, []
            workspaces, self._workspaces = self._workspaces, {}
        for sb in ready:
            self._discard(sb, workspaces.get(sb.id))
        self._on_change()


def _start_shell(sb: Sandbox) -> None:
    """Start a warm sandbox's default bash shell now, as a session's first `bash` call would (the
    same op): that call then does not wait the 15-25 ms a shell takes to start. Best effort."""
    from .tools import op_request

    op_args, timeout = op_request("bash", {"command": "true"})
    try:
        sb.call("bash", timeout=timeout, **op_args)
    except Exception as e:  # noqa: BLE001 - the session's first call starts it then
        log.debug("warm sandbox: default shell not started: %s", e)


def start_over(runtime: Runtime, policy: Policy, store: SessionStore, label: str, ws: str,
               extra_labels: dict[str, str] | None = None,
               ro_mounts: list[tuple[Path, str]] | None = None) -> Sandbox:
    """A sandbox over the store's workspace `ws`, which is then owned by the sandbox's uid.

    On a backend without host workspaces (a cluster), the workspace's archive, if the session has
    one, is unpacked inside the new sandbox instead (`ro_mounts` cannot reach a pod: skipped, said)."""
    if not store.host_workspaces:
        if ro_mounts:
            log_event(log, logging.WARNING, "mounts_skipped", "host paths cannot be mounted into a cluster "
                      "sandbox; served without them", sandbox_label=label, targets=[t for _, t in ro_mounts])
        sb = runtime.create(policy, session_id=label, extra_labels=extra_labels)
        try:
            restore_workspace(sb, store, ws)
        except BaseException:
            sb.destroy()
            raise
        return sb
    mnt = store.ensure_mounted(ws)
    sb = runtime.create(policy, session_id=label, workspace=mnt, extra_labels=extra_labels,
                        ro_mounts=list(ro_mounts or []))
    try:
        uid, gid = sandbox_ids(sb, policy)
        chown_tree(mnt, uid, gid)
    except BaseException:
        sb.destroy()
        raise
    return sb


# The workspace of a cluster sandbox, written and read by the sandbox itself: `tar` of $HOME, the
# workspace root of the agent's tools, under the policy's limits. Exit 1 of GNU tar (a file changed
# while it was read) still leaves a complete archive; anything else is a failure.
_SAVE_ARGV = ["/bin/sh", "-c", 'cd "$HOME" && exec tar --numeric-owner -cf - .']
_RESTORE_ARGV = ["/bin/sh", "-c", 'cd "$HOME" && exec tar --no-same-owner --no-same-permissions -xf -']
_ARCHIVE_SLACK = 1.1  # tar's headers and padding over the workspace's own bytes


def save_workspace(sb: Sandbox, store: SessionStore, ws: str, policy: Policy) -> int:
    """The sandbox's workspace, as it writes it, into the store's archive for `ws` (replaced only when
    complete and within the size cap). Returns its size in bytes; raises SandboxError otherwise."""
    dest = store.workspace_archive(ws)
    cap = int(policy.workspace.size_mb * (1 << 20) * _ARCHIVE_SLACK) + (1 << 20)
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")
    size = 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            def write(stream: int, data: bytes) -> None:
                nonlocal size
                if stream == 1:
                    f.write(data)
                    size += len(data)

            res = sb.exec(_SAVE_ARGV, max_output=cap, on_output=write)
            if res.truncated or res.exit_code not in (0, 1) or res.error:
                why = "over the workspace's size cap" if res.truncated else (res.error or f"tar exit {res.exit_code}")
                raise SandboxError(f"could not save the workspace of sandbox {sb.id[:12]}: {why}")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        return size
    finally:
        tmp.unlink(missing_ok=True)


def restore_workspace(sb: Sandbox, store: SessionStore, ws: str) -> bool:
    """Unpack the session's saved workspace inside `sb` (False: it has none yet)."""
    src = store.workspace_archive(ws)
    try:
        f = open(src, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return False
    with f:
        res = sb.exec(_RESTORE_ARGV, stdin=f)
    if res.exit_code != 0 or res.error:
        raise SandboxError(f"could not restore workspace {ws} into sandbox {sb.id[:12]}: "
                           f"{res.error or res.stderr.decode('utf-8', 'replace')[-300:] or res.exit_code}")
    return True


# A run's skills into a cluster sandbox: the pod's `skills` memory volume at /mnt/skills (compiled into
# every SandboxTemplate, sandbox.kube.compiler), emptied, filled from a tar the WORKER builds (so only
# directories and regular files, relative names), then made read-only by mode. Not a boundary: in one
# container the workload's uid owns what it unpacked and can chmod it back (Docker mounts them read-only).
_SKILLS_ARGV = ["/bin/sh", "-c",
                'd="${SANDBOX_SKILLS_DIR:-/mnt/skills}" && chmod -R u+w "$d" 2>/dev/null; '
                'find "$d" -mindepth 1 -delete && tar --no-same-owner --no-same-permissions -xf - -C "$d" && '
                'find "$d" -mindepth 1 -exec chmod a-w {} +']


def install_skills(sb: Sandbox, src: Path, *, max_bytes: int, max_files: int) -> tuple[int, list[str]]:
    """Copy the skills the SDK placed in `src` (on the worker) into the cluster sandbox `sb`, at the
    path the SDK's tools announce (/mnt/skills). Only directories and regular files (symlinks,
    hard-link tricks and devices are left out: files are opened with O_NOFOLLOW and re-described
    here). Skills are taken whole, by name, while they fit in `max_bytes` and `max_files` (the
    worker's skills_mb / skills_inodes): one that does not is left out whole, as a full tmpfs
    refuses it on Docker. Returns (files copied, skills left out); no call into the sandbox when
    there is nothing to copy."""
    import io
    import stat
    import tarfile

    # (top-level skill name) -> [(relative name, lstat)], in walk order
    skills: dict[str, list[tuple[str, os.stat_result]]] = {}
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not os.path.islink(os.path.join(dirpath, d)))
        rel = os.path.relpath(dirpath, src)
        for name in dirnames + sorted(filenames):
            arc = name if rel == "." else f"{rel}/{name}"
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
                skills.setdefault(arc.split("/", 1)[0], []).append((arc, st))
    take, left_out, total, count = [], [], 0, 0
    for name in sorted(skills):
        size = sum(st.st_size for _, st in skills[name] if stat.S_ISREG(st.st_mode))
        if total + size > max_bytes or count + len(skills[name]) > max_files:
            left_out.append(name)
            continue
        take.append(name)
        total, count = total + size, count + len(skills[name])
    buf = io.BytesIO()
    files = 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in take:
            for arc, st in skills[name]:
                info = tarfile.TarInfo(arc)
                info.mtime, info.uid, info.gid, info.uname, info.gname = int(st.st_mtime), 0, 0, "", ""
                if stat.S_ISDIR(st.st_mode):
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                    continue
                try:
                    fd = os.open(src / arc, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                except OSError:
                    continue  # gone or swapped for a link since the walk: left out
                with os.fdopen(fd, "rb") as f:
                    fst = os.fstat(f.fileno())
                    if not stat.S_ISREG(fst.st_mode) or fst.st_size != st.st_size:
                        continue
                    info.size, info.mode = fst.st_size, 0o755 if fst.st_mode & 0o111 else 0o644
                    tar.addfile(info, f)
                files += 1
    if not take:
        return 0, left_out
    res = sb.exec(_SKILLS_ARGV, stdin=buf.getvalue(), timeout=120)
    if res.exit_code != 0 or res.error:
        raise SandboxError(f"could not copy the session's skills into sandbox {sb.id[:12]}: "
                           f"{res.error or res.stderr.decode('utf-8', 'replace')[-300:] or res.exit_code}")
    return files, left_out


def sandbox_ids(sb: Sandbox, policy: Policy) -> tuple[int, int]:
    """The uid/gid this sandbox runs as (allocated per sandbox, or pinned by the policy)."""
    uid = getattr(sb, "uid", None)
    gid = getattr(sb, "gid", None)
    if not isinstance(uid, int):
        uid = policy.user.uid
    if not isinstance(gid, int):
        gid = policy.user.gid
    if not isinstance(uid, int) or not isinstance(gid, int):
        raise SandboxError("cannot tell which uid the sandbox runs as (policy says 'auto', sandbox says nothing)")
    return uid, gid


class SessionSandboxes:
    """The worker-side map session -> sandbox, with parking for sessions that may come back."""

    def __init__(self, runtime: Runtime, policy: Policy, pool: WarmPool, *, park_grace: float, store: SessionStore,
                 worker_id: str | None = None, on_change: Callable[[], None] = lambda: None) -> None:
        self.runtime = runtime
        self.policy = policy
        self.pool = pool
        self.store = store
        self.worker_id = worker_id
        self.park_grace = park_grace
        self._on_change = on_change
        self._by_session: dict[str, Assignment] = {}
        self._lock = threading.Lock()

    def acquire(self, session_id: str, *, ro_mounts: list[tuple[Path, str]] | None = None,
                use_pool: bool = True) -> Assignment:
        """The session's sandbox over its workspace: its parked one, a warm one (a new session only, and
        only with `use_pool`: warm sandboxes have no `ro_mounts`), or a new one with `ro_mounts`."""
        started = time.perf_counter()
        with self._lock:
            existing = self._by_session.get(session_id)
            if existing is not None and existing.sandbox.alive:
                existing.parked_until = None
                if existing.source != "parked":
                    existing.source = "parked"
                log_event(log, logging.INFO, "sandbox_reused", "reusing the session's parked sandbox",
                          session_id=session_id, container=existing.sandbox.id[:12],
                          ms=round((time.perf_counter() - started) * 1000, 1))
                return existing
            if existing is not None:
                self._by_session.pop(session_id, None)
        if existing is not None:
            existing.sandbox.destroy()
        size = self.policy.workspace.size_mb
        taken = self.pool.take() if use_pool and self.store.meta(session_id) is None else None
        if taken is not None:
            sb, ws = taken
            meta, _ = self.store.open_session(session_id, size, adopt=ws, worker=self.worker_id)
            if meta.workspace != ws:  # another worker created the session's entry meanwhile
                self.pool._discard(sb, ws)
                taken = None
            source = "pool"
        if taken is None:
            meta, created = self.store.open_session(session_id, size, worker=self.worker_id)
            sb = start_over(self.runtime, self.policy, self.store, session_id, meta.workspace, ro_mounts=ro_mounts)
            source = "fresh" if created else "resumed"
        a = Assignment(session_id=session_id, sandbox=sb, source=source, workspace=meta.workspace)
        with self._lock:
            self._by_session[session_id] = a
        # The pool label can't be changed to the session; this line is the record of the mapping.
        log_event(log, logging.INFO, "sandbox_assigned", f"sandbox {sb.id[:12]} ({source}) serves the session",
                  session_id=session_id, container=sb.id[:12], sandbox_label=sb.session_id, source=source,
                  workspace=meta.workspace, ms=round((time.perf_counter() - started) * 1000, 1))
        self._on_change()
        return a

    def get(self, session_id: str) -> Assignment | None:
        with self._lock:
            return self._by_session.get(session_id)

    def release(self, session_id: str, *, park: bool | float, run_lock: RunLock | None = None) -> bool:
        """The session's run ended: destroy its sandbox, or park it (`park`: True for `park_grace`
        seconds, or a number of seconds) holding the session's run lock. True if parked."""
        with self._lock:
            a = self._by_session.get(session_id)
            if a is None:
                return False
            grace = self.park_grace if park is True else float(park or 0)
            if park and a.sandbox.alive and grace > 0 and run_lock is not None:
                a.parked_until = time.monotonic() + grace
                a.run_lock = run_lock
                a.wanted_mark = self.store.wanted_mark(session_id) if self.store is not None else None
                log_event(log, logging.INFO, "sandbox_parked",
                          f"keeping the sandbox for {grace:.0f}s in case the session comes back",
                          session_id=session_id, container=a.sandbox.id[:12])
                parked = True
            else:
                parked = False
                self._by_session.pop(session_id, None)
        if parked:
            # A cluster: the run's last changes into the archive now, not only when the parked pod stops
            # (a pod that dies while parked then loses nothing of the run).
            self._save(a, final=False)
            return True
        died = None if a.sandbox.alive else (a.sandbox.channel.close_reason or "gone")
        self._stop(a)
        log_event(log, logging.INFO if died is None else logging.WARNING, "sandbox_destroyed",
                  "session sandbox destroyed" if died is None else f"session sandbox had died: {died}",
                  session_id=session_id, container=a.sandbox.id[:12])
        self._on_change()
        return False

    def take_parked_lock(self, session_id: str) -> RunLock | None:
        """The run lock a parked sandbox of this session holds (the next run takes it over)."""
        with self._lock:
            a = self._by_session.get(session_id)
            if a is None or a.run_lock is None:
                return None
            lock, a.run_lock = a.run_lock, None
            return lock

    def reap_parked(self) -> list[str]:
        now = time.monotonic()
        with self._lock:
            expired = [a for a in self._by_session.values()
                       if a.parked_until is not None and (a.parked_until <= now or not a.sandbox.alive
                                                          or self.store.wanted_since(a.session_id, a.wanted_mark))]
            for a in expired:
                self._by_session.pop(a.session_id, None)
        for a in expired:
            died = None if a.sandbox.alive else (a.sandbox.channel.close_reason or "gone")
            self._stop(a)
            if a.run_lock is not None:
                a.run_lock.release()
                a.run_lock = None
            log_event(log, logging.INFO if died is None else logging.WARNING, "sandbox_destroyed",
                      "parked sandbox expired" if died is None else f"parked sandbox had died: {died}",
                      session_id=a.session_id, container=a.sandbox.id[:12])
        if expired:
            self._on_change()
        return [a.session_id for a in expired]

    def parked_sessions(self) -> set[str]:
        with self._lock:
            return {s for s, a in self._by_session.items() if a.parked_until is not None}

    def assignments(self) -> list[Assignment]:
        with self._lock:
            return list(self._by_session.values())

    def live_count(self) -> int:
        with self._lock:
            return sum(1 for a in self._by_session.values() if a.sandbox.alive)

    def close(self) -> None:
        with self._lock:
            all_, self._by_session = list(self._by_session.values()), {}
        for a in all_:
            self._stop(a)
            if a.run_lock is not None:
                a.run_lock.release()
        self._on_change()

    def _stop(self, a: Assignment) -> None:
        """Destroy the session's sandbox; on a cluster, first have it save its workspace in the store
        (a sandbox that already died keeps the archive its previous sandbox left)."""
        self._save(a, final=True)
        a.sandbox.destroy()

    def _save(self, a: Assignment, *, final: bool) -> int | None:
        """A cluster sandbox writes its workspace into the store's archive (blocking; waits for an
        archive of this sandbox in flight, so the newer one is the one kept). None: nothing to save
        (Docker, a dead sandbox) or it failed (said; the previous archive stays)."""
        if self.store.host_workspaces or a.workspace is None or not a.sandbox.alive:
            return None
        with a.save_lock:
            return self._save_locked(a, "workspace_saved" if final else "workspace_archived")

    def _save_locked(self, a: Assignment, event: str) -> int | None:
        if not a.sandbox.alive or a.workspace is None:
            return None
        started = time.perf_counter()
        try:
            size = save_workspace(a.sandbox, self.store, a.workspace, self.policy)
        except Exception as e:  # noqa: BLE001 - said loudly; the previous archive stays
            log_event(log, logging.ERROR, "workspace_save_failed", f"{e}", session_id=a.session_id,
                      workspace=a.workspace, periodic=event == "workspace_archived")
            return None
        log_event(log, logging.INFO, event, "the session's workspace is kept for its next sandbox",
                  session_id=a.session_id, workspace=a.workspace, bytes=size,
                  ms=round((time.perf_counter() - started) * 1000, 1))
        return size

    def archive(self, session_id: str) -> int | None:
        """Periodic archive during a run (a cluster; blocking, call it from a thread): the session's live
        sandbox writes its workspace now, and the store's archive is replaced once it is complete, so a
        pod that dies loses only what changed since. At most one archive per sandbox at a time: None at
        once if one is in flight (or nothing to archive, or it failed: said in the log)."""
        if self.store.host_workspaces:
            return None
        with self._lock:
            a = self._by_session.get(session_id)
        if a is None or a.workspace is None or not a.sandbox.alive:
            return None
        if not a.save_lock.acquire(blocking=False):
            return None
        try:
            with self._lock:  # released meanwhile (its stop saves it): nothing to do here
                if self._by_session.get(session_id) is not a:
                    return None
            return self._save_locked(a, "workspace_archived")
        finally:
            a.save_lock.release()


def uses_host_workspaces(runtime: Any = None, backend: str | None = None) -> bool:
    """Whether the worker's sandboxes mount the store's workspaces (Docker) or keep their own (a cluster).
    ``runtime``: one the worker was handed; else the backend setting (``$SANDBOX_BACKEND``, docker)."""
    if runtime is not None:
        return bool(getattr(runtime, "mounts_host_paths", True))
    from sandbox.backend import backend_name

    return backend_name(backend) == "docker"


def open_runtime(backend: str | None, *, state_dir: Path, owner_kind: str) -> Any:
    """The worker's source of sandboxes, by its backend setting, through :func:`sandbox.backend.open_backend`:
    Docker's :class:`Runtime` itself (unchanged: the same object and calls as before the seam), or the
    Kubernetes backend (its configuration from ``$SANDBOX_KUBE_CONFIG``; the egress proxy's admin
    endpoint and token from there too)."""
    from sandbox.backend import backend_name, open_backend

    from .worker import WorkerError  # (loaded: the worker is the caller)

    try:
        name = backend_name(backend)
        if name == "docker":
            return open_backend(name, state_dir=state_dir, owner_kind=owner_kind).runtime  # type: ignore[attr-defined]
        return open_backend(name, owner_kind=owner_kind, state_dir=state_dir)
    except WorkerError:
        raise
    except Exception as e:  # noqa: BLE001 - a bad configuration, an unreadable token file: said, no traceback
        raise WorkerError(f"cannot open the sandbox backend {backend or '(default)'}: {e}") from None


def admission_for(runtime: Any, policy: Policy, state_dir: Path) -> Admission:
    """The worker's admission control for its backend. Docker: the host must hold one more sandbox
    (:class:`sandbox.worker.admission.Admission`, unchanged). A cluster: the sandboxes run on its
    nodes (their room is the warm pool and the namespace's quota, seen as a claim that does not
    become ready), so only what the worker itself keeps counts: room in the store for one more
    workspace archive (and the next one while it is written), and the host's memory reserve. The
    worker host's load does not gate it."""
    if uses_host_workspaces(runtime):
        return Admission(policy, psutil_probe(state_dir))
    return ClusterAdmission(policy, psutil_probe(state_dir), load_per_cpu=float("inf"))


class ClusterAdmission(Admission):
    def needs(self) -> tuple[int, int, float]:
        # Its archive and, while a periodic one is written, the next (kept beside it until complete).
        return 0, 2 * int(self.policy.workspace.size_mb * (1 << 20) * _ARCHIVE_SLACK), 0.0


def startup_canaries(runtime: Any, policy: Policy) -> list[Any]:
    """The attack canaries in a sandbox from the worker's own backend before it serves (fail closed):
    :func:`sandbox.audit.selftest.require_canaries` on Docker; the backend's own where it has one
    (a cluster: the same probes in a claimed pod, plus the NetworkPolicy connection canary)."""
    own = getattr(runtime, "require_canaries", None)
    if own is not None:
        return list(own(policy))
    from sandbox.audit.selftest import require_canaries

    return require_canaries(runtime, policy)


def count_egress_denials(runtime: Runtime, a: Assignment) -> int:
    """New proxy denials for this sandbox since the last call (read from the egress audit log)."""
    if not a.sandbox.egress:
        return 0
    try:
        records = runtime.egress.records(session=a.sandbox.session_id, limit=10_000)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - metrics must not break the worker
        return 0
    denied = sum(1 for r in records if r.get("decision") == "deny")
    new = max(0, denied - a.egress_denials_seen)
    a.egress_denials_seen = denied
    return new
