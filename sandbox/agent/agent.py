"""The in-sandbox agent: the sandbox container's main process (under docker-init).

Stdlib only: it runs with the image's python3. It reads one JSON request per
line on stdin (the container's attached stdin) and writes JSON events, one per
line, on stdout. That channel replaces a `docker exec` round trip per call.

The agent runs as the sandbox uid like everything else in the container, so
the host treats it as untrusted: every limit it applies here (timeout, output
cap) the host applies again on its side. It makes itself non-dumpable so code
it runs cannot open its /proc/<pid>/fd entries and inject frames.

Requests: {"id": ID, "op": NAME, ...}. Events: {"id": ID, "ev": KIND, ...}.
Ops: ping, exec, cancel, plus the tool ops registered by tools.py, if present.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time

PR_SET_DUMPABLE = 4
CHUNK = 64 * 1024

_out_lock = threading.Lock()
_out = sys.stdout.buffer
_procs: dict[object, subprocess.Popen] = {}
_procs_lock = threading.Lock()


def emit(event: dict) -> None:
    line = (json.dumps(event, separators=(",", ":")) + "\n").encode()
    with _out_lock:
        _out.write(line)
        _out.flush()


def _harden_self() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    except Exception:  # noqa: BLE001 - best effort; the host does not rely on it
        pass


def _child_env(extra: dict | None) -> dict:
    env = dict(os.environ)
    if extra:
        env.update({str(k): str(v) for k, v in extra.items()})
    return env


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def op_exec(req: dict) -> None:
    rid = req["id"]
    argv = req.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        emit({"id": rid, "ev": "error", "message": "argv must be a non-empty list of strings"})
        return
    timeout = float(req.get("timeout") or 120)
    max_output = int(req.get("max_output") or 1 << 20)
    stdin_data = base64.b64decode(req["stdin"]) if req.get("stdin") else None
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv, cwd=req.get("cwd") or None, env=_child_env(req.get("env")),
            stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
        )
    except OSError as e:
        emit({"id": rid, "ev": "exit", "code": 127 if e.errno == 2 else 126, "signal": None,
              "error": f"{argv[0]}: {e.strerror}", "limit": None, "truncated": False,
              "duration": time.monotonic() - started})
        return
    with _procs_lock:
        _procs[rid] = proc
    sent = [0]
    limit: list[str | None] = [None]
    lock = threading.Lock()

    def pump(stream, fd: int) -> None:
        while True:
            chunk = stream.read1(CHUNK) if hasattr(stream, "read1") else stream.read(CHUNK)
            if not chunk:
                return
            with lock:
                room = max_output - sent[0]
                if room <= 0:
                    if limit[0] is None:
                        limit[0] = "output"
                        _kill_group(proc)
                    continue
                part = chunk[:room]
                sent[0] += len(part)
                if len(part) < len(chunk) and limit[0] is None:
                    limit[0] = "output"
                    _kill_group(proc)
            emit({"id": rid, "ev": "out", "fd": fd, "data": base64.b64encode(part).decode()})

    pumps = [threading.Thread(target=pump, args=(proc.stdout, 1), daemon=True),
             threading.Thread(target=pump, args=(proc.stderr, 2), daemon=True)]
    try:
        for t in pumps:
            t.start()
    except RuntimeError:
        _kill_group(proc)
        proc.wait()
        with _procs_lock:
            _procs.pop(rid, None)
        emit({"id": rid, "ev": "error", "message": "cannot start: the sandbox reached its process limit"})
        return
    if stdin_data is not None:
        def feed() -> None:
            try:
                proc.stdin.write(stdin_data)
                proc.stdin.close()
            except OSError:
                pass
        try:
            threading.Thread(target=feed, daemon=True).start()
        except RuntimeError:
            proc.stdin.close()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        limit[0] = limit[0] or "timeout"
        _kill_group(proc)
        proc.wait()
    # Processes that left the group (setsid, double fork) still hold the pipes open;
    # do not wait on them forever.
    for t in pumps:
        t.join(timeout=2)
    if any(t.is_alive() for t in pumps):
        _kill_group(proc)
    with _procs_lock:
        _procs.pop(rid, None)
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


def op_ping(req: dict) -> None:
    emit({"id": req["id"], "ev": "pong", "pid": os.getpid(), "uid": os.getuid()})


OPS = {"exec": op_exec, "cancel": op_cancel, "ping": op_ping}


def _load_tool_ops() -> None:
    try:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import tools  # type: ignore[import-not-found]
    except ImportError:
        return
    for name, fn in getattr(tools, "OPS", {}).items():
        OPS.setdefault(name, _wrap_tool(fn))


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
    threading.Thread(target=forwarder.serve, kwargs={"listen_port": 3128, "socket_path": sock}, daemon=True).start()


def main() -> None:
    _harden_self()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    _load_tool_ops()
    _start_forwarder()
    emit({"id": None, "ev": "ready", "pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid()})
    for raw in sys.stdin.buffer:
        try:
            req = json.loads(raw)
            op = OPS[req["op"]]
            req.setdefault("id", None)
        except (ValueError, KeyError, TypeError):
            emit({"id": None, "ev": "error", "message": "malformed request"})
            continue
        try:
            threading.Thread(target=_safe, args=(op, req), daemon=True).start()
        except RuntimeError:
            # The sandbox's process/thread budget is spent (a fork bomb shares our uid):
            # answer instead of dying, so the host can still cancel and report.
            if op in (op_cancel, op_ping):
                _safe(op, req)
            else:
                emit({"id": req.get("id"), "ev": "error", "message": "cannot start: the sandbox reached its process limit"})


def _safe(op, req: dict) -> None:
    try:
        op(req)
    except Exception as e:  # noqa: BLE001
        emit({"id": req.get("id"), "ev": "error", "message": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
    main()
