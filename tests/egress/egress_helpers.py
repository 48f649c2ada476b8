"""Helpers for egress tests: loopback target servers we own, a proxy on its own event
loop thread, and a safety net that fails the test before the proxy could ever connect
to an address outside this machine."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox.egress import evloop
from sandbox.egress.audit import SESSIONS_DIR, SessionAuditLogs, read_records
from sandbox.egress.proxy import EgressProxy, StaticResolver
from sandbox.egress.rules import EgressPolicy
from sandbox.egress.unixsock import connect_unix

# Fake names -> loopback addresses whose ports only our target servers bind.
ALLOWED_ADDR = "127.0.0.2"
OTHER_ADDR = "127.0.0.3"
THIRD_ADDR = "127.0.0.4"


def accept_forever(sock: socket.socket, serve: Callable[[socket.socket], None],
                   on_accept: Callable[[Any], None] | None = None) -> None:
    """Accept on a listening `sock` until it is closed, each connection served on a thread of its own."""
    def loop() -> None:
        while True:
            try:
                c, peer = sock.accept()
            except OSError:
                return
            if on_accept is not None:
                on_accept(peer)
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()


@dataclass
class Target:
    """A tiny HTTP/1.1 server on a loopback address that records every connection."""

    addr: str
    body_size: int = 0  # when >0, every response body has this many bytes
    connections: list[str] = field(default_factory=list)
    requests: list[bytes] = field(default_factory=list)  # raw request bytes (head + body)
    extra: list[bytes] = field(default_factory=list)  # bytes seen after the first request
    port: int = 0

    def start(self) -> Target:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((self.addr, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        accept_forever(self.sock, self._serve, on_accept=lambda peer: self.connections.append(f"{peer[0]}:{peer[1]}"))
        return self

    def _serve(self, c: socket.socket) -> None:
        c.settimeout(5)
        buf = b""
        try:
            while b"\r\n\r\n" not in buf:
                d = c.recv(65536)
                if not d:
                    return
                buf += d
            head, _, rest = buf.partition(b"\r\n\r\n")
            lower = head.lower()
            body = rest
            if b"transfer-encoding: chunked" in lower:
                while not body.endswith(b"0\r\n\r\n"):
                    d = c.recv(65536)
                    if not d:
                        break
                    body += d
            elif b"content-length:" in lower:
                n = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
                while len(body) < n:
                    d = c.recv(65536)
                    if not d:
                        break
                    body += d
                body, leftover = body[:n], body[n:]
                if leftover:
                    self.extra.append(leftover)
            self.requests.append(head + b"\r\n\r\n" + body)
            path = head.split(b" ")[1]
            payload = b"x" * self.body_size if self.body_size else b"ok:" + path
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(payload) + payload)
            # Anything more on this connection would be a smuggled second request.
            c.settimeout(0.2)
            try:
                more = c.recv(65536)
                if more:
                    self.extra.append(more)
            except OSError:
                pass
        except OSError:
            pass
        finally:
            c.close()

    def close(self) -> None:
        self.sock.close()


NAMES = {
    "allowed.test": [ALLOWED_ADDR],
    "other.test": [OTHER_ADDR],
    "evil.test": [OTHER_ADDR],
    "sub.wild.test": [ALLOWED_ADDR],
    "deep.sub.wild.test": [ALLOWED_ADDR],
    "xn--bcher-kva.test": [ALLOWED_ADDR],
    # allowed by rule in some tests, but answering with addresses the ACL must refuse
    "rebind.test": [OTHER_ADDR],
    "mixed.test": [ALLOWED_ADDR, OTHER_ADDR],
    "private.test": ["10.1.2.3"],
    "metadata.test": ["169.254.169.254"],
    "aws6.test": ["fd00:ec2::254"],
    "alibaba.test": ["100.100.100.200"],
    "mapped.test": ["::ffff:127.0.0.3"],
    "v6loop.test": ["::1"],
}


class Harness:
    """An EgressProxy running on a private event loop thread, driven synchronously."""

    def __init__(self, tmp: Path, mapping: dict[str, list[str]], resolver: Any = None, audit_max_bytes: int | None = None, **proxy_kw: Any) -> None:
        self.tmp = tmp
        self.audit_path = tmp / "audit.jsonl"
        self.loop = evloop.new_event_loop()  # the daemon's loop (uvloop unless SANDBOX_EGRESS_LOOP=asyncio)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.resolver = resolver or StaticResolver(mapping)
        audit = SessionAuditLogs(self.audit_path, audit_max_bytes) if audit_max_bytes else SessionAuditLogs(self.audit_path)
        self.proxy = EgressProxy(resolver=self.resolver, audit=audit, **proxy_kw)
        self.connect_attempts: list[tuple[str, ...]] = []

    def call(self, coro: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def add_session(self, sid: str, policy: EgressPolicy | dict[str, Any], material: Any = None) -> Path:
        if isinstance(policy, dict):
            policy = EgressPolicy.model_validate(policy)
        return self.call(self.proxy.add_session(sid, policy, self.tmp / "sessions" / sid, material))

    def records(self, session: str | None = None) -> list[dict[str, Any]]:
        return read_records(self.audit_path, session=session, limit=100000)

    def audit_text(self) -> str:
        """Every audit file's text (all sessions), for leak checks."""
        files = [p for p in (self.tmp / SESSIONS_DIR).glob("*") if p.is_file()]
        return "".join(p.read_text() for p in files)

    def close(self) -> None:
        self.call(self.proxy.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()  # its selector and self-pipe: left open, they added up to 1024 descriptors in CI


# ---------------------------------------------------------------- client helpers


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    raw: bytes


def parse_response(raw: bytes) -> Response:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1]) if lines and lines[0].startswith("HTTP/") else 0
    headers = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(":")
        headers[k.strip().lower()] = v.strip()
    return Response(status, headers, body, raw)


def recv_all(s: socket.socket, timeout: float = 5) -> bytes:
    s.settimeout(timeout)
    out = b""
    try:
        while True:
            d = s.recv(65536)
            if not d:
                break
            out += d
    except (TimeoutError, ConnectionResetError):
        pass
    return out


def request(sock_path: Path, data: bytes, timeout: float = 5) -> Response:
    with connect_unix(sock_path, timeout=timeout) as s:
        s.sendall(data)
        return parse_response(recv_all(s, timeout))


def get(sock_path: Path, url: str, host: str | None = None, extra: str = "") -> Response:
    authority = url.split("://", 1)[1].split("/", 1)[0].rpartition("@")[2]
    host_header = host if host is not None else authority
    return request(sock_path, f"GET {url} HTTP/1.1\r\nHost: {host_header}\r\n{extra}\r\n".encode())


def read_head(s: socket.socket) -> bytes:
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = s.recv(1)
        if not d:
            break
        buf += d
    return buf


def connect_tunnel(sock_path: Path, target: str, timeout: float = 5) -> tuple[socket.socket, Response]:
    s = connect_unix(sock_path, timeout=timeout)
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = read_head(s)
    resp = parse_response(head)
    if resp.status != 200:
        resp = parse_response(head + recv_all(s, timeout))
    return s, resp


def wait_until(pred: Any, timeout: float = 5, step: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())
