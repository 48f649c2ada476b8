"""The in-sandbox forwarder: loopback TCP -> the session's Unix socket, byte for byte,
so unmodified clients that honour HTTP(S)_PROXY work."""

from __future__ import annotations

import http.client
import socket
import threading
import urllib.request
from pathlib import Path

import pytest

from sandbox.agent import forwarder
from tests.egress.egress_helpers import Harness, Target, wait_until

pytestmark = pytest.mark.timeout(30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_forwarder(sock_path: Path) -> int:
    port = _free_port()
    threading.Thread(target=forwarder.serve, kwargs={"listen_port": port, "socket_path": str(sock_path)}, daemon=True).start()

    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    assert wait_until(listening, 3)
    return port


def test_forwarder_relays_plain_http_for_an_unmodified_client(harness: Harness, targets: dict[str, Target], tmp_path: Path) -> None:
    t = targets["allowed"]
    sock = harness.add_session("s1", {"rules": [{"host": "allowed.test", "ports": [t.port]}], "allow_cidrs": [f"{t.addr}/32"]})
    port = _start_forwarder(sock)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": f"http://127.0.0.1:{port}"}))
    with opener.open(f"http://allowed.test:{t.port}/via-forwarder", timeout=5) as r:
        assert r.status == 200 and r.read() == b"ok:/via-forwarder"
    try:
        opener.open(f"http://evil.test:{t.port}/", timeout=5)
        raise AssertionError("denied request succeeded")
    except urllib.error.HTTPError as e:
        assert e.code == 403 and e.headers["X-Sandbox-Egress-Denied"].startswith("no-matching-rule")
    assert len(t.connections) == 1


def test_forwarder_relays_connect_tunnels(harness: Harness, targets: dict[str, Target]) -> None:
    t = targets["allowed"]
    sock = harness.add_session("s1", {"rules": [{"host": "allowed.test", "ports": [t.port]}], "allow_cidrs": [f"{t.addr}/32"]})
    port = _start_forwarder(sock)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.set_tunnel("allowed.test", t.port)
    conn.request("GET", "/tunnelled")
    r = conn.getresponse()
    assert r.status == 200 and r.read() == b"ok:/tunnelled"
    conn.close()
    # a large body survives the relay intact (bounded buffers, back-pressure)
    t.body_size = 8 * 1024 * 1024
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.set_tunnel("allowed.test", t.port)
    conn.request("GET", "/big")
    assert len(conn.getresponse().read()) == t.body_size
    conn.close()


def test_forwarder_answers_502_when_the_proxy_is_gone(tmp_path: Path) -> None:
    port = _start_forwarder(tmp_path / "missing.sock")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        head = s.recv(200)
    assert head.startswith(b"HTTP/1.1 502") and b"X-Sandbox-Egress-Error: proxy-unavailable" in head


def test_forwarder_is_stdlib_only() -> None:
    # It runs inside a python3-only image.
    import ast
    import sys

    tree = ast.parse(Path(forwarder.__file__).read_text())
    mods = {n.names[0].name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert mods <= set(sys.stdlib_module_names), mods


def test_forwarder_queues_connections_over_its_cap_instead_of_resetting(harness: Harness, targets: dict[str, Target], monkeypatch: pytest.MonkeyPatch) -> None:
    t = targets["allowed"]
    sock = harness.add_session("s1", {"rules": [{"host": "allowed.test", "ports": [t.port]}], "allow_cidrs": [f"{t.addr}/32"]})
    monkeypatch.setattr(forwarder, "_MAX_CONNS", 2)
    port = _start_forwarder(sock)
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
    for h in held:
        h.sendall(f"CONNECT allowed.test:{t.port} HTTP/1.1\r\n\r\n".encode())
        assert h.recv(100).startswith(b"HTTP/1.1 200")
    waiting = socket.create_connection(("127.0.0.1", port), timeout=5)  # sits in the backlog
    waiting.sendall(f"GET http://allowed.test:{t.port}/queued HTTP/1.1\r\nHost: allowed.test:{t.port}\r\n\r\n".encode())
    held[0].close()
    data = b""
    while not data.endswith(b"ok:/queued"):
        chunk = waiting.recv(4096)
        assert chunk, data
        data += chunk
    waiting.close()
    held[1].close()


def test_stalled_reader_does_not_make_proxy_or_forwarder_spin(harness: Harness, targets: dict[str, Target]) -> None:
    """A sandbox that opens a big download and stops reading must cost (almost) no CPU:
    back-pressure has to reach the target, not turn into a busy loop in between."""
    import time

    t = targets["allowed"]
    t.body_size = 32 * 1024 * 1024
    sock = harness.add_session("s1", {"rules": [{"host": "allowed.test", "ports": [t.port]}], "allow_cidrs": [f"{t.addr}/32"]})
    port = _start_forwarder(sock)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.sendall(f"CONNECT allowed.test:{t.port} HTTP/1.1\r\n\r\n".encode())
        assert s.recv(100).startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /big HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
        time.sleep(0.5)  # buffers fill up
        cpu0, wall0 = time.process_time(), time.monotonic()
        time.sleep(1.0)
        busy = (time.process_time() - cpu0) / (time.monotonic() - wall0)
        assert busy < 0.3, f"{busy:.0%} of a CPU while nothing can move"
        got = 0
        while got < t.body_size:  # and the transfer still completes once we read
            chunk = s.recv(1 << 20)
            assert chunk
            got += len(chunk)
