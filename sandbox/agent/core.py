"""The in-sandbox agent: PID 1 of the sandbox container (started by agent.py beside it).

Stdlib only: it runs with the image's python3. It reads one JSON request per
line on stdin (the container's attached stdin) and writes JSON events, one per
line, on stdout. That channel replaces a `docker exec` round trip per call.

The channel belongs to the agent alone:
- it is PID 1 of the sandbox's PID namespace and handles no signal, so the
  kernel drops every signal the workload sends it (SIGKILL and SIGSTOP included);
- it makes itself non-dumpable before it reads anything, so the workload (same
  uid) cannot open its /proc/1/{fd,mem,environ,...} entries;
- its children get only pipes of their own (close_fds) and a new session;
- every event carries an HMAC under a per-sandbox key the host sends as the
  first line, with a sequence number, so a forged or replayed frame that
  reached the host anyway is rejected there.

When its stdin closes (the controlling process on the host died or let go) or
the session time limit passes, the agent exits, and as PID 1 takes every
process of the sandbox with it: no sandbox outlives its owner.

The host still treats the agent as untrusted: every limit it applies here
(timeout, output cap) the host applies again on its side.

Requests: {"id": ID, "op": NAME, ...}. Events: "<mac> " + {"id": ID, "ev": KIND, ...}.
Ops: hello (first line only), ping, exec, stdin, cancel, plus the tool ops of tools.py.
"""

from __future__ import annotations

import binascii
import os
import sys
import time
import _signal as signal  # the C module: `signal` imports enum (2-5 ms of every start)
from _operator import _compare_digest as compare_digest  # what hmac.compare_digest is without OpenSSL

try:  # CPython's own SHA-256: hashlib would map OpenSSL into PID 1 (0.4 MiB private per sandbox)
    from _sha256 import sha256 as _sha256  # type: ignore[import-not-found]  # Python 3.11
except ImportError:  # pragma: no cover - other interpreters
    try:
        from _sha2 import sha256 as _sha256  # type: ignore[import-not-found,no-redef]  # Python 3.12+
    except ImportError:
        from hashlib import sha256 as _sha256  # type: ignore[no-redef]
# The tool ops (and `subprocess`, which they use) are imported on first use: an idle sandbox's agent
# stays small. Commands start through reaper.spawn_command, which needs no `subprocess`.
TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (memory of every sandbox)
if TYPE_CHECKING:
    import queue
    import subprocess

_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:  # agent.py put it there; run or imported otherwise, this does
    sys.path.insert(0, _here)
import reaper  # noqa: E402  (beside this file; the image's stdlib python has no package for it)
import threads  # noqa: E402  (threads on _thread: `import threading` cost 3-4 ms of every start)
import wire  # noqa: E402  (JSON on the C codec: `import json` cost 10-12 ms of every start)

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3
CHUNK = 64 * 1024
MAX_HELLO = 4096

_out_lock = threads.Lock()
_out = sys.stdout.buffer
_procs: dict[object, "reaper.Child | subprocess.Popen"] = {}
_procs_lock = threads.Lock()
_stdin_queues: dict[object, "queue.Queue[bytes | None]"] = {}
_key = b""
_seq = 0
_rseq = 0
_last_heard = time.monotonic()
MAC_HEX = 32


_inner = _outer = None  # HMAC-SHA256 state after the key's pads (RFC 2104), set by _set_key


def _set_key(key: bytes) -> None:
    global _key, _inner, _outer
    _key = key
    k = (_sha256(key).digest() if len(key) > 64 else key).ljust(64, b"\0")
    _inner = _sha256(bytes(b ^ 0x36 for b in k))
    _outer = _sha256(bytes(b ^ 0x5C for b in k))


def _mac(direction: bytes, seq: int, body: bytes) -> bytes:
    """HMAC-SHA256 over direction, sequence number and body, truncated (the host checks the same)."""
    inner = _inner.copy()  # type: ignore[attr-defined]
    inner.update(direction + seq.to_bytes(8, "big") + body)
    outer = _outer.copy()  # type: ignore[attr-defined]
    outer.update(inner.digest())
    return outer.hexdigest()[:MAC_HEX].encode()


_set_key(b"")


def emit(event: dict) -> None:
    global _seq
    body = wire.dumps(event).encode()
    with _out_lock:
        line = _mac(b"A", _seq, body) + b" " + body + b"\n"
        _seq += 1
        _out.write(line)
        _out.flush()


def _authentic(raw: bytes) -> bytes:
    """The body of a request line from the host; any line that fails ends the sandbox."""
    global _rseq, _last_heard
    got, _, body = raw.rstrip(b"\n").partition(b" ")
    if len(got) != MAC_HEX or not compare_digest(got, _mac(b"H", _rseq, body)):
        emit({"id": None, "ev": "violation", "message": "a request failed authentication"})
        os._exit(72)  # injected, replayed or stolen requests: nothing here is trustworthy any more
    _rseq += 1
    _last_heard = time.monotonic()
    return body


def _libc_prctl():
    """libc's prctl(2), bound on ctypes' C core (`_ctypes`) as the ctypes package binds it (a cdecl
    function returning a C int, arguments passed as C ints): importing the package (its thirty-odd
    type classes, struct, its endianness module) was 3-4 ms of every sandbox's start. Where that
    core differs, the package itself."""
    try:
        import _ctypes

        class _CInt(_ctypes._SimpleCData):
            _type_ = "i"

        class _CFunc(_ctypes.CFuncPtr):
            _flags_ = _ctypes.FUNCFLAG_CDECL
            _restype_ = _CInt

        class _Process:  # what CFuncPtr reads of a ctypes.CDLL: the handle of dlopen(NULL)
            _handle = _ctypes.dlopen(None)

        return _CFunc(("prctl", _Process()))
    except (ImportError, AttributeError, TypeError, OSError):
        import ctypes

        return ctypes.CDLL(None).prctl


def _harden_self() -> None:
    """Non-dumpable, and no signal handlers at all: fails closed (the agent exits)."""
    prctl = _libc_prctl()
    if prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 or prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) != 0:
        sys.stderr.write("agent: cannot make itself non-dumpable; refusing to run\n")
        os._exit(70)
    # Python installs a SIGINT handler; PID 1 with a handler would receive the workload's SIGINT.
    for sig in (signal.SIGINT,):
        signal.signal(sig, signal.SIG_DFL)


def _child_env(extra: dict | None) -> dict:
    env = dict(os.environ)
    if extra:
        env.update({str(k): str(v) for k, v in extra.items()})
    return env


def _kill_group(proc: "reaper.Child | subprocess.Popen", until_empty: float = 0.0) -> None:
    """SIGKILL the command's process group; with `until_empty`, again until the group is empty or
    that many seconds passed (on the command's own thread only: never on the channel's reader).

    One killpg can miss a child being forked at that instant (gVisor does not restart such a fork
    as Linux does): a fork bomb's survivors kept the sandbox at its process limit after the command
    ended. Reaping the dead between rounds lets the group empty (a zombie still answers killpg)."""
    deadline = time.monotonic() + until_empty
    while True:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            break
        proc.poll()
        reaper.reap_now()
        if time.monotonic() >= deadline:
            break
        time.sleep(0.01)
    reaper.reap_now()


def op_exec(req: dict) -> None:
    rid = req["id"]
    argv = req.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        _stdin_queues.pop(rid, None)
        emit({"id": rid, "ev": "error", "message": "argv must be a non-empty list of strings"})
        return
    timeout = float(req.get("timeout") or 120)
    max_output = int(req.get("max_output") or 1 << 20)
    stdin_data = binascii.a2b_base64(req["stdin"]) if req.get("stdin") else None
    stream_q = _stdin_queues.get(rid) if req.get("stdin_stream") else None
    started = time.monotonic()
    # Pipes and the threads that serve them exist before the command does: a command that forks
    # at once (a fork bomb) must not be able to spend the thread budget its own pumps need.
    feed_q = stream_q
    if stdin_data is not None:
        import queue  # with the first input given to a command: ~1 ms of every start otherwise

        feed_q = queue.Queue()
        feed_q.put(stdin_data)
        feed_q.put(None)
    pipes = [os.pipe(), os.pipe()] + ([os.pipe()] if feed_q is not None else [])
    box: list = [None]  # the command's process, once it exists
    sent = [0]
    limit: list[str | None] = [None]
    lock = threads.Lock()

    def kill() -> None:
        if box[0] is not None:
            _kill_group(box[0])

    def pump(fd_in: int, fd: int) -> None:
        with os.fdopen(fd_in, "rb", buffering=0) as stream:
            while True:
                chunk = stream.read(CHUNK)
                if not chunk:
                    return
                with lock:
                    room = max_output - sent[0]
                    if room <= 0:
                        if limit[0] is None:
                            limit[0] = "output"
                            kill()
                        continue
                    part = chunk[:room]
                    sent[0] += len(part)
                    if len(part) < len(chunk) and limit[0] is None:
                        limit[0] = "output"
                        kill()
                emit({"id": rid, "ev": "out", "fd": fd, "data": binascii.b2a_base64(part, newline=False).decode()})

    def feed(fd_out: int) -> None:
        broken = False
        with os.fdopen(fd_out, "wb", buffering=0) as sink:
            while True:
                chunk = feed_q.get()
                if chunk is None:
                    break
                if not broken:
                    try:
                        sink.write(chunk)
                    except OSError:
                        broken = True  # the command stopped reading; keep acking so the host never stalls
                if feed_q is stream_q:
                    emit({"id": rid, "ev": "stdin_ack", "n": len(chunk)})

    workers = [threads.Joinable(pump, pipes[0][0], 1), threads.Joinable(pump, pipes[1][0], 2)]
    if feed_q is not None:
        workers.append(threads.Joinable(feed, pipes[2][1]))
    started_threads = 0
    try:
        for t in workers:
            t.start()
            started_threads += 1
    except RuntimeError:
        pass
    child_ends = [pipes[0][1], pipes[1][1]] + ([pipes[2][0]] if feed_q is not None else [])
    if started_threads < len(workers):
        for fd in child_ends:
            os.close(fd)
        for i in range(started_threads, len(workers)):  # ends no thread will close
            os.close(pipes[i][0] if i < 2 else pipes[2][1])
        _stdin_queues.pop(rid, None)
        if feed_q is not None:
            feed_q.put(None)
        emit({"id": rid, "ev": "error", "message": "cannot start: the sandbox reached its process limit"})
        return
    try:
        for attempt in range(4):
            try:
                proc = reaper.spawn_command(  # a new session, no fd but its pipes, signals restored
                    argv, cwd=req.get("cwd") or None, env=_child_env(req.get("env")),
                    stdin=pipes[2][0] if feed_q is not None else None, stdout=pipes[0][1], stderr=pipes[1][1],
                )
                break
            except BlockingIOError:  # EAGAIN: zombies of a killed bomb may still hold the pids budget
                if attempt == 3:
                    raise
                reaper.reap_now()
                time.sleep(0.05 * (attempt + 1))
    except OSError as e:
        for fd in child_ends:
            os.close(fd)
        _stdin_queues.pop(rid, None)
        if feed_q is not None:
            feed_q.put(None)
        emit({"id": rid, "ev": "exit", "code": 127 if e.errno == 2 else 126, "signal": None,
              "error": f"{argv[0]}: {e.strerror}", "limit": None, "truncated": False,
              "duration": time.monotonic() - started})
        return
    for fd in child_ends:
        os.close(fd)  # the command holds its own copies
    box[0] = proc
    if limit[0] == "output":
        kill()  # the cap was hit before the process was known
    with _procs_lock:
        _procs[rid] = proc
    pumps = workers[:2]
    if not reaper.wait_exit(proc, timeout):
        limit[0] = limit[0] or "timeout"
        _kill_group(proc, until_empty=2.0)
        proc.wait()
    # Processes that left the group (setsid, double fork) still hold the pipes open;
    # do not wait on them forever.
    for t in pumps:
        t.join(timeout=2)
    if any(t.is_alive() for t in pumps):
        _kill_group(proc, until_empty=2.0)
    with _procs_lock:
        _procs.pop(rid, None)
    q = _stdin_queues.pop(rid, None)
    if q is not None:
        q.put(None)
    code = proc.returncode
    emit({"id": rid, "ev": "exit", "code": code if code >= 0 else 128 - code,
          "signal": -code if code < 0 else None, "limit": limit[0], "truncated": limit[0] == "output",
          "duration": time.monotonic() - started})


def op_cancel(req: dict) -> None:
    with _procs_lock:
        proc = _procs.get(req.get("target"))
    if proc is not None:
        _kill_group(proc)
    emit({"id": req["id"], "ev": "done"})


def op_stdin(req: dict) -> None:
    """A chunk of a streamed stdin (handled in order, on the reading thread)."""
    q = _stdin_queues.get(req.get("target"))
    if q is None:
        return
    if req.get("eof"):
        q.put(None)
        return
    try:
        q.put(binascii.a2b_base64(req.get("data") or ""))
    except (ValueError, TypeError):
        q.put(None)


def op_ping(req: dict) -> None:
    emit({"id": req["id"], "ev": "pong", "pid": os.getpid(), "uid": os.getuid()})


def op_beat(req: dict) -> None:
    """The host is alive (authenticated like every request; nothing to answer)."""


OPS = {"exec": op_exec, "cancel": op_cancel, "ping": op_ping}
INLINE_OPS = {"stdin": op_stdin, "beat": op_beat}  # order matters: run on the reading thread


_tools_loaded = False


def _load_tool_ops() -> bool:
    """Import the tool ops (on the first op that is not built in); True if this call loaded them."""
    global _tools_loaded
    if _tools_loaded:
        return False
    _tools_loaded = True
    try:
        import tools  # type: ignore[import-not-found]
    except ImportError:
        return False
    for name, fn in getattr(tools, "OPS", {}).items():
        OPS.setdefault(name, _wrap_tool(fn))
    return True


def _wrap_tool(fn):
    def run(req: dict) -> None:
        try:
            result = fn(req)
        except Exception as e:  # noqa: BLE001 - a tool failure is a result, not an agent crash
            emit({"id": req["id"], "ev": "result", "ok": False, "error": f"{type(e).__name__}: {e}"})
            return
        emit({"id": req["id"], "ev": "result", "ok": True, "value": result})
    return run


def _start_forwarder() -> None:
    sock = "/run/sandbox-egress/proxy.sock"
    if not os.path.exists(sock):
        return
    try:
        import forwarder  # type: ignore[import-not-found]
    except ImportError:
        return
    threads.start(forwarder.serve, listen_port=3128, socket_path=sock)


def _read_hello() -> tuple[float, float | None]:
    """The first line: the per-sandbox MAC key, the session time limit and the watchdog period.
    Nothing of the workload exists before it is read."""
    raw = sys.stdin.buffer.readline(MAX_HELLO)
    try:
        hello = wire.loads(raw)
        key = bytes.fromhex(hello["key"])
        session_s = float(hello["session_s"])
        watchdog = hello.get("watchdog_s")
        watchdog_s = float(watchdog) if watchdog is not None else None
        if hello.get("op") != "hello" or len(key) < 16 or not session_s > 0 or (watchdog_s is not None and not watchdog_s > 0):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        sys.stderr.write("agent: no valid hello from the host; exiting\n")
        os._exit(71)
    _set_key(key)
    return session_s, watchdog_s


def _watchdog(period: float) -> None:
    """Exit when the host has not been heard from for ``period`` seconds (it sends beats).
    Under gVisor a workload can hold the agent's stdin open, so EOF alone cannot tell."""
    while True:
        time.sleep(min(1.0, period / 4))
        if time.monotonic() - _last_heard > period:
            os._exit(0)


def _expire_after(seconds: float) -> None:
    time.sleep(seconds)
    emit({"id": None, "ev": "expired"})
    os._exit(0)  # PID 1 exits: the kernel kills every process of the sandbox


def main() -> None:
    _harden_self()
    session_s, watchdog_s = _read_hello()
    reaper.start()
    threads.start(_expire_after, session_s)
    if watchdog_s:
        threads.start(_watchdog, watchdog_s)
    _start_forwarder()
    emit({"id": None, "ev": "ready", "pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid()})
    for raw in sys.stdin.buffer:
        body = _authentic(raw)
        try:
            req = wire.loads(body)
            name = req["op"]
            inline = INLINE_OPS.get(name)
            op = OPS.get(name) if inline is None else inline
            if op is None and _load_tool_ops():
                op = OPS.get(name)
            if op is None:
                raise KeyError(name)
            req.setdefault("id", None)
        except (ValueError, KeyError, TypeError):
            emit({"id": None, "ev": "error", "message": "malformed request"})
            continue
        if inline is not None:
            _safe(inline, req)
            continue
        if op is op_exec and req.get("stdin_stream"):
            import queue

            _stdin_queues[req.get("id")] = queue.Queue()
        try:
            _start_thread(op, req)
        except RuntimeError:
            # The sandbox's process/thread budget is spent (a fork bomb): answer instead
            # of dying, so the host can still cancel and report.
            _stdin_queues.pop(req.get("id"), None)
            if op in (op_cancel, op_ping):
                _safe(op, req)
            else:
                emit({"id": req.get("id"), "ev": "error", "message": "cannot start: the sandbox reached its process limit"})
    # stdin closed: the host let go of this sandbox. Exiting as PID 1 ends everything in it.
    os._exit(0)


def _start_thread(op, req: dict) -> None:
    """A thread per request; when the pids budget is spent, reap what a killed bomb left and retry."""
    for attempt in range(4):
        try:
            threads.start(_safe, op, req)
            return
        except RuntimeError:
            if attempt == 3:
                raise
            reaper.reap_now()
            time.sleep(0.05 * (attempt + 1))


def _safe(op, req: dict) -> None:
    try:
        op(req)
    except Exception as e:  # noqa: BLE001
        emit({"id": req.get("id"), "ev": "error", "message": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
    main()
