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

for a large download (plain HTTP and inside a CONNECT tunnel), sequential small requests
(one connection each), and connection-setup latency (CONNECT until "200 established",
minus a direct TCP connect). Prints medians and ratios to direct. Nothing leaves loopback.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NAME = "bench.test"  # resolved by our proxy's static resolver; tinyproxy gets the IP literal
ADDR = "127.0.0.1"
SMALL_BODY = b"hello, world\n"


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


def role_proxy(port_file: Path, sock_dir: Path, target_port: int, audit: Path) -> None:
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

    asyncio.run(main())


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


# ---------------------------------------------------------------- orchestration


def _spawn(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.DEVNULL)


def _wait_file(p: Path, timeout: float = 10) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if p.exists() and p.read_text().strip():
            return int(p.read_text())
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
    ap.add_argument("--small", type=int, default=300, help="small requests per mode per round")
    ap.add_argument("--setup", type=int, default=300, help="connection setups per mode per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--role", choices=["server", "proxy", "forwarder", "relay"])
    ap.add_argument("--port-file", type=Path)
    ap.add_argument("--sock-dir", type=Path)
    ap.add_argument("--target-port", type=int)
    ap.add_argument("--audit", type=Path)
    ap.add_argument("--port", type=int)
    ap.add_argument("--sock")
    a = ap.parse_args()
    big = a.big_mib << 20
    if a.role == "server":
        return role_server(a.port_file, big)
    if a.role == "proxy":
        return role_proxy(a.port_file, a.sock_dir, a.target_port, a.audit)
    if a.role == "forwarder":
        return role_forwarder(a.port, a.sock)
    if a.role == "relay":
        return role_relay(a.port_file, a.target_port)

    tmp = Path(tempfile.mkdtemp(prefix="bench-egress-", dir="/tmp"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(_spawn(["--role", "server", "--port-file", str(tmp / "server.port"), "--big-mib", str(a.big_mib)]))
        tport = _wait_file(tmp / "server.port")
        procs.append(_spawn(["--role", "proxy", "--port-file", str(tmp / "proxy.port"), "--sock-dir", str(tmp / "sess"), "--target-port", str(tport), "--audit", str(tmp / "audit.jsonl")]))
        pport = _wait_file(tmp / "proxy.port")
        fport = _free_port()
        procs.append(_spawn(["--role", "forwarder", "--port", str(fport), "--sock", str(tmp / "sess" / "proxy.sock")]))
        _wait_port(fport)
        procs.append(_spawn(["--role", "relay", "--port-file", str(tmp / "relay.port"), "--target-port", str(tport)]))
        rport = _wait_file(tmp / "relay.port")
        tiny, tiny_port = start_tinyproxy(tmp, tport)
        if tiny:
            procs.append(tiny)

        modes = [
            Path_("direct", None, ADDR),
            Path_("bare splice relay (1 hop)", None, ADDR, relay_port=rport),
            Path_("sandbox proxy", pport, NAME),
            Path_("sandbox proxy+forwarder", fport, NAME),
        ]
        if tiny:
            modes.append(Path_("tinyproxy", tiny_port, ADDR))
        else:
            print("tinyproxy not installed: skipped", file=sys.stderr)

        buf = bytearray(1 << 20)
        results: dict[str, dict[str, list[float]]] = {m.name: {k: [] for k in ("http_mbs", "tunnel_mbs", "rps_http", "rps_tunnel", "setup")} for m in modes}

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
                for tunnel, key in ((False, "rps_http"), (True, "rps_tunnel")):
                    t0 = time.perf_counter()
                    for _ in range(a.small):
                        fetch(m, tport, "/small", tunnel and m.proxy_port is not None, buf)
                    res[key].append(a.small / (time.perf_counter() - t0))
                time.sleep(0.3)
                if m.relay_port is not None:
                    continue  # a bare relay has no CONNECT step to time
                res["setup"] += [setup_latency(m, tport) for _ in range(a.setup)]
            print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)

        report(results, a)
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
    print(f"{'path':28} {'HTTP MiB/s':>11} {'ratio':>6} {'tunnel MiB/s':>13} {'ratio':>6} {'HTTP req/s':>11} {'ratio':>6} {'tunnel req/s':>13} {'ratio':>6} {'setup +ms med':>14} {'+ms p99':>8}")
    direct_setup = _median(direct["setup"])
    for name, res in results.items():
        m = {k: _median(v) for k, v in res.items()}
        added = [x - direct_setup for x in res["setup"]]
        setup = f"{_median(added) * 1000:14.3f} {_p99(added) * 1000:8.3f}" if added else f"{'-':>14} {'-':>8}"
        print(
            f"{name:28} {m['http_mbs']:11.0f} {m['http_mbs'] / d['http_mbs']:6.2f} {m['tunnel_mbs']:13.0f} {m['tunnel_mbs'] / d['tunnel_mbs']:6.2f} "
            f"{m['rps_http']:11.0f} {m['rps_http'] / d['rps_http']:6.2f} {m['rps_tunnel']:13.0f} {m['rps_tunnel'] / d['rps_tunnel']:6.2f} "
            f"{setup}"
        )
    print("(rows without a proxy do plain HTTP in both columns; setup = CONNECT until 200, minus a direct TCP connect)")


if __name__ == "__main__":
    main()
