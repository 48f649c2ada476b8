"""A minimal Docker Engine API client for the sandbox hot path.

The Docker SDK pulls in `requests` and friends, which cost more at import than a
whole container start (measured: bench/bench_runtime.py). The runtime needs six
calls on a local Unix socket, so they are spoken here with the stdlib's
http.client. Anything else (images, audit, inspection tools) uses the SDK.
"""

from __future__ import annotations

import http.client
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


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


class Engine:
    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout: float = 120.0):
        self.socket_path = socket_path
        self.timeout = timeout

    def _request(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None) -> Any:
        if query:
            path += "?" + urlencode(query)
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            headers = {"Host": "docker"}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        if resp.status >= 400:
            try:
                msg = json.loads(raw).get("message", "")
            except ValueError:
                msg = raw[:500].decode("utf-8", "replace")
            raise (NotFound if resp.status == 404 else EngineError)(resp.status, msg)
        return json.loads(raw) if raw and resp.getheader("Content-Type", "").startswith("application/json") else None

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
