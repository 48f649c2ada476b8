"""Child processes of the agent, which is PID 1 of its sandbox (stdlib only).

As PID 1 the agent inherits every orphan of the workload and must reap them, or
zombies fill the pids limit. It must not reap its *own* children, whose exit
status belongs to the thread that started them (``Popen.wait``). So every spawn
goes through :func:`spawn`, which registers the child under a lock, and the
reaper thread only collects zombies that are not registered.

No SIGCHLD handler is installed: PID 1 of a namespace receives only the signals
it handles, and the agent handles none, so the workload cannot signal it at all.
"""

from __future__ import annotations

import os
import sys
import time
from _weakref import ref as _ref  # weakref.ref, without the weakref module

import threads

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (memory of every sandbox)
if TYPE_CHECKING:
    import subprocess

_lock = threads.Lock()
_known: dict[int, "_ref[Child | subprocess.Popen[bytes]]"] = {}
_wake = threads.Wake()
POLL_S = 0.05  # one waitid() per tick while a registered child's zombie waits for its owner
IDLE_S = 5.0  # while it has none (spawn() wakes the reaper at once)


def spawn(argv: list[str], **kwargs: object) -> "subprocess.Popen[bytes]":
    """subprocess.Popen, registered so the reaper leaves this child to its caller."""
    import subprocess  # on the first command, not at the agent's start

    with _lock:
        proc: subprocess.Popen[bytes] = subprocess.Popen(argv, **kwargs)  # type: ignore[call-overload]
        _known[proc.pid] = _ref(proc)
    _wake.set()
    return proc


class Child:
    """A command started by :func:`spawn_command`: what the agent's exec needs of a Popen (pid, poll,
    wait, returncode), without importing `subprocess` (7-8 ms of a sandbox's first command: it
    imports locale, re, enum, signal, selectors) and without Popen's polling wait."""

    __slots__ = ("pid", "args", "returncode", "_lock", "__weakref__")

    def __init__(self, pid: int, args: list[str]):
        self.pid, self.args = pid, args
        self.returncode: int | None = None
        self._lock = threads.Lock()  # one waitpid at a time (as Popen's _waitpid_lock)

    def _collect(self, flags: int) -> None:
        try:
            pid, sts = os.waitpid(self.pid, flags)
        except ChildProcessError:
            self.returncode = 0  # someone else collected it (Popen does the same)
            return
        if pid == self.pid:
            self.returncode = os.waitstatus_to_exitcode(sts)

    def poll(self) -> int | None:
        if self.returncode is None and self._lock.acquire(False):
            try:
                if self.returncode is None:
                    self._collect(os.WNOHANG)
            finally:
                self._lock.release()
        return self.returncode

    def wait(self) -> int:
        with self._lock:
            if self.returncode is None:
                self._collect(0)
        return self.returncode  # type: ignore[return-value]


def wait_exit(proc: "Child | subprocess.Popen[bytes]", timeout: float) -> bool:
    """Wait until the child exits (True, its returncode set) or ``timeout`` seconds pass (False).

    A :class:`Child` is waited for on its pidfd, woken by its exit: Popen.wait(timeout) polls with
    sleeps that double up to 50 ms, which found a 12 ms command done after 15.5 ms and a 20 ms one
    after 31.5. Without pidfds (Linux < 5.3, a runtime without pidfd_open) it polls, 1 to 20 ms apart."""
    if not isinstance(proc, Child):  # Popen (spawn_command's fallback)
        import subprocess

        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    fd = -1
    with proc._lock:  # not collected yet, so the pid is still this child's (not reused)
        if proc.returncode is not None:
            return True
        try:
            fd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            pass
    if fd >= 0:
        try:
            import select  # a C module: microseconds

            if not select.select([fd], [], [], max(timeout, 0))[0]:
                return False
        finally:
            os.close(fd)
        proc.wait()
        return True
    deadline = time.monotonic() + timeout
    delay = 0.001
    while proc.poll() is None:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.02)
    return True


_fork_exec_ok = sys.version_info[:2] == (3, 11)  # the argument list below is 3.11's (the image's python3)


def spawn_command(argv: list[str], *, cwd: str | None, env: dict[str, str], stdin: int | None,
                  stdout: int, stderr: int) -> "Child | subprocess.Popen[bytes]":
    """``subprocess.Popen(argv, cwd=cwd, env=env, stdin=stdin or DEVNULL, stdout=stdout,
    stderr=stderr, start_new_session=True, close_fds=True)`` (restore_signals as its default),
    registered like :func:`spawn`: the same `_posixsubprocess.fork_exec` call Popen makes on
    CPython 3.11, and the same OSError (errno, strerror, filename) when the command cannot start.
    Elsewhere, or if that call's arguments do not match, Popen itself."""
    global _fork_exec_ok
    if _fork_exec_ok:
        try:
            import _posixsubprocess

            with _lock:
                proc = _fork_exec(_posixsubprocess.fork_exec, argv, cwd, env, stdin, stdout, stderr)
                _known[proc.pid] = _ref(proc)
            _wake.set()
            return proc
        except (ImportError, TypeError):
            _fork_exec_ok = False  # not the argument list this was written for: Popen from now on
    import subprocess

    return spawn(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL if stdin is None else stdin, stdout=stdout,
                 stderr=stderr, start_new_session=True, close_fds=True)


def _fork_exec(fork_exec: "object", argv: list[str], cwd: str | None, env: dict[str, str], stdin: int | None,
               stdout: int, stderr: int) -> Child:
    """Popen._execute_child's POSIX path for these arguments (CPython 3.11)."""
    env_list = []
    for k, v in env.items():
        kb = os.fsencode(k)
        if b"=" in kb:
            raise ValueError("illegal environment variable name")
        env_list.append(kb + b"=" + os.fsencode(v))
    exe = os.fsencode(argv[0])
    if os.path.dirname(exe):
        exe_list: tuple[bytes, ...] = (exe,)
    else:
        path = env.get("PATH")  # os.get_exec_path(env) for a dict of str (it imports warnings for bytes keys)
        dirs = (os.defpath if path is None else path).split(os.pathsep)
        exe_list = tuple(os.path.join(os.fsencode(d), exe) for d in dirs)
    devnull = os.open(os.devnull, os.O_RDWR) if stdin is None else -1
    errpipe_read, errpipe_write = os.pipe()
    try:
        low = []
        while errpipe_write < 3:
            low.append(errpipe_write)
            errpipe_write = os.dup(errpipe_write)
        for fd in low:
            os.close(fd)
        try:
            pid = fork_exec(  # type: ignore[operator]
                argv, exe_list, True, (errpipe_write,), cwd, env_list,
                devnull if stdin is None else stdin, -1, -1, stdout, -1, stderr,
                errpipe_read, errpipe_write,
                True, True, -1,  # restore_signals, call_setsid (start_new_session), no process group
                None, None, None, -1,  # gid, extra_groups, uid, umask: unchanged
                None, True)  # no preexec_fn; vfork allowed (Popen's default)
        finally:
            os.close(errpipe_write)
            if devnull >= 0:
                os.close(devnull)
        data = bytearray()
        while True:
            part = os.read(errpipe_read, 50000)
            data += part
            if not part or len(data) > 50000:
                break
    finally:
        os.close(errpipe_read)
    child = Child(pid, argv)
    if data:  # the child failed before or at exec: collect it, raise what Popen raises
        child.wait()
        try:
            name, hex_errno, msg = bytes(data).split(b":", 2)
            num = int(hex_errno, 16)
        except ValueError:
            raise OSError(0, f"bad exception data from child: {bytes(data)!r}") from None
        if name != b"OSError" or not num:  # fork_exec reports only OSErrors without a preexec_fn
            raise OSError(num, msg.decode("utf-8", "replace"))
        raise OSError(num, os.strerror(num), cwd if msg == b"noexec" else argv[0])
    return child


def _is_known(pid: int) -> bool:
    ref = _known.get(pid)
    proc = ref() if ref is not None else None
    if proc is None or proc.returncode is not None:
        _known.pop(pid, None)
        return False
    return True


def _zombie_children() -> list[int]:
    me = str(os.getpid())
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read().decode("ascii", "replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[0] == "Z" and fields[1] == me:
            found.append(int(name))
    return found


NO_CHILD, QUIET, OWNED = "no child", "quiet", "owned"


def _reap_unknown(block: bool = False) -> str:
    """Collect zombies that are not registered children. Returns NO_CHILD (PID 1 has none at all),
    OWNED (a registered child's zombie waits for its owner's wait(): it must be looked past, so the
    caller polls until it is collected) or QUIET (children, none of them a zombie any more).

    `block`: the first wait sleeps in the kernel until some child exits (WNOWAIT: nothing is taken
    from a registered child's owner), so a sandbox whose children just run costs no wake-ups."""
    flags = os.WEXITED | os.WNOWAIT
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, flags if block else flags | os.WNOHANG)
        except ChildProcessError:
            return NO_CHILD
        block = False
        if info is None:
            return QUIET
        with _lock:
            if not _is_known(info.si_pid):
                try:
                    os.waitpid(info.si_pid, os.WNOHANG)
                except ChildProcessError:
                    pass
                continue
            # The first zombie is one of ours, waiting for its owner: look past it.
            for pid in _zombie_children():
                if not _is_known(pid):
                    try:
                        os.waitpid(pid, os.WNOHANG)
                    except ChildProcessError:
                        pass
        return OWNED


def reap_now() -> None:
    """Collect orphans at once (after killing a process group: its zombies hold the pids limit)."""
    try:
        _reap_unknown()
    except Exception:  # noqa: BLE001
        pass


def _loop() -> None:
    state = OWNED
    while True:
        try:
            state = _reap_unknown(block=state == QUIET)
        except Exception:  # noqa: BLE001 - the reaper must outlive any surprise
            state = OWNED
            time.sleep(1)
        if state == QUIET:
            continue  # straight into a wait that sleeps until a child exits
        # No child at all (an idle sandbox): no orphan can exist either (orphans become PID 1's
        # children), so sleep until spawn() wakes us. A registered child's zombie: poll until its
        # owner collects it (a blocking wait would return at once for it).
        _wake.wait(POLL_S if state == OWNED else IDLE_S)


def start() -> None:
    threads.start(_loop)
