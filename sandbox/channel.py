"""The host side of the agent channel: JSON lines over a container's attach stream.

Docker multiplexes the attached stdout/stderr into frames (8-byte header, then
payload); stdin is raw. One reader thread per process (the hub, below) waits on
every channel's socket at once and demultiplexes each agent's events to that
channel's per-request queues. Everything read here comes from inside the
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

import contextlib
import hashlib
import hmac
import itertools
import json
import os
import queue
import secrets
import select
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
        # What the hub thread alone touches: the stream's parse state between reads.
        self._pending = bytearray()  # the agent's stdout, frames joined: complete lines are dispatched
        self._header = bytearray()  # a frame header split across reads
        self._stream, self._left = 0, 0  # the current frame's stream and how much of its payload is to come
        # The socket's fd is read by the hub while `_rlock` is held and closed by `close` only under it, so the
        # hub never reads a number that a closed channel's socket gave back and a new socket got again.
        self._rlock = threading.Lock()
        self._sock_closed = False
        self._fd = sock.fileno()
        # Who feeds the parser: the hub, or (after `read_on_loop`) an asyncio event loop's reader callback.
        # `_flock` is held by the hub for each read and its dispatch, so the hand-over never splits a read.
        self._flock = threading.Lock()
        self._loop: Any = None  # the event loop that reads this channel, once handed over
        self._on_loop = False  # the loop's reader is registered (changed on the loop thread only)
        self._hub = _the_hub()
        while not self._hub.add(self):  # that hub stopped just now (never seen): a new one
            self._hub = _the_hub()

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
        if self._loop is not None and self._loop.is_closed():
            self._back_to_hub()
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

    # -- reading (on the hub thread: `_Hub._serve` does the recv and calls `_feed`, then `_close` at the end)
    def _recv(self) -> bytes | None:
        """One non-blocking read of what the socket has (usually a whole frame or several): b"" at EOF, None
        if nothing is there (a stale wake-up) or the host closed the socket. The socket itself stays
        blocking for `send`; only this read does not wait."""
        with self._rlock:
            if self._sock_closed:
                return None
            try:
                return self._sock.recv(READ_CHUNK, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return None

    def _feed(self, chunk: bytes) -> None:
        """Demultiplexes one read: frames to stdout lines (each authenticated and dispatched in order) or to
        diagnostics. Raises ValueError on a frame that fails authentication or an oversized event: the
        channel then ends, and nothing after that frame is delivered."""
        pending, header = self._pending, self._header
        stream, left = self._stream, self._left
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
        self._stream, self._left = stream, left
        while True:
            nl = pending.find(b"\n")
            if nl < 0:
                break
            line = bytes(pending[:nl])
            del pending[: nl + 1]
            self._dispatch(line)
        if len(pending) > MAX_LINE:
            raise ValueError("agent sent an oversized event")

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
            if self.closed.is_set():
                return  # closed by the host while this read was under way: its requests have had their None
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
        # Not while the hub reads it (a read does not wait: this is short). In a forked child no hub reads
        # it, and the lock may have been held by the parent's hub thread at the fork. Under `_rlock` too:
        # who reads it (the hub or a loop, see `read_on_loop`) is decided here once.
        with self._rlock if self._hub.pid == os.getpid() else contextlib.nullcontext():
            on_loop = self._loop is not None and self._hub.pid == os.getpid()
            if on_loop:
                self._close_wanted = True  # closed by the loop once it has let go of the descriptor
            else:
                self._hub.remove(self)  # before the fd can be closed and its number given to another socket
                self._sock_closed = True
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            if not on_loop:
                try:
                    self._sock.close()
                except OSError:
                    pass
        if on_loop:
            self._close_on_loop()

    # -- reading on an asyncio event loop (the worker: events reach its tasks with no thread hop)
    def read_on_loop(self, loop: Any) -> bool:
        """From now on, read this channel on `loop` (`loop.add_reader` on its socket) instead of the hub
        thread: the same `_feed` and dispatch, so sinks (`open_request_with`) then run on the loop thread.
        Call it on `loop`'s thread. Each wake-up reads at most READ_CHUNK, as the hub does, so a flooding
        sandbox cannot hold the loop; whatever goes wrong with this channel (EOF, a forged frame, an
        oversized or unparsable event) ends this channel only. False if the channel has ended or the hub
        is not this process's (a forked child): it stays where it was. Once moved it stays on `loop` until
        that loop is closed; then the hub reads it again (at its next request or hand-over)."""
        if self._loop is not None and self._loop.is_closed():
            self._back_to_hub()
        if self._loop is not None:
            return self._loop is loop
        if self._hub.pid != os.getpid():
            return False
        # `_flock`: the hub is not between a read of this channel and its dispatch; `_rlock`: `close` has
        # either closed the socket already or will see that a loop reads it.
        with self._flock, self._rlock:
            if self.closed.is_set() or self._sock_closed:
                return False
            self._hub.remove(self)
            self._loop = loop
            self._on_loop = True
            loop.add_reader(self._fd, self._loop_readable)
        # A hub read taken before the hand-over has been dispatched (under `_flock`); bytes that arrived
        # since are still in the socket and make it readable for the loop.
        return True

    def _back_to_hub(self) -> None:
        """The loop that read this channel is closed (its selector with it): the hub reads it again, so a
        sandbox that outlives the loop (the sync API after `asyncio.run` returned) is still answered."""
        with self._flock:
            if self._loop is None or not self._loop.is_closed():
                return
            self._loop, self._on_loop = None, False
            if self.closed.is_set():
                if self._close_wanted:
                    self._release_socket()
                return
            self._hub = _the_hub()
            while not self._hub.add(self):
                self._hub = _the_hub()

    def _loop_readable(self) -> None:
        """The loop's reader callback: one non-blocking read and its dispatch, as `_Hub._serve` does."""
        if self.closed.is_set():
            self._leave_loop()
            return
        reason = self._read_once()
        if reason is not None:
            self._leave_loop()
            self._close(reason)

    def _read_once(self) -> str | None:
        """One non-blocking read and its dispatch (the hub's and the loop's); why the channel must end
        (EOF, a read error, an event that fails to parse or dispatch), or None."""
        try:
            chunk = self._recv()
            if chunk is None:
                return None  # nothing there after all, or the host has closed it
            if chunk:
                self._feed(chunk)
                return None
            return "agent exited"
        except (OSError, ValueError) as e:
            return f"channel error: {e}"
        except Exception as e:  # noqa: BLE001 - e.g. a RecursionError from an absurdly nested event
            log.exception("sandbox agent channel: reading an event failed; closing")
            return f"channel error: {type(e).__name__}: {str(e)[:200]}"

    def _leave_loop(self) -> None:
        """On the loop thread: stop reading; close the socket if the host asked for it meanwhile."""
        if self._on_loop:
            self._on_loop = False
            try:
                self._loop.remove_reader(self._fd)
            except (OSError, ValueError, RuntimeError):
                pass
        if self._close_wanted:
            self._release_socket()

    _close_wanted = False

    def _close_on_loop(self) -> None:
        """The rest of `close` for a channel read by a loop: the socket is shut down (the agent sees EOF, no
        more events are dispatched: the channel is closed), and its descriptor is closed only once it has
        left the loop's selector, on the loop thread, so the number is never reused under a registered
        reader."""
        import asyncio  # loaded already: a loop reads this channel (not imported by the CLI's path)

        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._leave_loop()
            return
        try:
            loop.call_soon_threadsafe(self._leave_loop)
        except RuntimeError:  # the loop is closed: its selector is gone, nothing reads this descriptor
            self._on_loop = False
            self._release_socket()

    def _release_socket(self) -> None:
        with self._rlock:
            if self._sock_closed:
                return
            self._sock_closed = True
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
        if self._loop is not None and self._loop.is_closed():
            self._back_to_hub()
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


class _Hub:
    """One daemon thread and one epoll set read every channel of this process: N sandboxes cost one thread,
    and a burst of events from several sandboxes is read and dispatched in one wake-up of one thread (a
    thread per channel made the event loop hand the interpreter lock to each of them in turn).

    Each wake-up serves every ready channel once: one non-blocking read of up to READ_CHUNK, then that
    channel's frame parsing, HMAC checks and dispatch, exactly as a thread of its own did. Whatever goes
    wrong with one channel - EOF, a read error, a forged frame, an oversized event, a bug - ends that
    channel only (`AgentChannel._close`), and the hub serves the others on. A sink (`open_request_with`)
    runs on this thread, so a slow one delays every other sandbox's events: sinks must stay cheap (the
    runtime's and the worker's store the outcome and wake the caller's loop, nothing more), and an
    exception from one is logged, never allowed to stop the hub.

    The hub starts with the first channel. After `os.fork()` the child has no hub thread: its copies of
    the parent's channels stay unread (as they did with a thread per channel, which a fork did not copy
    either), the parent's epoll set is never touched from the child (it is shared with the parent), and a
    channel the child creates gets a hub of its own. Nothing in the project forks after channels exist
    (the egress daemon forks at its own start, subprocesses exec at once); the tests check the hand-over.
    At interpreter exit the daemon thread simply stops, as the per-channel threads did."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.alive = True
        self._ep = select.epoll()
        self._lock = threading.Lock()  # the fd map and the epoll set change together
        self._chans: dict[int, AgentChannel] = {}  # fd -> the channel read through it
        self._thread = threading.Thread(target=self._run, name="agent-channels", daemon=True)
        self._thread.start()

    def add(self, ch: AgentChannel) -> bool:
        """Start reading `ch`; False if this hub has stopped (take another)."""
        stale = None
        with self._lock:
            if not self.alive:
                return False
            stale = self._chans.pop(ch._fd, None)
            if stale is not None:
                # Its socket was closed without `close()` and the number given to this one: it can
                # never be read again (a thread of its own would have failed its read the same way).
                try:
                    self._ep.unregister(ch._fd)
                except OSError:
                    pass
            try:
                self._ep.register(ch._fd, select.EPOLLIN)
                self._chans[ch._fd] = ch
                failed = None
            except (OSError, ValueError) as e:  # e.g. a socket closed already: as a thread's first read would
                failed = e
        if stale is not None:
            stale._close("channel error: its socket was closed under it")
        if failed is not None:
            ch._close(f"channel error: {failed}")
        return True

    def remove(self, ch: AgentChannel) -> None:
        """Stop reading `ch` (at its EOF or error, or before `close` closes the socket). Idempotent."""
        if os.getpid() != self.pid:
            return  # a forked child: the epoll set is the parent's
        with self._lock:
            if self._chans.get(ch._fd) is not ch:
                return  # removed already; the number may be another channel's now
            del self._chans[ch._fd]
            try:
                self._ep.unregister(ch._fd)
            except (OSError, ValueError):
                pass

    def _run(self) -> None:
        try:
            while True:
                events = self._ep.poll()
                with self._lock:
                    ready = [self._chans.get(fd) for fd, _ in events]
                for ch in ready:
                    if ch is None:
                        continue  # removed since the wait ended
                    try:
                        self._serve(ch)
                    except Exception:  # noqa: BLE001 - never seen: `_serve` ends the channel on any error
                        log.exception("sandbox agent channel: the reader failed on one channel")
        except BaseException as e:  # noqa: BLE001 - the epoll set itself failed (never seen)
            self._fail(e)

    def _serve(self, ch: AgentChannel) -> None:
        """One read from `ch` and its dispatch; on EOF or any error, `ch` ends and is no longer read."""
        with ch._flock:
            if ch._loop is None:  # not handed over to an event loop since the wait ended
                self._serve_locked(ch)

    def _serve_locked(self, ch: AgentChannel) -> None:
        reason = ch._read_once()
        if reason is not None:
            self.remove(ch)
            ch._close(reason)

    def _fail(self, e: BaseException) -> None:
        with self._lock:
            self.alive = False
            chans = list(self._chans.values())
            self._chans.clear()
        log.error("sandbox agent channel: the channel reader stopped (%s: %s); closing %d channels",
                  type(e).__name__, e, len(chans))
        for ch in chans:
            ch._close(f"channel error: the channel reader stopped: {type(e).__name__}")

    def _abandon(self) -> None:
        """In a forked child: no thread reads for this hub here; leave the parent's epoll set alone."""
        self.alive = False
        self._chans = {}
        try:
            self._ep.close()  # the child's descriptor only: the parent's set lives on
        except OSError:
            pass


_HUB: _Hub | None = None
_HUB_LOCK = threading.Lock()


def _the_hub() -> _Hub:
    global _HUB
    hub = _HUB
    if hub is not None and hub.alive:
        return hub
    with _HUB_LOCK:
        if _HUB is None or not _HUB.alive:
            _HUB = _Hub()
        return _HUB


def _after_fork_in_child() -> None:
    global _HUB, _HUB_LOCK
    _HUB_LOCK = threading.Lock()  # another thread may have held it at the fork
    hub, _HUB = _HUB, None
    if hub is not None:
        hub._abandon()


os.register_at_fork(after_in_child=_after_fork_in_child)
