"""The agent's command start and its threads, on the host's interpreter (no Docker).

sandbox/agent/reaper.py spawn_command makes the `_posixsubprocess.fork_exec` call Popen makes
(CPython 3.11, the image's python3) without importing `subprocess`; here each case is run both
ways and must come out the same. sandbox/agent/threads.py stands in for `threading` in the agent.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

AGENT_DIR = Path(__file__).resolve().parents[2] / "sandbox" / "agent"
FAST_PATH = sys.version_info[:2] == (3, 11)


@pytest.fixture(scope="module")
def agent_mods() -> Any:
    sys.path.insert(0, str(AGENT_DIR))  # as in the sandbox: the agent's modules import each other by name
    try:
        import reaper
        import threads

        yield reaper, threads
    finally:
        sys.path.remove(str(AGENT_DIR))


@pytest.fixture
def reaper(agent_mods: Any) -> ModuleType:
    return agent_mods[0]


def _start(reaper: ModuleType, argv: list[str], cwd: str | None = None, env: dict[str, str] | None = None,
           stdin: int | None = None) -> tuple[Any, bytes]:
    """spawn_command with stdout and stderr on one pipe: (the process, its output)."""
    r, w = os.pipe()
    try:
        proc = reaper.spawn_command(argv, cwd=cwd, env=env if env is not None else dict(os.environ),
                                    stdin=stdin, stdout=w, stderr=w)
    finally:
        os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    return proc, out


def _popen(argv: list[str], cwd: str | None = None, env: dict[str, str] | None = None) -> tuple[int, bytes]:
    p = subprocess.run(argv, cwd=cwd, env=env if env is not None else dict(os.environ), stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
    return p.returncode, p.stdout


def _error(fn: Any) -> OSError:
    with pytest.raises(OSError) as ei:
        fn()
    return ei.value


def test_a_command_that_cannot_start_raises_what_popen_raises(reaper: ModuleType, tmp_path: Path) -> None:
    data = tmp_path / "data.txt"
    data.write_text("not a program\n")
    cases = [(["no-such-command-here"], None), (["/no/such/dir/cmd"], None), (["true"], "/no/such/dir"),
             ([str(data)], None), ([str(tmp_path)], None)]
    for argv, cwd in cases:
        want = _error(lambda: _popen(argv, cwd))
        got = _error(lambda: _start(reaper, argv, cwd))
        assert (type(got), got.errno, got.strerror, got.filename) == \
            (type(want), want.errno, want.strerror, want.filename), (argv, cwd)
    assert reaper._fork_exec_ok is FAST_PATH  # the fast path was taken, not the Popen fallback


def test_a_command_starts_as_popen_starts_it(reaper: ModuleType) -> None:
    """Same signal dispositions (Python's ignored SIGPIPE and SIGXFSZ restored), a session of its own,
    no descriptor of the agent's but its pipes, stdin on /dev/null, the environment and cwd given."""
    leak = os.open("/dev/null", os.O_RDONLY)
    os.set_inheritable(leak, True)  # close_fds must close even an inheritable descriptor
    try:
        probe = ["sh", "-c", "grep -E '^Sig(Ign|Blk)' /proc/self/status; ls /proc/$$/fd | sort -n | tr '\\n' ' '; "
                 "echo; readlink /proc/$$/fd/0; pwd; echo \"$A\"; "
                 "python3 -c 'import os; print(os.getsid(0) == os.getppid())'"]
        env = dict(os.environ, A="b=c")
        proc, out = _start(reaper, probe, cwd="/tmp", env=env)
        assert proc.wait() == 0, out
        code, want = _popen(probe, cwd="/tmp", env=env)
        assert (0, out) == (code, want)
        assert str(leak) not in out.decode().splitlines()[2].split(), out
        assert out.decode().splitlines()[-1] == "True", out  # its own session (sh leads it)
        assert isinstance(proc, reaper.Child) is FAST_PATH
    finally:
        os.close(leak)


def test_exit_codes_signals_and_the_timed_wait(reaper: ModuleType) -> None:
    proc, _ = _start(reaper, ["sh", "-c", "exit 7"])
    assert reaper.wait_exit(proc, 30) and proc.returncode == 7
    proc, _ = _start(reaper, ["sh", "-c", "kill -TERM $$"])
    assert reaper.wait_exit(proc, 30) and proc.returncode == -15
    r, w = os.pipe()
    try:
        slow = reaper.spawn_command(["sleep", "30"], cwd=None, env=dict(os.environ), stdin=None, stdout=w, stderr=w)
    finally:
        os.close(w)
        os.close(r)
    assert not reaper.wait_exit(slow, 0.2) and slow.poll() is None
    os.killpg(slow.pid, 9)
    assert reaper.wait_exit(slow, 30) and slow.returncode == -9
    assert reaper.wait_exit(slow, 0)  # already collected: at once, and the pid is not looked at again


def test_threads_join_with_a_timeout_and_a_wake_up_is_never_lost(agent_mods: Any) -> None:
    _, threads = agent_mods
    gate = threads.Lock()
    gate.acquire()
    t = threads.Joinable(gate.acquire)
    t.start()
    t.join(timeout=0.05)
    assert t.is_alive()  # join returned at its timeout, the thread still waits
    gate.release()
    t.join(timeout=30)
    assert not t.is_alive()
    wake = threads.Wake()
    assert not wake.wait(0.01)
    wake.set()
    wake.set()  # twice: one call, as with an Event
    assert wake.wait(0.01)
    assert not wake.wait(0.01)  # the wait took it (Event.wait then clear)
    woke: list[bool] = []
    threads.start(lambda: woke.append(wake.wait(30)))
    time.sleep(0.05)
    wake.set()
    deadline = time.monotonic() + 30
    while not woke and time.monotonic() < deadline:
        time.sleep(0.01)
    assert woke == [True]
