"""A minimal Docker Engine API client for the sandbox hot path.

The Docker SDK pulls in `requests` and friends, which cost more at import than a
whole container start (measured: bench/bench_runtime.py). The runtime needs six
calls on a local Unix socket, so they are spoken here in plain HTTP/1.1 on a
socket: even the stdlib's http.client costs ~20 ms at import (email parser, ssl),
a tenth of a cold ``sandbox exec``. Responses are bounded in size; a malformed
one is an :class:`EngineError`. Anything else (images, audit, inspection tools)
uses the SDK.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any
from urllib.parse import quote, urlencode

DEFAULT_SOCKET = "/var/run/docker.sock"


class EngineError(RuntimeError):
    def __init__(self, status: int, explanation: str):
        super().__init__(f"{status}: {explanation}")
        self.status = status
        self.explanation = explanation


class NotFound(EngineError):
    pass


def engine_socket_path() -> str | None:
    """The engine's Unix socket, or None when DOCKER_HOST points elsewhere (use the SDK then)."""
    host = os.environ.get("DOCKER_HOST", "")
    if not host:
        return DEFAULT_SOCKET
    if host.startswith("unix://"):
        return host[len("unix://"):]
    return None


MAX_RESPONSE = 64 << 20  # a container listing of thousands of sandboxes is well under this


class _Reader:
    """Buffered reads from the engine's socket, with a size bound on everything read."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()
        self.total = 0

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EngineError(0, "engine closed the connection mid-response")
        self.total += len(chunk)
        if self.total > MAX_RESPONSE:
            raise EngineError(0, "oversized engine response")
        self.buf += chunk

    def line(self) -> bytes:
        while True:
            nl = self.buf.find(b"\r\n")
            if nl >= 0:
                out = bytes(self.buf[:nl])
                del self.buf[: nl + 2]
                return out
            if len(self.buf) > 65536:
                raise EngineError(0, "oversized engine response header")
            self._more()

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._more()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def rest(self) -> bytes:
        try:
            while True:
                self._more()
        except EngineError as e:
            if e.status or "mid-response" not in e.explanation:
                raise
        out = bytes(self.buf)
        self.buf.clear()
        return out


def _http(socket_path: str, timeout: float, method: str, path: str,
          body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection (Connection: close); returns status, headers, body."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(socket_path)
        head = f"{method} {path} HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        elif method in ("POST", "PUT"):
            head += "Content-Length: 0\r\n"
        s.sendall(head.encode("latin-1") + b"\r\n" + (body or b""))
        r = _Reader(s)
        status_line = r.line().split(b" ", 2)
        try:
            status = int(status_line[1])
        except (IndexError, ValueError):
            raise EngineError(0, "malformed engine response") from None
        headers: dict[str, str] = {}
        while True:
            line = r.line()
            if not line:
                break
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        if status in (204, 304) or method == "HEAD":
            return status, headers, b""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            parts = []
            while True:
                try:
                    size = int(r.line().split(b";", 1)[0], 16)
                except ValueError:
                    raise EngineError(0, "malformed chunked engine response") from None
                if size == 0:
                    break
                parts.append(r.exact(size))
                r.line()
            return status, headers, b"".join(parts)
        if "content-length" in headers:
            try:
                n = int(headers["content-length"])
            except ValueError:
                raise EngineError(0, "malformed engine response length") from None
            if not 0 <= n <= MAX_RESPONSE:
                raise EngineError(0, "oversized engine response")
            return status, headers, r.exact(n)
        return status, headers, r.rest()
    finally:
        s.close()


class Engine:
    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout: float = 120.0):
        self.socket_path = socket_path
        self.timeout = timeout

    def _request(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None) -> Any:
        if query:
            path += "?" + urlencode(query)
        data = json.dumps(body).encode() if body is not None else None
        status, headers, raw = _http(self.socket_path, self.timeout, method, path, data)
        if status >= 400:
            try:
                msg = json.loads(raw).get("message", "")
            except (ValueError, AttributeError):
                msg = raw[:500].decode("utf-8", "replace")
            raise (NotFound if status == 404 else EngineError)(status, msg)
        return json.loads(raw) if raw and headers.get("content-type", "").startswith("application/json") else None

    def ping(self) -> bool:
        return self._request("GET", "/_ping") is None

    def create(self, body: dict[str, Any], name: str) -> str:
        return self._request("POST", "/containers/create", body, {"name": name})["Id"]

    def start(self, cid: str) -> None:
        self._request("POST", f"/containers/{quote(cid)}/start")

    def inspect(self, cid: str) -> dict[str, Any]:
        return self._request("GET", f"/containers/{quote(cid)}/json")

    def kill(self, cid: str) -> None:
        self._request("POST", f"/containers/{quote(cid)}/kill")

    def kill_nowait(self, cid: str) -> None:
        """Send the kill request and go: the engine carries it out whether or not anyone reads
        the answer (for a process about to exit; :meth:`kill` waits for the engine's answer)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(self.timeout)
            s.connect(self.socket_path)
            s.sendall((f"POST /containers/{quote(cid)}/kill HTTP/1.1\r\nHost: docker\r\n"
                       "Content-Length: 0\r\nConnection: close\r\n\r\n").encode())
        finally:
            s.close()

    def remove(self, cid: str) -> None:
        self._request("DELETE", f"/containers/{quote(cid)}", query={"force": "1", "v": "1"})

    def containers(self, labels: list[str]) -> list[dict[str, Any]]:
        return self._request("GET", "/containers/json",
                             query={"all": "1", "filters": json.dumps({"label": labels})})

    def attach(self, cid: str) -> socket.socket:
        """Hijack an attach connection: afterwards the socket carries raw stdin and multiplexed output."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.socket_path)
        q = urlencode({"stream": 1, "stdin": 1, "stdout": 1, "stderr": 1})
        s.sendall((f"POST /containers/{quote(cid)}/attach?{q} HTTP/1.1\r\nHost: docker\r\n"
                   "Connection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: 0\r\n\r\n").encode())
        head = bytearray()
        while b"\r\n\r\n" not in head:
            chunk = s.recv(1)  # byte-wise: nothing after the headers may be consumed here
            if not chunk:
                raise EngineError(0, "engine closed the attach connection")
            head += chunk
            if len(head) > 16384:
                raise EngineError(0, "oversized attach response")
        status = int(head.split(b" ", 2)[1])
        if status not in (101, 200):
            raise (NotFound if status == 404 else EngineError)(status, head.decode("latin-1").split("\r\n")[0])
        s.settimeout(None)
        return s
