"""The egress proxy daemon: one per state directory, started on demand, gone when idle.

    python3 -m sandbox.egress.daemon --state-dir DIR [--idle-exit 30] [--detach]

Layout of DIR (created here; ``manager.py`` is the only intended client):

    daemon.lock    flock held for the daemon's whole life: at most one daemon per DIR
    manager.lock   flock held by a manager for each request, and by the daemon while it
                   decides to exit, so "is it running?" and "I am leaving" cannot interleave
    control.sock   JSON-lines control socket (mode 0600, root's when started as root)
    sessions/<id>/proxy.sock   one listener per sandbox session (dir bind-mounted into it)
    audit/<session>.jsonl[.1]  decisions, one capped file pair per session (audit.py)
    daemon.log     the daemon's stderr (opened by the manager)

Started as root it sets everything up, then becomes an unprivileged uid/gid
(65534 by default) with an empty capability bounding set and no_new_privs. It
works from DIR as its current directory and uses relative paths from then on,
so DIR's ancestors (e.g. /root) need not be searchable by that uid.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import encodings.idna  # noqa: F401  - imported before dropping privileges, like everything else
import fcntl
import json
import os
import re
import resource
import secrets
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from sandbox.egress.audit import SESSIONS_DIR as AUDIT_DIR
from sandbox.egress.audit import SessionAuditLogs
from sandbox.egress import evloop
from sandbox.egress.credentials import SessionMaterial
from sandbox.egress.proxy import EgressProxy
from sandbox.egress.rules import EgressPolicy
from sandbox.egress.unixsock import bind_unix

CONTROL = "control.sock"
SESSIONS = "sessions"
AUDIT = "audit.jsonl"
DAEMON_LOCK = "daemon.lock"
MANAGER_LOCK = "manager.lock"
PID_FILE = "daemon.pid"
MAX_CONTROL_LINE = 1 << 20
SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_DUMPABLE = 4
_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4


def _prctl(option: int, arg: int = 0) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}) failed: {os.strerror(err)}")


def _preload_lazy_modules() -> None:
    """Load now what Python would import lazily later: after the drop the interpreter's
    own files may be unreadable (a Python installed under /root, mode 0700), and a
    name lookup would then fail with ModuleNotFoundError (the IDNA codec)."""
    import concurrent.futures.thread  # noqa: F401 - loop.getaddrinfo runs in the default executor
    import encodings.ascii  # noqa: F401
    import encodings.idna  # noqa: F401
    import encodings.latin_1  # noqa: F401
    import encodings.punycode  # noqa: F401
    import encodings.utf_8  # noqa: F401

    import importlib

    from sandbox.egress.resolve import PRELOAD

    for mod in PRELOAD:
        importlib.import_module(mod)
    if evloop.kind() == "uvloop":
        importlib.import_module("uvloop")  # a C extension: loaded now, while its file is readable
    "warm.example".encode("idna")
    with contextlib.suppress(OSError):
        socket.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM)


def drop_privileges(uid: int, gid: int) -> None:
    """Become uid/gid for good: no supplementary groups, no capabilities (effective,
    permitted, ambient or bounding), no_new_privs. A no-op on identity when not root."""
    _preload_lazy_modules()
    if os.geteuid() == 0:
        last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
        for cap in range(last_cap + 1):
            _prctl(_PR_CAPBSET_DROP, cap)
        with contextlib.suppress(OSError):
            _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)  # from root to non-root clears permitted/effective caps
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    # Not dumpable: the daemon holds credential values and session CA keys in memory; another
    # process of the same uid must not read them through /proc/<pid>/mem, environ or ptrace.
    _prctl(_PR_SET_DUMPABLE, 0)
    status = Path("/proc/self/status").read_text()
    for field in ("CapEff", "CapPrm", "CapAmb"):
        m = re.search(rf"^{field}:\s*([0-9a-f]+)$", status, re.MULTILINE)
        if m and int(m.group(1), 16) != 0:
            raise SystemExit(f"egress daemon: still holds capabilities after the drop ({field})")


class Daemon:
    def __init__(self, state_dir: Path, idle_exit_s: float, manager_lock_fd: int, daemon_lock_fd: int, control: socket.socket) -> None:
        self.state_dir = state_dir  # absolute, for replies only; we work relative to cwd
        self.idle_exit_s = idle_exit_s
        self.manager_lock_fd = manager_lock_fd
        self.daemon_lock_fd = daemon_lock_fd
        self.control = control
        self.audit = SessionAuditLogs(Path(AUDIT))
        self.proxy = EgressProxy(audit=self.audit)
        self.idle_since = time.monotonic()
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        accept = loop.create_task(self._accept())
        watch = loop.create_task(self._idle_watch())
        await self.stopping.wait()
        accept.cancel()
        watch.cancel()
        self.control.close()
        with contextlib.suppress(OSError):
            os.unlink(CONTROL)
        await self.proxy.close()
        self.audit.close()
        with contextlib.suppress(OSError):
            os.unlink(PID_FILE)
        # Release daemon.lock before exiting; manager.lock (if we hold it) goes with the process,
        # so no manager can see "not running" while this process still owns daemon.lock.
        os.close(self.daemon_lock_fd)

    async def _idle_watch(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.idle_exit_s / 4))
            if self.proxy.sessions():
                self.idle_since = time.monotonic()
                continue
            if time.monotonic() - self.idle_since < self.idle_exit_s:
                continue
            try:
                fcntl.flock(self.manager_lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a manager is mid-request: it may be about to add a session
            self.stopping.set()
            return

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self.control)
            conn.setblocking(False)
            loop.create_task(self._client(conn))

    async def _client(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        buf = bytearray()
        try:
            while True:
                while b"\n" not in buf:
                    data = await asyncio.wait_for(loop.sock_recv(conn, 65536), 30)
                    if not data:
                        return
                    buf += data
                    if len(buf) > MAX_CONTROL_LINE:
                        return
                line, _, rest = bytes(buf).partition(b"\n")
                buf = bytearray(rest)
                reply = await self._dispatch(line)
                await loop.sock_sendall(conn, (json.dumps(reply) + "\n").encode())
        except (TimeoutError, OSError):
            pass
        finally:
            conn.close()

    async def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            msg = json.loads(line)
            op = msg["op"]
            if op == "status":
                return {"ok": True, **self.status()}
            sid = msg["session"]
            if not isinstance(sid, str) or not SESSION_ID.match(sid):
                return {"ok": False, "error": "invalid session id"}
            if op == "add_session":
                policy = EgressPolicy.model_validate(msg["policy"])
                # Credential values, read by the sandbox's owner (manager.py): kept in memory only.
                material = SessionMaterial.from_wire(msg.get("material"))
                # The directory is named by a random token, not the session id: its host path shows in
                # the sandbox's /proc/self/mountinfo, and the session id is not the sandbox's to know.
                sock = await self.proxy.add_session(sid, policy, Path(SESSIONS) / secrets.token_hex(12), material)
                self.idle_since = time.monotonic()
                return {"ok": True, "dir": str(self.state_dir / sock.parent), "socket": str(self.state_dir / sock)}
            if op == "remove_session":
                await self.proxy.remove_session(sid)
                self.idle_since = time.monotonic()
                return {"ok": True}
            return {"ok": False, "error": f"unknown op {op!r}"}
        except Exception as e:  # noqa: BLE001 - a bad request must not kill the daemon
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}

    def status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "loop": type(asyncio.get_running_loop()).__module__.split(".")[0],  # uvloop or asyncio
            "uid": os.getuid(),
            "gid": os.getgid(),
            "state_dir": str(self.state_dir),
            "idle_exit_s": self.idle_exit_s,
            "sessions": [self.proxy.session_info(s) for s in self.proxy.sessions()],
        }


def _lock_file(name: str) -> int:
    return os.open(name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m sandbox.egress.daemon")
    ap.add_argument("--state-dir", required=True, type=Path)
    ap.add_argument("--idle-exit", type=float, default=30.0, help="exit after this many seconds without sessions")
    ap.add_argument("--uid", type=int, default=65534, help="uid to become when started as root")
    ap.add_argument("--gid", type=int, default=65534, help="gid to become when started as root")
    ap.add_argument("--detach", action="store_true", help="fork once set up; the parent exits when the control socket is listening")
    args = ap.parse_args(argv)

    state = args.state_dir.resolve()
    state.mkdir(mode=0o711, parents=True, exist_ok=True)
    os.chdir(state)
    daemon_lock = _lock_file(DAEMON_LOCK)
    try:
        fcntl.flock(daemon_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("egress daemon: another daemon owns this state dir", file=sys.stderr)
        return 0  # the manager simply talks to that one
    manager_lock = _lock_file(MANAGER_LOCK)
    root = os.geteuid() == 0
    uid, gid = (args.uid, args.gid) if root else (os.getuid(), os.getgid())

    os.chmod(state, 0o711)  # the dropped uid must search it (it is our cwd), nothing more
    Path(SESSIONS).mkdir(mode=0o711, exist_ok=True)
    os.chmod(SESSIONS, 0o711)
    for name in (AUDIT, AUDIT + ".1"):
        os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640))
    Path(AUDIT_DIR).mkdir(mode=0o750, exist_ok=True)
    if root:
        # Only what the dropped daemon must write becomes its own; locks and the control
        # socket stay root's, so the unprivileged uid cannot be driven by other processes.
        audit_files = [str(f) for f in Path(AUDIT_DIR).iterdir()]
        for p in [SESSIONS, AUDIT, AUDIT + ".1", AUDIT_DIR, *audit_files, *(str(d) for d in Path(SESSIONS).iterdir())]:
            os.lchown(p, uid, gid)
    control = bind_unix(Path(CONTROL), 0o600)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # ~6 fds per relayed connection

    if args.detach:
        if os.fork() > 0:
            os._exit(0)  # the control socket is already listening: the manager may talk now
        os.setsid()
    Path(PID_FILE).write_text(f"{os.getpid()}\n")
    drop_privileges(uid, gid)
    daemon = Daemon(state, args.idle_exit, manager_lock, daemon_lock, control)
    evloop.run(daemon.run())  # uvloop unless SANDBOX_EGRESS_LOOP=asyncio
    return 0


if __name__ == "__main__":
    sys.exit(main())
