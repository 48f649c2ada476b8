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
import threading
import time
import weakref

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (memory of every sandbox)
if TYPE_CHECKING:
    import subprocess

_lock = threading.Lock()
_known: dict[int, "weakref.ref[subprocess.Popen[bytes]]"] = {}
_wake = threading.Event()
POLL_S = 0.05  # one waitid() per tick while a registered child's zombie waits for its owner
IDLE_S = 5.0  # while it has none (spawn() wakes the reaper at once)


def spawn(argv: list[str], **kwargs: object) -> "subprocess.Popen[bytes]":
    """subprocess.Popen, registered so the reaper leaves this child to its caller."""
    import subprocess  # on the first command, not at the agent's start

    with _lock:
        proc: subprocess.Popen[bytes] = subprocess.Popen(argv, **kwargs)  # type: ignore[call-overload]
        _known[proc.pid] = weakref.ref(proc)
    _wake.set()
    return proc


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
        _wake.clear()


def start() -> None:
    threading.Thread(target=_loop, name="reaper", daemon=True).start()
