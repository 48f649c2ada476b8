"""In-sandbox egress forwarder: 127.0.0.1:3128 -> /run/sandbox-egress/proxy.sock.

STDLIB ONLY: this file is copied into the sandbox image, which has python3 and
nothing else. The sandbox has no network interface but ``lo``; this is how
HTTP_PROXY=http://127.0.0.1:3128 reaches the host's egress proxy. It relays
bytes and nothing more: it is as untrusted as everything else in the sandbox,
and every rule is enforced by the proxy on the other end of the socket.

One thread, one epoll loop, non-blocking sockets: no thread per connection to
start (the sandbox's pids limit counts threads) and no GIL ping-pong with the
agent it runs beside. Bytes move socket -> pipe -> socket with splice(2) where
available, so they are never copied through Python; each direction holds at
most one pipe (or _BUF bytes) in flight, so a slow reader throttles its writer.
"""

from __future__ import annotations

import fcntl
import os
import selectors
import socket
import sys
import time

_BUF = 256 * 1024  # per direction per connection: the most we hold in flight
_MAX_CONNS = 64  # the proxy enforces the real per-session limit; this just bounds fds
_SPLICE = hasattr(os, "splice")
_FLAGS = (getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)) if _SPLICE else 0
_MSG = b"sandbox egress proxy is not reachable from this sandbox\n"
_UNAVAILABLE = (
    b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nConnection: close\r\n"
    b"X-Sandbox-Egress-Error: proxy-unavailable\r\nContent-Length: %d\r\n\r\n%s" % (len(_MSG), _MSG)
)


class _Pump:
    """One direction of one connection: src -> dst."""

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src, self.dst = src, dst
        self.eof = False  # src said EOF
        self.done = False  # ... and everything was flushed and dst write-shut
        self.pending = 0  # bytes waiting in the pipe (splice mode)
        self.buf = b""  # bytes waiting (copy mode)
        self.pipe: tuple[int, int] | None = None
        self.cap = _BUF  # most bytes in flight (the pipe's real capacity in splice mode)
        # A pipe counts slots, not bytes: small socket fragments can fill it below cap. Then
        # splice says EAGAIN while the socket stays readable, so stop reading until a write
        # drains something, or the loop would spin.
        self.full = False
        if _SPLICE:
            try:
                self.pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:  # out of fds: this connection copies instead
                self.pipe = None
            else:
                try:  # room for _BUF in the pipe (default 64 KiB): fewer wake-ups per MiB
                    self.cap = min(_BUF, fcntl.fcntl(self.pipe[1], getattr(fcntl, "F_SETPIPE_SZ", 1031), _BUF))
                except OSError:
                    self.cap = 65536  # never ask the pipe for more than it holds: EAGAIN would spin

    def queued(self) -> int:
        return self.pending if self.pipe else len(self.buf)

    def wants_read(self) -> bool:
        return not self.eof and not self.full and self.queued() < self.cap

    def wants_write(self) -> bool:
        return self.queued() > 0

    def read(self) -> None:
        if self.pipe:
            try:
                n = os.splice(self.src.fileno(), self.pipe[1], self.cap - self.pending, flags=_FLAGS)
            except BlockingIOError:
                self.full = self.pending > 0  # with an empty pipe it was the socket
                return
            self.pending += n
        else:
            try:
                data = self.src.recv(self.cap - len(self.buf))
            except BlockingIOError:
                return
            n = len(data)
            self.buf += data
        if n == 0:
            self.eof = True
        self.write()

    def write(self) -> None:
        try:
            if self.pipe and self.pending:
                self.pending -= os.splice(self.pipe[0], self.dst.fileno(), self.pending, flags=_FLAGS)
                self.full = False
            elif self.buf:
                self.buf = self.buf[self.dst.send(self.buf) :]
        except BlockingIOError:
            return
        if self.eof and not self.queued() and not self.done:
            self.done = True
            try:
                self.dst.shutdown(socket.SHUT_WR)  # pass the half-close on
            except OSError:
                pass

    def close(self) -> None:
        if self.pipe:
            for fd in self.pipe:
                os.close(fd)
            self.pipe = None


class _Conn:
    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client, self.upstream = client, upstream
        self.up = _Pump(client, upstream)
        self.down = _Pump(upstream, client)
        self.masks = {client: 0, upstream: 0}

    def events_for(self, sock: socket.socket) -> int:
        out, back = (self.up, self.down) if sock is self.client else (self.down, self.up)
        return (selectors.EVENT_READ if out.wants_read() else 0) | (selectors.EVENT_WRITE if back.wants_write() else 0)

    def finished(self) -> bool:
        return self.up.done and self.down.done


class Forwarder:
    def __init__(self, listen_port: int, socket_path: str) -> None:
        self.socket_path = socket_path
        self.sel = selectors.DefaultSelector()
        self.conns: set[_Conn] = set()
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", listen_port))
        self.lsock.listen(128)
        self.lsock.setblocking(False)
        self.listening = False
        self.resume_at = 0.0
        self._listen(True)

    def _listen(self, on: bool) -> None:
        # At the connection cap (or out of fds) we stop accepting instead of resetting
        # clients: they wait in the kernel's backlog until a slot frees up.
        if on != self.listening:
            if on:
                self.sel.register(self.lsock, selectors.EVENT_READ, None)
            else:
                self.sel.unregister(self.lsock)
            self.listening = on

    def run(self) -> None:
        while True:
            if not self.listening and len(self.conns) < _MAX_CONNS and time.monotonic() >= self.resume_at:
                self._listen(True)
            timeout = None if self.listening else 0.1
            for key, mask in self.sel.select(timeout):
                if key.data is None:
                    self._accept()
                    continue
                conn: _Conn = key.data
                sock = key.fileobj
                try:
                    out, back = (conn.up, conn.down) if sock is conn.client else (conn.down, conn.up)
                    if mask & selectors.EVENT_READ:
                        out.read()
                    if mask & selectors.EVENT_WRITE:
                        back.write()
                except OSError:  # reset, broken pipe: the connection is over
                    self._close(conn)
                    continue
                self._update(conn)

    def _accept(self) -> None:
        while len(self.conns) < _MAX_CONNS:
            try:
                client, _ = self.lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. out of fds: pause rather than spin on a ready listener
                self.resume_at = time.monotonic() + 0.1
                self._listen(False)
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.setblocking(False)
                upstream.connect(self.socket_path)
            except OSError:
                # Say so instead of a bare reset, so `curl` prints something a person can act on.
                upstream.close()
                try:
                    client.setblocking(False)
                    client.send(_UNAVAILABLE)
                    client.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                client.close()
                continue
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(client, upstream)
            self.conns.add(conn)
            self._update(conn)
        self._listen(False)

    def _update(self, conn: _Conn) -> None:
        if conn.finished():
            self._close(conn)
            return
        for sock in (conn.client, conn.upstream):
            want = conn.events_for(sock)
            have = conn.masks[sock]
            if want == have:
                continue
            if have and want:
                self.sel.modify(sock, want, conn)
            elif want:
                self.sel.register(sock, want, conn)
            else:
                self.sel.unregister(sock)
            conn.masks[sock] = want

    def _close(self, conn: _Conn) -> None:
        if conn not in self.conns:
            return
        self.conns.discard(conn)
        for sock in (conn.client, conn.upstream):
            if conn.masks[sock]:
                self.sel.unregister(sock)
            sock.close()
        conn.up.close()
        conn.down.close()


def serve(listen_port: int = 3128, socket_path: str = "/run/sandbox-egress/proxy.sock") -> None:
    """Accept on 127.0.0.1:listen_port forever, relaying each connection to ``socket_path``."""
    Forwarder(listen_port, socket_path).run()


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 3128
    path = sys.argv[2] if len(sys.argv) > 2 else "/run/sandbox-egress/proxy.sock"
    serve(port, path)
