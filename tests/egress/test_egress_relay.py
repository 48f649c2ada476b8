"""The tunnel relay's own paths on real sockets: a client that reads slowly (the proxy stops
reading upstream until the client takes what it holds), a bulk stream that moves to splice
mid-tunnel, a half-close in each direction, and the byte budget spent inside a tunnel."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from sandbox.egress.unixsock import connect_unix
from tests.egress.egress_helpers import ALLOWED_ADDR, Harness, accept_forever, Target, connect_tunnel, parse_response, recv_all, wait_until

pytestmark = pytest.mark.timeout(30)


class Upstream:
    """A loopback server that runs ``talk`` on each connection (its own thread)."""

    def __init__(self, talk: Callable[[socket.socket], None]) -> None:
        self.talk = talk
        self.sock = socket.create_server((ALLOWED_ADDR, 0))
        self.port = self.sock.getsockname()[1]
        self.errors: list[BaseException] = []
        accept_forever(self.sock, self._run)

    def _run(self, c: socket.socket) -> None:
        with c:
            try:
                self.talk(c)
            except OSError as e:
                self.errors.append(e)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def upstreams() -> Iterator[list[Upstream]]:
    made: list[Upstream] = []
    yield made
    for u in made:
        u.close()


def _policy(port: int, **extra: object) -> dict[str, object]:
    return {"rules": [{"host": "allowed.test", "ports": [port]}], "allow_cidrs": [f"{ALLOWED_ADDR}/32"], **extra}


def _pieces(n: int, size: int) -> list[bytes]:
    """Numbered pieces: a reordered, lost or repeated piece changes the digest."""
    return [(b"%08d" % i) + bytes([65 + i % 26]) * (size - 8) for i in range(n)]


def test_a_client_that_stops_reading_gets_every_byte_in_order(harness: Harness, upstreams: list[Upstream]) -> None:
    # The upstream writes small pieces faster than the client reads: the proxy's sends to the
    # client fall short, it holds the rest and stops reading upstream until the client drains.
    pieces = _pieces(3000, 1000)

    def talk(c: socket.socket) -> None:
        for i, p in enumerate(pieces):
            c.sendall(p)
            if i % 4 == 0:
                time.sleep(0.0005)  # small reads at the proxy (a full 64 KiB read would mean bulk: splice)

    up = Upstream(talk)
    upstreams.append(up)
    sock = harness.add_session("s1", _policy(up.port))
    s, resp = connect_tunnel(sock, f"allowed.test:{up.port}")
    with s:
        assert resp.status == 200
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        time.sleep(0.5)  # not reading: buffers fill along the path
        got = recv_all(s, 10)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(b"".join(pieces)).hexdigest()
    assert wait_until(lambda: harness.records("s1"))
    rec = harness.records("s1")[-1]
    assert rec["decision"] == "allow" and rec["bytes_down"] == len(got)


def test_both_directions_stream_at_once_through_one_tunnel(harness: Harness, upstreams: list[Upstream]) -> None:
    # An echo upstream: 4 MiB up while the same bytes come back down (bulk both ways, splice).
    def talk(c: socket.socket) -> None:
        while d := c.recv(65536):
            c.sendall(d)

    up = Upstream(talk)
    upstreams.append(up)
    sock = harness.add_session("s1", _policy(up.port))
    data = b"".join(_pieces(4096, 1024))
    s, resp = connect_tunnel(sock, f"allowed.test:{up.port}", timeout=10)
    assert resp.status == 200
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(recv_all(s, 10)))
    reader.start()
    with s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)  # the echo ends when our half-close reaches it
        reader.join(15)
    assert b"".join(got) == data


def test_a_half_closed_tunnel_still_carries_the_response(harness: Harness, targets: dict[str, Target]) -> None:
    t = targets["allowed"]
    sock = harness.add_session("s1", _policy(t.port))
    s, resp = connect_tunnel(sock, f"allowed.test:{t.port}")
    with s:
        assert resp.status == 200
        s.sendall(b"GET /after-half-close HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
        s.shutdown(socket.SHUT_WR)  # our EOF goes upstream as a half-close, not a close
        inner = parse_response(recv_all(s))
    assert inner.status == 200 and inner.body == b"ok:/after-half-close"


def test_the_byte_budget_cuts_a_tunnel_mid_stream(harness: Harness, upstreams: list[Upstream]) -> None:
    def talk(c: socket.socket) -> None:
        for p in _pieces(200, 1000):
            c.sendall(p)
            time.sleep(0.001)

    up = Upstream(talk)
    upstreams.append(up)
    sock = harness.add_session("s1", _policy(up.port, byte_budget=30_000))
    s, resp = connect_tunnel(sock, f"allowed.test:{up.port}")
    with s:
        assert resp.status == 200
        got = recv_all(s, 5)
    assert 0 < len(got) <= 30_000
    assert got == b"".join(_pieces(200, 1000))[: len(got)]
    assert wait_until(lambda: harness.records("s1") and harness.records("s1")[-1]["code"] == "budget-exhausted")
    assert harness.call(_info(harness))["budget_left"] == 0


async def _info(harness: Harness) -> dict[str, object]:
    return harness.proxy.session_info("s1")


def test_a_plain_http_client_that_stops_reading_gets_the_whole_response(harness: Harness, upstreams: list[Upstream]) -> None:
    # The same for a forwarded response: the proxy holds what the client cannot take yet and
    # stops reading upstream meanwhile; then every byte arrives, in order, after the head.
    pieces = _pieces(3000, 1000)
    body = b"".join(pieces)

    def talk(c: socket.socket) -> None:
        while b"\r\n\r\n" not in c.recv(65536):
            pass
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
        for i, p in enumerate(pieces):
            c.sendall(p)
            if i % 4 == 0:
                time.sleep(0.0005)

    up = Upstream(talk)
    upstreams.append(up)
    sock = harness.add_session("s1", _policy(up.port))
    with connect_unix(sock, timeout=10) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(f"GET http://allowed.test:{up.port}/slow HTTP/1.1\r\nHost: allowed.test:{up.port}\r\n\r\n".encode())
        time.sleep(0.5)  # not reading
        resp = parse_response(recv_all(s, 10))
    assert resp.status == 200 and hashlib.sha256(resp.body).digest() == hashlib.sha256(body).digest()
