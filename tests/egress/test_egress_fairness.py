"""Fairness between sessions: one session's flood must not starve another's name resolution
or evict another's audit records. A real DNS server of ours on loopback answers slowly for
the flooding session's names; the proxy uses its real (dnspython) resolver against it."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.egress.proxy import DNS_PER_SESSION
from sandbox.egress.resolve import DnsResolver
from tests.egress.dns_server import DnsServer
from tests.egress.egress_helpers import ALLOWED_ADDR, Harness, Target, connect_tunnel, get, wait_until

pytestmark = pytest.mark.timeout(60)

SLOW_S = 4.0  # the DNS server answers the flooding session's names after this long


class CountingResolver:
    """The real resolver, counting lookups in flight (what the per-session caps bound)."""

    def __init__(self, inner: DnsResolver) -> None:
        self.inner, self.active, self.peak_slow = inner, 0, 0
        self.slow_active = 0

    async def __call__(self, host: str, port: int) -> list[str]:
        slow = host.endswith(".slow.test")
        self.active += 1
        self.slow_active += slow
        self.peak_slow = max(self.peak_slow, self.slow_active)
        try:
            return await self.inner(host, port)
        finally:
            self.active -= 1
            self.slow_active -= slow


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    srv = DnsServer({"fast.test": [ALLOWED_ADDR]}, slow=lambda name: SLOW_S if name.endswith(".slow.test") else None)
    for i in range(200):
        srv.table[f"n{i}.slow.test"] = [ALLOWED_ADDR]
    yield srv
    srv.close()


@pytest.fixture
def target() -> Iterator[Target]:
    t = Target(ALLOWED_ADDR).start()
    yield t
    t.close()


@pytest.mark.parametrize("dns_global", [64, DNS_PER_SESSION + 1])
def test_slow_dns_flood_from_one_session_leaves_another_sessions_egress_working(tmp_path: Path, dns_server: DnsServer, target: Target, dns_global: int) -> None:
    # With a global cap of only DNS_PER_SESSION + 1 the flood could take every slot but for the
    # per-session cap: this is the case that fails if the cap is missing.
    resolver = CountingResolver(DnsResolver(["127.0.0.1"], dns_server.port, hosts_file=str(tmp_path / "no-hosts"), lifetime_s=10))
    h = Harness(tmp_path, {}, resolver=resolver, dns_global=dns_global)
    try:
        cidr = [f"{ALLOWED_ADDR}/32"]
        flood_sock = h.add_session("flood", {"rules": [{"host": "*.slow.test", "ports": [target.port]}], "allow_cidrs": cidr,
                                             "max_connections": 128, "connect_timeout_s": 3})
        calm_sock = h.add_session("calm", {"rules": [{"host": "fast.test", "ports": [target.port]}], "allow_cidrs": cidr})
        results: list[int] = []
        socks: list[socket.socket] = []

        def flood(i: int) -> None:
            s, resp = connect_tunnel(flood_sock, f"n{i}.slow.test:{target.port}", timeout=15)
            socks.append(s)
            results.append(resp.status)

        threads = [threading.Thread(target=flood, args=(i,), daemon=True) for i in range(60)]
        for t in threads:
            t.start()
        # The flood is really under way: the DNS server holds slow queries unanswered.
        assert wait_until(lambda: len({n for n in dns_server.names() if "slow" in n}) >= DNS_PER_SESSION, 5)
        calm = [get(calm_sock, f"http://fast.test:{target.port}/calm{i}") for i in range(5)]
        still_flooding = len(results) < len(threads)  # read before the assertions below wait for anything
        assert [r.status for r in calm] == [200] * 5, [r.raw[:200] for r in calm]
        assert still_flooding, "the flood ended before the calm session was measured: the test proved nothing"
        for t in threads:
            t.join(20)
        # The flooder had at most its own share of lookups in flight, and its overdue ones were
        # cancelled at its deadline (3 s < the server's 4 s): 502 dns-failure, no thread left behind.
        assert resolver.peak_slow <= DNS_PER_SESSION
        assert len(results) == 60 and set(results) == {502}
        assert wait_until(lambda: resolver.active == 0, 5)
        codes = {r["code"] for r in h.records("flood")}
        assert codes == {"dns-failure"}
        assert [r["decision"] for r in h.records("calm")] == ["allow"] * 5
        for s in socks:
            s.close()
    finally:
        h.close()


def test_a_name_the_hosts_file_pins_is_served_while_its_sessions_dns_slots_are_all_taken(tmp_path: Path, dns_server: DnsServer, target: Target) -> None:
    # An answer that needs no waiting holds no DNS slot: it does not queue behind the session's
    # own slow lookups (before, it waited for a slot behind every lookup queued ahead of it).
    hosts = tmp_path / "hosts"
    hosts.write_text(f"{ALLOWED_ADDR} pinned.test\n")
    h = Harness(tmp_path, {}, resolver=DnsResolver(["127.0.0.1"], dns_server.port, hosts_file=str(hosts), lifetime_s=10))
    try:
        sock = h.add_session("s", {"rules": [{"host": "*.slow.test", "ports": [target.port]}, {"host": "pinned.test", "ports": [target.port]}],
                                   "allow_cidrs": [f"{ALLOWED_ADDR}/32"], "connect_timeout_s": 10})
        finished: list[int] = []

        def slow(i: int) -> None:
            try:
                s, resp = connect_tunnel(sock, f"n{i}.slow.test:{target.port}", timeout=15)
                s.close()
                finished.append(resp.status)
            except OSError:
                finished.append(0)

        threads = [threading.Thread(target=slow, args=(i,), daemon=True) for i in range(DNS_PER_SESSION + 4)]
        for t in threads:
            t.start()
        assert wait_until(lambda: len({n for n in dns_server.names() if "slow" in n}) >= DNS_PER_SESSION, 5)  # every slot held
        resp = get(sock, f"http://pinned.test:{target.port}/pinned")
        done_before = list(finished)  # read before anything below waits
        assert resp.status == 200, resp.raw[:200]
        assert done_before == [], "the pinned name waited for the slow lookups"
        assert "pinned.test." not in dns_server.names()  # never asked of DNS
    finally:
        h.close()
    for t in threads:
        t.join(15)


def test_a_cancelled_lookup_stops_querying(tmp_path: Path, dns_server: DnsServer) -> None:
    """The deadline cancels the lookup itself: after it no further query (retry) is sent."""
    res = DnsResolver(["127.0.0.1"], dns_server.port, hosts_file=str(tmp_path / "no-hosts"), lifetime_s=30)

    async def run() -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(2.5):  # dnspython retries a silent server every 2 s
                await res("n1.slow.test", 443)

    asyncio.run(run())
    seen = len(dns_server.names())
    assert seen >= 2  # A and AAAA were asked
    threading.Event().wait(2.5)  # past the next retry time
    assert len(dns_server.names()) == seen


def test_a_flood_of_decisions_does_not_evict_another_sessions_records(tmp_path: Path, target: Target) -> None:
    h = Harness(tmp_path, {"fast.test": [ALLOWED_ADDR]}, audit_max_bytes=16 * 1024)
    try:
        pol = {"rules": [{"host": "fast.test", "ports": [target.port]}], "allow_cidrs": [f"{ALLOWED_ADDR}/32"]}
        calm_sock = h.add_session("calm", pol)
        flood_sock = h.add_session("flood", pol)
        assert get(calm_sock, f"http://fast.test:{target.port}/keep-me").status == 200
        for i in range(400):  # ~100 KB of refusals: several rotations of a 16 KiB file
            get(flood_sock, f"http://denied.test:{target.port}/{i}")
        assert wait_until(lambda: any(r["path"] == "/399" for r in h.records("flood")))
        flood = h.records("flood")
        assert len(flood) < 400  # the flooder's own old records rotated away (its quota)...
        calm = h.records("calm")
        assert [r["path"] for r in calm] == ["/keep-me"]  # ...and nobody else's
    finally:
        h.close()
