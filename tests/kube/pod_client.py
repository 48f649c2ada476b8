"""What a sandbox pod does through a cluster egress proxy, from its own source address (loopback
aliases stand in for pod IPs)."""

from __future__ import annotations

import socket
import ssl
from typing import Any

from tests.egress.egress_helpers import parse_response, read_head, recv_all


def https_from_pod(proxy_port: int, src: str, bundle: bytes, port: int, path: str = "/", extra: str = "") -> Any:
    """CONNECT through the proxy on 127.0.0.1:`proxy_port` from `src`, then TLS to allowed.test trusting
    only the `bundle` the pod was given, and one GET of `path` (with `extra` header lines)."""
    s = socket.socket()
    s.bind((src, 0))
    s.settimeout(10)
    s.connect(("127.0.0.1", proxy_port))
    s.sendall(f"CONNECT allowed.test:{port} HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n".encode())
    head = parse_response(read_head(s))
    assert head.status == 200, head
    ctx = ssl.create_default_context(cadata=bundle.decode())
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    with ctx.wrap_socket(s, server_hostname="allowed.test") as t:
        t.sendall(f"GET {path} HTTP/1.1\r\nHost: allowed.test:{port}\r\n{extra}\r\n".encode())
        return parse_response(recv_all(t))


def get_from_pod(proxy_port: int, src: str, url: str, timeout: float = 10.0) -> Any:
    """A plain HTTP request from pod address `src` through the proxy on 127.0.0.1:`proxy_port`; a refused
    source (reset at connect or at send) reads as an empty response: nothing was served."""
    with socket.socket() as s:
        s.bind((src, 0))
        s.settimeout(timeout)
        host = url.split("://", 1)[1].split("/", 1)[0]
        try:
            s.connect(("127.0.0.1", proxy_port))
            s.sendall(f"GET {url} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            return parse_response(recv_all(s))
        except (BrokenPipeError, ConnectionResetError, ConnectionRefusedError):
            return parse_response(b"")
