"""The host side of the agent channel: JSON lines over a container's attach stream.

Docker multiplexes the attached stdout/stderr into frames (8-byte header, then
payload); stdin is raw. One reader thread per sandbox demultiplexes the agent's
events to per-request queues. Everything read here comes from inside the
sandbox, so sizes are bounded and malformed input ends the channel instead of
being trusted.

Every line in both directions is ``<mac> <json>``: an HMAC-SHA256 (truncated to
128 bits) under a key made here for this sandbox alone and sent to the agent as
the first line of its stdin, over a direction byte, an 8-byte sequence number and
the JSON body. The workload cannot read the agent's memory (non-dumpable), and the
hello is read before any workload process exists, so it cannot learn the key. An
event that fails the check - forged, replayed, reordered or corrupted - ends the
channel with ``violation`` set, and the runtime destroys the sandbox: nothing that
comes from inside it is trusted after that. The agent likewise exits on a request
it cannot authenticate: under gVisor, whose /proc lets a same-uid process open
another's pipes, a workload could otherwise inject requests or steal them.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import queue
import secrets
import socket
import struct
import threading
from typing import Any, Callable

from sandbox import lazylog

log = lazylog.get(__name__)  # logging is imported when something is logged

MAX_LINE = 16 << 20  # one event; a 256 KiB file read is well under this after base64
MAX_DIAG = 64 << 10  # agent stderr kept for diagnostics
READ_CHUNK = 256 << 10  # one recv: what the attach stream has, up to this
MAC_HEX = 32
TO_AGENT, FROM_AGENT = b"H", b"A"


def mac(key: bytes, direction: bytes, seq: int, body: bytes) -> bytes:
    return hmac.new(key, direction + seq.to_bytes(8, "big") + body, hashlib.sha256).hexdigest()[:MAC_HEX].encode()


class ChannelClosed(Exception):
    """The agent is gone or broke the protocol."""


class AgentChannel:
    def __init__(self, sock: socket.socket, key: bytes | None = None):
        self._sock = sock
        self.key = key if key is not None else secrets.token_bytes(32)
        self._rseq = 0
        self._wseq = 0
        self._hello_sent = False
        self.violation = False
        self._wlock = threading.Lock()
        self._ids = itertools.count(1)
        self._queues: dict[int, queue.Queue[dict[str, Any] | None]] = {}
        self._qlock = threading.Lock()
        self.ready: queue.Queue[dict[str, Any]] = queue.Queue()
        self.closed = threading.Event()
        self.close_reason = ""
        self.diagnostics = bytearray()
        self.expired = False
        self._reader = threading.Thread(target=self._read_loop, name="agent-channel", daemon=True)
        self._reader.start()

    def hello(self, session_s: float, watchdog_s: float | None = None) -> None:
        """The first line the agent reads (the only one without a MAC): its key, the session time
        limit it enforces itself, and, when set, how long it lives without hearing from the host."""
        msg: dict[str, Any] = {"op": "hello", "key": self.key.hex(), "session_s": float(session_s)}
        if watchdog_s:
            msg["watchdog_s"] = float(watchdog_s)
        data = (json.dumps(msg, separators=(",", ":")) + "\n").encode()
        with self._wlock:
            if self._hello_sent:
                raise ChannelClosed("hello sent twice")
            self._hello_sent = True
            self._sendall(data)

    # -- requests
    def open_request(self) -> tuple[int, "queue.Queue[dict[str, Any] | None]"]:
        rid = next(self._ids)
        q: queue.Queue[dict[str, Any] | None] = queue.Queue()
        with self._qlock:
            if self.closed.is_set():
                raise ChannelClosed(self.close_reason or "channel closed")
            self._queues[rid] = q
        return rid, q

    def finish_request(self, rid: int) -> None:
        with self._qlock:
            self._queues.pop(rid, None)

    def send(self, msg: dict[str, Any]) -> None:
        body = json.dumps(msg, separators=(",", ":")).encode()
        with self._wlock:
            line = mac(self.key, TO_AGENT, self._wseq, body) + b" " + body + b"\n"
            self._wseq += 1
            self._sendall(line)

    def _sendall(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as e:
            self._close(f"send failed: {e.strerror}")
            raise ChannelClosed(self.close_reason) from None

    # -- reading
    def _read_loop(self) -> None:
        """Reads what the socket has (one recv, usually a whole frame or several) and demultiplexes it:
        one system call and one trip for the interpreter lock per wake-up, not two per frame."""
        pending = bytearray()  # the agent's stdout, frames joined: complete lines are dispatched
        header = bytearray()  # a frame header split across reads
        stream, left = 0, 0  # the current frame's stream and how much of its payload is still to come
        try:
            while True:
                chunk = self._sock.recv(READ_CHUNK)
                if not chunk:
                    raise EOFError
                i, n = 0, len(chunk)
                while i < n:
                    if left == 0:
                        take = min(8 - len(header), n - i)
                        header += chunk[i:i + take]
                        i += take
                        if len(header) < 8:
                            break
                        stream, left = header[0], struct.unpack(">I", header[4:])[0]
                        header.clear()
                        continue
                    take = min(left, n - i)
                    part = chunk[i:i + take]
                    i += take
                    left -= take
                    if stream == 2:
                        room = MAX_DIAG - len(self.diagnostics)
                        if room > 0:
                            self.diagnostics += part[:room]
                    else:
                        pending += part
                while True:
                    nl = pending.find(b"\n")
                    if nl < 0:
                        break
                    line = bytes(pending[:nl])
                    del pending[: nl + 1]
                    self._dispatch(line)
                if len(pending) > MAX_LINE:
                    raise ValueError("agent sent an oversized event")
        except EOFError:
            self._close("agent exited")
        except (OSError, ValueError) as e:
            self._close(f"channel error: {e}")

    def _authentic(self, line: bytes) -> bytes | None:
        got, _, body = line.partition(b" ")
        if len(got) != MAC_HEX or not hmac.compare_digest(got, mac(self.key, FROM_AGENT, self._rseq, body)):
            return None
        self._rseq += 1
        return body

    def _dispatch(self, line: bytes) -> None:
        body = self._authentic(line)
        if body is None:
            self.violation = True
            log.error("sandbox agent channel: a frame failed authentication (forged or corrupted); closing")
            raise ValueError("a frame failed authentication (forged, replayed or corrupted)")
        try:
            ev = json.loads(body)
            if not isinstance(ev, dict):
                raise ValueError
        except ValueError:
            log.warning("sandbox agent sent a malformed event (%d bytes)", len(body))
            return
        rid = ev.get("id")
        if rid is None:
            if ev.get("ev") == "ready":
                self.ready.put(ev)
            elif ev.get("ev") == "expired":
                self.expired = True
            elif ev.get("ev") == "violation":
                self.violation = True  # the agent refused a request it could not authenticate
            return
        with self._qlock:
            q = self._queues.get(rid) if isinstance(rid, int) else None
        if q is not None:
            q.put(ev)

    def _close(self, reason: str) -> None:
        with self._qlock:
            if self.closed.is_set():
                return
            self.close_reason = reason
            self.closed.set()
            queues = list(self._queues.values())
        for q in queues:
            q.put(None)
        self.ready.put({"ev": "closed"})

    def close_stdin(self) -> None:
        """End the agent's stdin (it then exits); events keep arriving until it has."""
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self._close("closed by host")
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self._sock.close()
        except OSError:
            pass

    # -- a request answered on the reader thread (added for the worker: no thread blocks waiting for it)
    def open_request_with(self, sink: Callable[[dict[str, Any] | None], None]) -> int:
        """Like `open_request`, but each event of the request (then None if the channel closes first) is
        handed to `sink` where a queue would get it: on the reader thread, or on the thread that closes the
        channel. `sink` must be quick; what it raises is logged, never allowed to end the reader. End the
        request with `finish_request`."""
        rid = next(self._ids)
        box = _SinkQueue(sink)
        with self._qlock:
            if self.closed.is_set():
                raise ChannelClosed(self.close_reason or "channel closed")
            self._queues[rid] = box  # type: ignore[assignment]  # duck-typed: only .put() is used
        return rid


class _SinkQueue:
    """What `open_request_with` registers in place of a queue: `put` calls the sink."""

    def __init__(self, sink: Callable[[dict[str, Any] | None], None]) -> None:
        self._sink = sink

    def put(self, ev: dict[str, Any] | None) -> None:
        try:
            self._sink(ev)
        except Exception:  # noqa: BLE001 - the reader thread must live on for the other requests
            log.exception("sandbox agent channel: a request's event handler failed")
