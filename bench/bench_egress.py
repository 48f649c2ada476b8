"""Egress proxy benchmark (run by hand, never by CI):

    python3 bench/bench_egress.py [--big-mib 256] [--small N] [--setup N] [--rounds R]

One local target server (its own process), and in one run, interleaved rounds of:
  direct                  client -> server
  sandbox proxy           client -> our proxy (TCP listener, same code as the daemon) -> server
  sandbox proxy+forwarder client -> in-sandbox forwarder (TCP) -> per-session Unix socket -> proxy
  tinyproxy               client -> Debian's tinyproxy with an equivalent Filter allowlist
  bare splice relay       client -> a byte relay with no parsing and no policy -> server: what
                          one extra TCP hop costs on this machine, the bound for any proxy's
                          throughput (its req/s is not tuned: a thread per direction)
  sandbox proxy, stdlib   the same proxy on asyncio's own loop instead of uvloop (what uvloop buys)
  Python floor (uvloop)   the least a Python proxy does per request (Protocols, no policy, no
                          audit): the bound for our req/s; tinyproxy (C) is below it
  floor + policy & audit  that floor plus the per-request work the proxy cannot drop (its head
                          parser, the ACL decision, head rewriting, one audit record): the
                          bound of moving the proxy's plumbing to Protocols
  sandbox proxy @ baseline  with --baseline-tree DIR: the proxy of an older checkout, same run

for a large download (plain HTTP and inside a CONNECT tunnel), sequential small requests
(one connection each), and connection-setup latency (CONNECT until "200 established",
minus a direct TCP connect). Prints medians and ratios to direct, each proxy process's own
CPU per small request, and the load average. Nothing leaves loopback.

    python3 bench/bench_egress.py --issue12 [--tls-big-mib 64] [--tls-small 200] [--rounds 3]

Issue 12 instead, in one run: HTTPS to a local TLS server (test CA) direct, through a
plain CONNECT tunnel (SNI pinned), and terminated by the proxy with a credential injected
(throughput, requests/s with a fresh TLS connection each, per-request latency); then the
second session's latency (p50, p99) for requests that each need a DNS lookup, alone and
while a first session floods CONNECTs to names a local DNS server answers only after 4 s,
with the per-session DNS cap, and with it lifted (the contrast).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NAME = "bench.test"  # resolved by our proxy's static resolver; tinyproxy gets the IP literal
ADDR = "127.0.0.1"
SMALL_BODY = b"hello, world\n"
BATCH = 10  # small requests per mode per turn (modes take turns; see main)


# ---------------------------------------------------------------- roles (child processes)


def role_server(port_file: Path, big: int) -> None:
    """HTTP/1.1 target: GET /big -> `big` bytes, anything else -> a tiny body; one request
    per connection."""
    payload = memoryview(b"x" * (1 << 20))
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((ADDR, 0))
    lsock.listen(512)
    port_file.write_text(str(lsock.getsockname()[1]))

    def serve(c: socket.socket) -> None:
        with c:
            buf = b""
            while b"\r\n\r\n" not in buf:
                d = c.recv(65536)
                if not d:
                    return
                buf += d
            path = buf.split(b" ", 2)[1]
            if path.endswith(b"/big"):
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % big)
                left = big
                while left:
                    n = min(left, len(payload))
                    c.sendall(payload[:n])
                    left -= n
            else:
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(SMALL_BODY), SMALL_BODY))

    while True:
        c, _ = lsock.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve, args=(c,), daemon=True).start()


def role_proxy(port_file: Path, sock_dir: Path, target_port: int, audit: Path, loop: str) -> None:
    from sandbox.egress import evloop
    from sandbox.egress.audit import AuditLog
    from sandbox.egress.proxy import EgressProxy, StaticResolver
    from sandbox.egress.rules import EgressPolicy

    policy = EgressPolicy.model_validate({"rules": [{"host": NAME, "ports": [target_port]}], "allow_cidrs": [f"{ADDR}/32"], "max_connections": 256})

    async def main() -> None:
        proxy = EgressProxy(resolver=StaticResolver({NAME: [ADDR]}), audit=AuditLog(audit))
        _, port = await proxy.add_tcp_listener("bench", policy)
        await proxy.add_session("bench", policy, sock_dir)
        port_file.write_text(str(port))
        await asyncio.Event().wait()

    evloop.run(main(), loop)  # what the daemon runs on (uvloop), or the stdlib loop to compare


class _HeadThenRelay(asyncio.Protocol):
    """The client side of the bench's floor proxies: buffer the request head, hand it to `admit`
    (which connects upstream and sets `up`), then relay."""

    up: Any = None

    def connection_made(self, transport: Any) -> None:  # uvloop's transports are not asyncio.Transport
        self.t, self.buf = transport, b""

    def data_received(self, data: bytes) -> None:
        if self.up is not None:
            self.up.write(data)
            return
        self.buf += data
        i = self.buf.find(b"\r\n\r\n")
        if i >= 0:
            self.admit(self.buf[: i + 4], self.buf[i + 4:])

    def admit(self, head: bytes, rest: bytes) -> None:
        raise NotImplementedError

    def connection_lost(self, exc: Exception | None) -> None:
        if self.up is not None:
            self.up.close()


def _serve_on_uvloop(factory: Callable[[], asyncio.Protocol], port_file: Path) -> None:
    import uvloop

    async def main() -> None:
        srv = await asyncio.get_running_loop().create_server(factory, ADDR, 0, backlog=512)
        port_file.write_text(str(srv.sockets[0].getsockname()[1]))
        await asyncio.Event().wait()

    uvloop.run(main())


def role_floor(port_file: Path, target_port: int) -> None:
    """The floor of a Python proxy on this machine: uvloop with Protocols (callbacks, no
    coroutines), one request per connection, no policy, no name resolution, no audit, no
    timeouts or budgets. Whatever our proxy costs beyond this row is its own work; this row
    beyond tinyproxy is what CPython and an event loop cost per request."""

    class Up(asyncio.Protocol):
        def __init__(self, down: Any, first: bytes) -> None:
            self.down, self.first = down, first

        def connection_made(self, transport: Any) -> None:  # uvloop's transports are not asyncio.Transport
            self.t = transport
            self.down.get_protocol().up = transport  # type: ignore[attr-defined]
            if self.first:
                transport.write(self.first)
            else:
                self.down.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")

        def data_received(self, data: bytes) -> None:
            self.down.write(data)

        def eof_received(self) -> bool:
            self.down.close()
            return False

    class Down(_HeadThenRelay):
        def admit(self, head: bytes, rest: bytes) -> None:
            line, _, tail = head.partition(b"\r\n")
            method, target, version = line.split(b" ")
            first = (b"" if method == b"CONNECT"
                     else b"%s /%s %s\r\n%s" % (method, target.split(b"/", 3)[3], version, tail + rest))
            loop = asyncio.get_running_loop()
            loop.create_task(loop.create_connection(lambda: Up(self.t, first), ADDR, target_port))

    _serve_on_uvloop(Down, port_file)


def role_floor_policy(port_file: Path, target_port: int, audit: Path) -> None:
    """The Python floor plus the per-request work our proxy cannot drop: its strict head parser
    (sandbox.egress.http1), the ACL decision on the resolver's answer (memoised per policy, as
    the proxy does), the upstream head rewritten, the response head checked and rewritten, one
    audit record written before the client sees EOF. Still no timeouts, no budget, no DNS
    slots, no TLS checks. If this row is not ahead of tinyproxy, moving the proxy's plumbing
    to Protocols cannot make the proxy ahead either: it is the bound of that rewrite."""
    from sandbox.egress import acl, http1
    from sandbox.egress.audit import AuditLog, AuditRecord
    from sandbox.egress.rules import EgressPolicy

    policy = EgressPolicy.model_validate({"rules": [{"host": NAME, "ports": [target_port]}], "allow_cidrs": [f"{ADDR}/32"], "max_connections": 256})
    names = {NAME: (ADDR,)}
    memo: dict[tuple[str, int, tuple[str, ...]], acl.Decision] = {}
    log = AuditLog(audit)

    class Up(asyncio.Protocol):
        def __init__(self, down: Any, first: bytes, rec: AuditRecord) -> None:
            self.down, self.first, self.rec, self.head = down, first, rec, b""

        def connection_made(self, transport: Any) -> None:
            self.t = transport
            self.down.get_protocol().up = transport  # type: ignore[attr-defined]
            if self.first:
                transport.write(self.first)
                self.rec.bytes_up += len(self.first)
            else:
                self.head = None
                self.down.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")

        def data_received(self, data: bytes) -> None:
            self.rec.bytes_down += len(data)
            if self.head is None:
                self.down.write(data)
                return
            self.head += data
            i = self.head.find(b"\r\n\r\n")
            if i < 0:
                return
            head, rest = self.head[: i + 4], self.head[i + 4:]
            self.head = None
            self.rec.status = http1.response_status(head)
            self.down.write(http1.rewrite_response_head(head) + rest)

        def eof_received(self) -> bool:
            log.write(self.rec)
            self.down.close()
            return False

    class Down(_HeadThenRelay):
        def admit(self, head: bytes, rest: bytes) -> None:
            req = http1.parse_head(head)
            rec = AuditRecord(session="bench", method=req.method)
            if req.method == "CONNECT":
                host, port = http1.connect_target(req)
                first = b""
            else:
                fwd = http1.forward_target(req)
                host, port, rec.path = fwd.host, fwd.port, fwd.log_path
                first = http1.upstream_head(req, fwd, http1.body_framing(req)) + rest
            addrs = names[host]
            key = (host, port, addrs)
            d = memo.get(key) or memo.setdefault(key, acl.decide(policy, host, port, addrs))
            rec.host, rec.port, rec.addr, rec.rule, rec.decision, rec.code, rec.reason = host, port, d.addr, d.rule, "allow", "allowed", d.reason
            loop = asyncio.get_running_loop()
            loop.create_task(loop.create_connection(lambda: Up(self.t, first, rec), d.addr, port))

    _serve_on_uvloop(Down, port_file)


def role_relay(port_file: Path, target_port: int) -> None:
    """The floor of any proxy: a bare byte relay (blocking splice, a thread per direction,
    no parsing, no policy) adding one TCP hop. It shows what one hop costs on this machine."""
    import fcntl

    lsock = socket.socket()
    lsock.bind((ADDR, 0))
    lsock.listen(512)
    port_file.write_text(str(lsock.getsockname()[1]))

    def pump(a: socket.socket, b: socket.socket) -> None:
        r, w = os.pipe()
        fcntl.fcntl(w, 1031, 1 << 20)
        try:
            while n := os.splice(a.fileno(), w, 1 << 20):
                while n:
                    n -= os.splice(r, b.fileno(), n)
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            os.close(r)
            os.close(w)

    while True:
        c, _ = lsock.accept()
        u = socket.create_connection((ADDR, target_port))
        for x in (c, u):
            x.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=pump, args=(c, u), daemon=True).start()
        threading.Thread(target=pump, args=(u, c), daemon=True).start()


def role_forwarder(port: int, sock: str) -> None:
    from sandbox.agent import forwarder

    forwarder.serve(port, sock)


# ---------------------------------------------------------------- issue 12 roles

TLS_SECRET = "bench-secret-0123456789"


def role_tls_server(port_file: Path, big: int, cert: str, key: str) -> None:
    """HTTPS/1.1 target: GET /big -> `big` bytes, else a tiny body; one request per connection."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    payload = memoryview(b"x" * (1 << 20))
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((ADDR, 0))
    lsock.listen(512)
    port_file.write_text(str(lsock.getsockname()[1]))

    def serve(c: socket.socket) -> None:
        try:
            with ctx.wrap_socket(c, server_side=True) as t:
                buf = b""
                while b"\r\n\r\n" not in buf:
                    d = t.recv(65536)
                    if not d:
                        return
                    buf += d
                if buf.startswith(b"GET /big"):
                    t.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % big)
                    left = big
                    while left:
                        n = min(left, len(payload))
                        t.sendall(payload[:n])
                        left -= n
                else:
                    t.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(SMALL_BODY), SMALL_BODY))
                t.unwrap()
        except OSError:
            pass

    while True:
        c, _ = lsock.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve, args=(c,), daemon=True).start()


def role_tls_proxy(port_file: Path, target_port: int, ca_file: str, session_ca_out: Path) -> None:
    """Two sessions on TCP listeners: 'tunnel' (SNI-pinned end-to-end tunnel) and 'inject'
    (terminated, credential injected, upstream verified against the bench's CA)."""
    from sandbox.egress.credentials import SessionMaterial
    from sandbox.egress.proxy import EgressProxy, StaticResolver
    from sandbox.egress.rules import EgressPolicy

    base = {"allow_cidrs": [f"{ADDR}/32"], "max_connections": 256}
    tunnel = EgressPolicy.model_validate({**base, "rules": [{"host": NAME, "ports": [target_port], "tls_ports": [target_port]}]})
    inject = EgressPolicy.model_validate({**base, "credentials": {"c": {"env": "UNUSED"}}, "rules": [
        {"host": NAME, "ports": [target_port], "tls_ports": [target_port], "credential": {"name": "c"}, "upstream_ca": ca_file}]})
    material = SessionMaterial({"c": TLS_SECRET}, {ca_file: Path(ca_file).read_text()})

    async def main() -> None:
        proxy = EgressProxy(resolver=StaticResolver({NAME: [ADDR]}))
        _, p1 = await proxy.add_tcp_listener("tunnel", tunnel)
        _, p2 = await proxy.add_tcp_listener("inject", inject, material=material)
        session_ca_out.write_bytes(proxy.session_ca_pem("inject") or b"")
        port_file.write_text(f"{p1} {p2}")
        await asyncio.Event().wait()

    from sandbox.egress import evloop

    evloop.run(main())  # the daemon's loop


def role_fair_proxy(port_file: Path, target_port: int, dns_port: int, per_session: int) -> None:
    """Sessions 'flood' (*.slow.bench) and 'calm' (calm.bench), names resolved by the real
    resolver against the bench's DNS server."""
    from sandbox.egress.proxy import EgressProxy
    from sandbox.egress.resolve import DnsResolver
    from sandbox.egress.rules import EgressPolicy

    base = {"allow_cidrs": [f"{ADDR}/32"], "max_connections": 1024}
    flood = EgressPolicy.model_validate({**base, "connect_timeout_s": 2, "rules": [{"host": "*.slow.bench", "ports": [target_port]}]})
    calm = EgressPolicy.model_validate({**base, "rules": [{"host": "calm.bench", "ports": [target_port]}]})

    async def main() -> None:
        proxy = EgressProxy(resolver=DnsResolver([ADDR], dns_port, hosts_file="/nonexistent"), dns_per_session=per_session)
        _, p1 = await proxy.add_tcp_listener("flood", flood)
        _, p2 = await proxy.add_tcp_listener("calm", calm)
        port_file.write_text(f"{p1} {p2}")
        await asyncio.Event().wait()

    from sandbox.egress import evloop

    evloop.run(main())  # the daemon's loop


# ---------------------------------------------------------------- client side


class Path_:
    """How the client reaches the server in one mode."""

    def __init__(self, name: str, proxy_port: int | None, host: str, relay_port: int | None = None) -> None:
        self.name, self.proxy_port, self.host, self.relay_port = name, proxy_port, host, relay_port


def _connect(port: int) -> socket.socket:
    s = socket.create_connection((ADDR, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _read_head(s: socket.socket) -> tuple[bytes, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = s.recv(65536)
        if not d:
            raise ConnectionError("closed before a response head")
        buf += d
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def _body(s: socket.socket, head: bytes, rest: bytes, buf: bytearray) -> int:
    if not head.startswith(b"HTTP/1.1 200") and not head.startswith(b"HTTP/1.0 200"):
        raise ConnectionError(head[:120].decode(errors="replace"))
    n = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    got = len(rest)
    view = memoryview(buf)
    while got < n:
        k = s.recv_into(view)
        if not k:
            raise ConnectionError("short body")
        got += k
    return got


def fetch(p: Path_, target_port: int, path: str, tunnel: bool, buf: bytearray) -> int:
    """One GET on a fresh connection; returns body bytes."""
    if p.proxy_port is None:
        s = _connect(p.relay_port or target_port)
        req = f"GET {path} HTTP/1.1\r\nHost: {ADDR}:{target_port}\r\nConnection: close\r\n\r\n"
    elif tunnel:
        s = _connect(p.proxy_port)
        s.sendall(f"CONNECT {p.host}:{target_port} HTTP/1.1\r\nHost: {p.host}:{target_port}\r\n\r\n".encode())
        head, _ = _read_head(s)
        if b" 200" not in head.split(b"\r\n")[0]:
            raise ConnectionError(head[:120].decode(errors="replace"))
        req = f"GET {path} HTTP/1.1\r\nHost: {p.host}:{target_port}\r\nConnection: close\r\n\r\n"
    else:
        s = _connect(p.proxy_port)
        req = f"GET http://{p.host}:{target_port}{path} HTTP/1.1\r\nHost: {p.host}:{target_port}\r\nConnection: close\r\n\r\n"
    with s:
        s.sendall(req.encode())
        head, rest = _read_head(s)
        return _body(s, head, rest, buf)


def setup_latency(p: Path_, target_port: int) -> float:
    """Seconds from connect() to a usable byte stream to the target."""
    t0 = time.perf_counter()
    if p.proxy_port is None:
        s = _connect(target_port)
        dt = time.perf_counter() - t0
        s.close()
        return dt
    s = _connect(p.proxy_port)
    s.sendall(f"CONNECT {p.host}:{target_port} HTTP/1.1\r\nHost: {p.host}:{target_port}\r\n\r\n".encode())
    head, _ = _read_head(s)
    dt = time.perf_counter() - t0
    s.close()
    if b" 200" not in head.split(b"\r\n")[0]:
        raise ConnectionError(head[:120].decode(errors="replace"))
    return dt


# ---------------------------------------------------------------- issue 12 client side


def _https(port: int, ctx: object, path: str, connect: bool, target_port: int, buf: bytearray) -> int:
    import ssl

    assert isinstance(ctx, ssl.SSLContext)
    s = _connect(port)
    if connect:
        s.sendall(f"CONNECT {NAME}:{target_port} HTTP/1.1\r\nHost: {NAME}:{target_port}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            d = s.recv(1)
            if not d:
                raise ConnectionError("closed before 200")
            head += d
        if b" 200" not in head.split(b"\r\n")[0]:
            raise ConnectionError(head[:120].decode(errors="replace"))
    with ctx.wrap_socket(s, server_hostname=NAME) as t:
        t.sendall(f"GET {path} HTTP/1.1\r\nHost: {NAME}:{target_port}\r\nConnection: close\r\n\r\n".encode())
        head, rest = _read_head(t)  # type: ignore[arg-type]
        return _body(t, head, rest, buf)  # type: ignore[arg-type]


def bench_issue12(a: argparse.Namespace, tmp: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    import ssl

    from tests.egress.dns_server import DnsServer  # the tests' loopback DNS server
    from tests.egress.tls_helpers import TestCA

    ca = TestCA("bench upstream CA")
    ca_file = ca.write(tmp / "upstream-ca.pem")
    cert, key = ca.issue([NAME], tmp)
    big = a.tls_big_mib << 20
    procs.append(_spawn(["--role", "tls-server", "--port-file", str(tmp / "tls.port"), "--tls-big-mib", str(a.tls_big_mib), "--cert", str(cert), "--key", str(key)]))
    tport = _wait_file(tmp / "tls.port")
    procs.append(_spawn(["--role", "tls-proxy", "--port-file", str(tmp / "tlsproxy.port"), "--target-port", str(tport), "--ca", str(ca_file), "--session-ca", str(tmp / "session-ca.pem")]))
    _wait_file(tmp / "tlsproxy.port")
    p_tunnel, p_inject = map(int, (tmp / "tlsproxy.port").read_text().split())
    up_ctx = ssl.create_default_context(cafile=str(ca_file))
    sess_ctx = ssl.create_default_context(cafile=str(tmp / "session-ca.pem"))
    modes = {"direct HTTPS": (tport, up_ctx, False), "CONNECT tunnel (SNI pinned)": (p_tunnel, up_ctx, True),
             "terminated + injected": (p_inject, sess_ctx, True)}
    buf = bytearray(1 << 20)
    res: dict[str, dict[str, list[float]]] = {m: {"mbs": [], "rps": [], "lat": []} for m in modes}
    for m, (port, ctx, conn) in modes.items():
        _https(port, ctx, "/small", conn, tport, buf)  # warm-up (leaf minted, caches filled)
    rng = random.Random(2)
    for r in range(a.rounds):
        for m in rng.sample(list(modes), len(modes)):
            port, ctx, conn = modes[m]
            time.sleep(0.3)
            t0 = time.perf_counter()
            n = _https(port, ctx, "/big", conn, tport, buf)
            assert n == big
            res[m]["mbs"].append(n / (time.perf_counter() - t0) / (1 << 20))
            time.sleep(0.3)
            t0 = time.perf_counter()
            for _ in range(a.tls_small):
                t1 = time.perf_counter()
                _https(port, ctx, "/small", conn, tport, buf)
                res[m]["lat"].append(time.perf_counter() - t1)
            res[m]["rps"].append(a.tls_small / (time.perf_counter() - t0))
        print(f"TLS round {r + 1}/{a.rounds} done", file=sys.stderr)
    d_lat = _median(res["direct HTTPS"]["lat"])
    print(f"\nHTTPS through the egress proxy: {a.tls_big_mib} MiB download, {a.tls_small} requests (fresh TLS connection each) x {a.rounds} rounds; medians")
    print(f"{'path':30} {'MiB/s':>8} {'req/s':>8} {'ms/req med':>11} {'p99':>8} {'added ms med':>13} {'added p99':>10}")
    for m, v in res.items():
        lat = v["lat"]
        added = [x - d_lat for x in lat]
        print(f"{m:30} {_median(v['mbs']):8.0f} {_median(v['rps']):8.0f} {_median(lat) * 1000:11.3f} {_p99(lat) * 1000:8.3f} "
              f"{_median(added) * 1000:13.3f} {_p99(added) * 1000:10.3f}")

    # ------------------------------------------------ fairness under a DNS flood
    procs.append(_spawn(["--role", "server", "--port-file", str(tmp / "plain.port"), "--big-mib", "1"]))
    hport = _wait_file(tmp / "plain.port")
    dns = DnsServer({"calm.bench": [ADDR]}, slow=lambda name: 4.0 if name.endswith(".slow.bench") else None)
    counter = iter(range(10**9))
    for i in range(100000):
        dns.table[f"n{i}.slow.bench"] = [ADDR]
    print(f"\nSecond session's latency (plain HTTP GET, each with a DNS lookup of its own name) while a first session floods "
          f"{a.flooders} concurrent CONNECTs to names answered after 4 s; {a.calm} requests per phase")
    print(f"{'per-session DNS cap':22} {'phase':10} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'flood reqs':>11}")
    try:
        for per_session in (4, 64):
            pf = tmp / f"fair{per_session}.port"
            proc = _spawn(["--role", "fair-proxy", "--port-file", str(pf), "--target-port", str(hport), "--dns-port", str(dns.port), "--per-session", str(per_session)])
            procs.append(proc)
            _wait_file(pf)
            p_flood, p_calm = map(int, pf.read_text().split())
            calm_path = Path_("calm", p_calm, "calm.bench")
            stop = threading.Event()
            flood_count = [0]

            def flooder() -> None:
                while not stop.is_set():
                    try:
                        s = _connect(p_flood)
                        s.settimeout(10)
                        s.sendall(f"CONNECT n{next(counter)}.slow.bench:{hport} HTTP/1.1\r\n\r\n".encode())
                        s.recv(4096)
                        s.close()
                        flood_count[0] += 1
                    except OSError:
                        pass

            for phase in ("alone", "flooded"):
                threads = []
                if phase == "flooded":
                    threads = [threading.Thread(target=flooder, daemon=True) for _ in range(a.flooders)]
                    for t in threads:
                        t.start()
                    time.sleep(1.0)
                lat, errors = [], 0
                for _ in range(a.calm):
                    t0 = time.perf_counter()
                    try:
                        fetch(calm_path, hport, "/small", False, buf)
                        lat.append(time.perf_counter() - t0)
                    except (OSError, ConnectionError):
                        errors += 1
                stop.set()
                for t in threads:
                    t.join(15)
                stop.clear()
                label = f"{per_session}" + (" (the fix)" if per_session == 4 else " (= global: no cap)")
                print(f"{label:22} {phase:10} {_median(lat) * 1000:8.2f} {_p99(lat) * 1000:8.2f} {errors:7d} {flood_count[0] if phase == 'flooded' else 0:11d}")
            proc.send_signal(signal.SIGTERM)
            proc.wait(5)
    finally:
        dns.close()


# ---------------------------------------------------------------- orchestration


def _spawn(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.DEVNULL)


def _wait_file(p: Path, timeout: float = 10) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if p.exists() and p.read_text().strip():
            return int(p.read_text().split()[0])
        time.sleep(0.02)
    raise TimeoutError(p)


def _wait_port(port: int, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection((ADDR, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(port)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((ADDR, 0))
        return s.getsockname()[1]


def start_tinyproxy(tmp: Path, target_port: int) -> tuple[subprocess.Popen[bytes] | None, int]:
    exe = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
    if not Path(exe).exists():
        return None, 0
    port = _free_port()
    filt = tmp / "tinyproxy.filter"
    filt.write_text("^127\\.0\\.0\\.1$\n")  # the same single allowed destination
    conf = tmp / "tinyproxy.conf"
    lines = [
        f"Port {port}",
        f"Listen {ADDR}",
        "Timeout 60",
        "MaxClients 256",
        "LogLevel Critical",
        f"Filter \"{filt}\"",
        "FilterType ere",
        "FilterDefaultDeny Yes",
        f"ConnectPort {target_port}",
        "DisableViaHeader Yes",
    ]
    if os.geteuid() == 0:
        lines += ["User nobody", "Group nogroup"]
    conf.write_text("\n".join(lines) + "\n")
    os.chmod(tmp, 0o755)
    for f in (filt, conf):
        os.chmod(f, 0o644)
    proc = subprocess.Popen([exe, "-d", "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_port(port)
    return proc, port


def _cpu_s(pid: int | None) -> float:
    """user+system CPU seconds of a process (all its threads; tinyproxy's children are not counted)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _p99(xs: list[float]) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, round(0.99 * (len(s) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--big-mib", type=int, default=256)
    ap.add_argument("--small", type=int, default=300, help="small requests per mode per round (in turns of 10)")
    ap.add_argument("--setup", type=int, default=300, help="connection setups per mode per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--role", choices=["server", "proxy", "forwarder", "relay", "floor", "floor-policy", "tls-server", "tls-proxy", "fair-proxy"])
    ap.add_argument("--issue12", action="store_true", help="HTTPS tunnel vs terminated+injected vs direct, and DNS-flood fairness")
    ap.add_argument("--tls-big-mib", type=int, default=64)
    ap.add_argument("--tls-small", type=int, default=200)
    ap.add_argument("--flooders", type=int, default=96)
    ap.add_argument("--calm", type=int, default=300)
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--ca")
    ap.add_argument("--session-ca", type=Path)
    ap.add_argument("--dns-port", type=int)
    ap.add_argument("--per-session", type=int)
    ap.add_argument("--port-file", type=Path)
    ap.add_argument("--sock-dir", type=Path)
    ap.add_argument("--target-port", type=int)
    ap.add_argument("--audit", type=Path)
    ap.add_argument("--port", type=int)
    ap.add_argument("--sock")
    ap.add_argument("--loop", default="uvloop", choices=["uvloop", "asyncio"])
    ap.add_argument("--baseline-tree", type=Path, help="also run the proxy of this checkout (git worktree/archive of an older commit)")
    a = ap.parse_args()
    big = a.big_mib << 20
    if a.role == "server":
        return role_server(a.port_file, big)
    if a.role == "proxy":
        return role_proxy(a.port_file, a.sock_dir, a.target_port, a.audit, a.loop)
    if a.role == "forwarder":
        return role_forwarder(a.port, a.sock)
    if a.role == "relay":
        return role_relay(a.port_file, a.target_port)
    if a.role == "floor":
        return role_floor(a.port_file, a.target_port)
    if a.role == "floor-policy":
        return role_floor_policy(a.port_file, a.target_port, a.audit)
    if a.role == "tls-server":
        return role_tls_server(a.port_file, a.tls_big_mib << 20, a.cert, a.key)
    if a.role == "tls-proxy":
        return role_tls_proxy(a.port_file, a.target_port, a.ca, a.session_ca)
    if a.role == "fair-proxy":
        return role_fair_proxy(a.port_file, a.target_port, a.dns_port, a.per_session)
    if a.issue12:
        tmp = Path(tempfile.mkdtemp(prefix="bench-egress12-", dir="/tmp"))
        procs12: list[subprocess.Popen[bytes]] = []
        try:
            bench_issue12(a, tmp, procs12)
        finally:
            for p in procs12:
                p.send_signal(signal.SIGTERM)
            for p in procs12:
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
            shutil.rmtree(tmp, ignore_errors=True)
        return

    tmp = Path(tempfile.mkdtemp(prefix="bench-egress-", dir="/tmp"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(_spawn(["--role", "server", "--port-file", str(tmp / "server.port"), "--big-mib", str(a.big_mib)]))
        tport = _wait_file(tmp / "server.port")
        procs.append(_spawn(["--role", "proxy", "--port-file", str(tmp / "proxy.port"), "--sock-dir", str(tmp / "sess"), "--target-port", str(tport), "--audit", str(tmp / "audit.jsonl")]))
        pport = _wait_file(tmp / "proxy.port")
        procs.append(_spawn(["--role", "proxy", "--loop", "asyncio", "--port-file", str(tmp / "proxy-aio.port"), "--sock-dir", str(tmp / "sess-aio"), "--target-port", str(tport), "--audit", str(tmp / "audit-aio.jsonl")]))
        aport = _wait_file(tmp / "proxy-aio.port")
        pids = {"sandbox proxy": procs[1].pid, "sandbox proxy, stdlib loop": procs[2].pid}
        fport = _free_port()
        procs.append(_spawn(["--role", "forwarder", "--port", str(fport), "--sock", str(tmp / "sess" / "proxy.sock")]))
        _wait_port(fport)
        procs.append(_spawn(["--role", "relay", "--port-file", str(tmp / "relay.port"), "--target-port", str(tport)]))
        rport = _wait_file(tmp / "relay.port")
        pids["bare splice relay (1 hop)"] = procs[-1].pid
        procs.append(_spawn(["--role", "floor", "--port-file", str(tmp / "floor.port"), "--target-port", str(tport)]))
        floor_port = _wait_file(tmp / "floor.port")
        pids["Python floor (uvloop)"] = procs[-1].pid
        procs.append(_spawn(["--role", "floor-policy", "--port-file", str(tmp / "floorp.port"), "--target-port", str(tport), "--audit", str(tmp / "audit-floorp.jsonl")]))
        floorp_port = _wait_file(tmp / "floorp.port")
        pids["floor + policy & audit"] = procs[-1].pid
        if a.baseline_tree:  # the proxy as another checkout has it (e.g. before a change), same run
            env = dict(os.environ, PYTHONPATH=str(a.baseline_tree))
            procs.append(subprocess.Popen([sys.executable, str(a.baseline_tree / "bench" / "bench_egress.py"), "--role", "proxy", "--port-file",
                                           str(tmp / "base.port"), "--sock-dir", str(tmp / "sess-base"), "--target-port", str(tport),
                                           "--audit", str(tmp / "audit-base.jsonl")], stdin=subprocess.DEVNULL, env=env, cwd=a.baseline_tree))
            base_port = _wait_file(tmp / "base.port")
            pids["sandbox proxy @ baseline"] = procs[-1].pid
        tiny, tiny_port = start_tinyproxy(tmp, tport)
        if tiny:
            procs.append(tiny)
            pids["tinyproxy"] = tiny.pid

        modes = [
            Path_("direct", None, ADDR),
            Path_("bare splice relay (1 hop)", None, ADDR, relay_port=rport),
            Path_("sandbox proxy", pport, NAME),
            Path_("sandbox proxy, stdlib loop", aport, NAME),
            Path_("sandbox proxy+forwarder", fport, NAME),
            Path_("Python floor (uvloop)", floor_port, ADDR),
            Path_("floor + policy & audit", floorp_port, NAME),
        ]
        if a.baseline_tree:
            modes.insert(4, Path_("sandbox proxy @ baseline", base_port, NAME))
        if tiny:
            modes.append(Path_("tinyproxy", tiny_port, ADDR))
        else:
            print("tinyproxy not installed: skipped", file=sys.stderr)

        buf = bytearray(1 << 20)
        results: dict[str, dict[str, list[float]]] = {m.name: {k: [] for k in ("http_mbs", "tunnel_mbs", "rps_http", "rps_tunnel", "setup", "cpu")} for m in modes}
        loads: list[float] = []

        def timed(fn: Callable[[], int]) -> float:
            t0 = time.perf_counter()
            n = fn()
            return n / (time.perf_counter() - t0) / (1 << 20)

        for m in modes:  # warm-up
            fetch(m, tport, "/small", False, buf)
            fetch(m, tport, "/small", m.proxy_port is not None, buf)
        rng = random.Random(1)
        for r in range(a.rounds):
            # A different order each round, and a pause before each timed phase, so that
            # one mode's teardown (server threads, TIME_WAIT) is not billed to the next.
            for m in rng.sample(modes, len(modes)):
                res = results[m.name]
                time.sleep(0.3)
                res["http_mbs"].append(timed(lambda m=m: fetch(m, tport, "/big", False, buf)))
                time.sleep(0.3)
                res["tunnel_mbs"].append(timed(lambda m=m: fetch(m, tport, "/big", m.proxy_port is not None, buf)))
                time.sleep(0.3)
                if m.relay_port is not None:
                    continue  # a bare relay has no CONNECT step to time
                res["setup"] += [setup_latency(m, tport) for _ in range(a.setup)]
            # Small requests: every mode in turn, BATCH requests at a time, so a burst of load from
            # other work on the host lands on all modes alike (whole phases per mode did not).
            time.sleep(0.3)
            spent = {m.name: {"rps_http": 0.0, "rps_tunnel": 0.0} for m in modes}
            cpu = {m.name: 0.0 for m in modes}  # CPU of the mode's proxy process during its own turns
            batches = max(1, a.small // BATCH)
            for _ in range(batches):
                for m in rng.sample(modes, len(modes)):
                    c0 = _cpu_s(pids.get(m.name))
                    for tunnel, key in ((False, "rps_http"), (True, "rps_tunnel")):
                        t0 = time.perf_counter()
                        for _ in range(BATCH):
                            fetch(m, tport, "/small", tunnel and m.proxy_port is not None, buf)
                        spent[m.name][key] += time.perf_counter() - t0
                    cpu[m.name] += _cpu_s(pids.get(m.name)) - c0
            for m in modes:
                res = results[m.name]
                for key, secs in spent[m.name].items():
                    res[key].append(batches * BATCH / secs)
                if m.name in pids:  # the proxy process's own CPU (user+sys) per small request
                    res["cpu"].append(cpu[m.name] / (2 * batches * BATCH))
            loads.append(os.getloadavg()[0])
            print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)

        report(results, a)
        print(f"load average (1 min) after each round: {' '.join(f'{x:.1f}' for x in loads)}; {os.cpu_count()} CPUs")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def report(results: dict[str, dict[str, list[float]]], a: argparse.Namespace) -> None:
    direct = results["direct"]
    d = {k: _median(v) for k, v in direct.items()}
    print(f"\negress proxy benchmark: {a.big_mib} MiB download, {a.small} small requests x {a.rounds} rounds, {a.setup} setups x {a.rounds}; medians; ratio = vs direct")
    print(f"{'path':28} {'HTTP MiB/s':>11} {'ratio':>6} {'tunnel MiB/s':>13} {'ratio':>6} {'HTTP req/s':>11} {'ratio':>6} {'tunnel req/s':>13} {'ratio':>6} {'setup +ms med':>14} {'+ms p99':>8} {'CPU us/req':>11}")
    direct_setup = _median(direct["setup"])
    for name, res in results.items():
        m = {k: _median(v) for k, v in res.items()}
        added = [x - direct_setup for x in res["setup"]]
        setup = f"{_median(added) * 1000:14.3f} {_p99(added) * 1000:8.3f}" if added else f"{'-':>14} {'-':>8}"
        print(
            f"{name:28} {m['http_mbs']:11.0f} {m['http_mbs'] / d['http_mbs']:6.2f} {m['tunnel_mbs']:13.0f} {m['tunnel_mbs'] / d['tunnel_mbs']:6.2f} "
            f"{m['rps_http']:11.0f} {m['rps_http'] / d['rps_http']:6.2f} {m['rps_tunnel']:13.0f} {m['rps_tunnel'] / d['rps_tunnel']:6.2f} "
            f"{setup} {_median(res['cpu']) * 1e6 if res['cpu'] else float('nan'):11.0f}"
        )
    print("(rows without a proxy do plain HTTP in both columns; setup = CONNECT until 200, minus a direct TCP connect;\n"
          " CPU us/req = the proxy process's user+sys CPU per small request, HTTP and tunnel alike, clock-tick resolution)")
    # The machine is shared and noisy: the spread of each round's ratio (modes take turns in
    # batches within a round, so a round's ratio compares like with like).
    print(f"\nper-round req/s ratio to direct, median [min-max] over {len(direct['rps_http'])} rounds; CPU us/req median [min-max]")
    print(f"{'path':28} {'HTTP req/s ratio':>22} {'tunnel req/s ratio':>22} {'CPU us/req':>18}")
    for name, res in results.items():
        cols = []
        for key in ("rps_http", "rps_tunnel"):
            r = [x / y for x, y in zip(res[key], direct[key], strict=True)]
            cols.append(f"{_median(r):.2f} [{min(r):.2f}-{max(r):.2f}]")
        cpu = [x * 1e6 for x in res["cpu"]]
        cpu_text = f"{_median(cpu):.0f} [{min(cpu):.0f}-{max(cpu):.0f}]" if cpu else "-"
        print(f"{name:28} {cols[0]:>22} {cols[1]:>22} {cpu_text:>18}")


if __name__ == "__main__":
    main()
