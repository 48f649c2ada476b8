"""Name resolution for the egress proxy: the hosts file, then DNS for the absolute name only.

Why not ``loop.getaddrinfo``: it runs on asyncio's shared default thread pool (about six
threads on a two-core host), and a timeout cancels only the await, not the lookup
already blocking a thread. One session flooding CONNECTs to slow-resolving names under
an allowed wildcard then held every thread, and every other session's requests failed
with ``502 dns-failure``. dnspython's asyncio resolver is plain sockets on the event
loop: cancelling a lookup closes its socket and nothing keeps running.

Fairness (the caps) is the proxy's job (:meth:`EgressProxy._resolve`): a per-session
semaphore inside a global one, all under the session's deadline. A resolver may also offer
``answer_now(host, port)``: the answer when it is at hand without waiting on anything (the
hosts file here, a fixed mapping), else None; the proxy then awaits ``answer_later`` (or the
resolver itself) under the caps. An answer that never waits holds no slot and cannot
outlast a deadline, so it skips both (they are a loop timer and two semaphores per request).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence

HOSTS_FILE = "/etc/hosts"

# dnspython imports record-type modules on first use; the daemon loads them before it drops
# privileges (its interpreter's files may be unreadable afterwards). See daemon._preload_lazy_modules.
PRELOAD = (
    "dns.asyncresolver", "dns.asyncbackend", "dns._asyncio_backend", "dns.asyncquery",
    "dns.rdtypes.IN.A", "dns.rdtypes.IN.AAAA", "dns.rdtypes.ANY.CNAME", "dns.rdtypes.ANY.DNAME",
    "dns.rdtypes.ANY.SOA", "dns.rdtypes.ANY.NS", "dns.rdtypes.ANY.OPT", "dns.rdtypes.ANY.RRSIG",
)  # fmt: skip


def hosts_file_addrs(host: str, path: str = HOSTS_FILE) -> list[str]:
    """Addresses /etc/hosts gives for exactly this name (case-insensitive), in file order."""
    out: list[str] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split("#", 1)[0].split()
                if len(fields) >= 2 and host.lower() in (n.lower().rstrip(".") for n in fields[1:]):
                    out.append(fields[0])
    except OSError:
        return []
    return list(dict.fromkeys(out))


class DnsResolver:
    """The hosts file for exactly this name, else DNS (A and AAAA in parallel) for the
    ABSOLUTE name only.

    Never the name as given: resolv.conf search domains (ndots:5 under Kubernetes) would
    turn 'pypi.org' into some cluster-internal host whenever the real name failed. Every
    address returned is then checked by the ACL. ``nameservers``/``port`` override
    /etc/resolv.conf (tests and benchmarks run their own server on loopback)."""

    def __init__(self, nameservers: Sequence[str] | None = None, port: int = 53, hosts_file: str | None = None, lifetime_s: float = 5.0) -> None:
        self.nameservers = list(nameservers) if nameservers else None
        self.port = port
        self.hosts_file = hosts_file
        self.lifetime_s = lifetime_s
        self._resolver: object | None = None

    def _get(self) -> object:
        if self._resolver is None:
            import dns.asyncresolver
            import dns.resolver

            if self.nameservers is None:
                try:
                    r = dns.asyncresolver.Resolver()  # /etc/resolv.conf
                except dns.resolver.NoResolverConfiguration:
                    raise socket.gaierror(socket.EAI_FAIL, "no DNS servers configured on the host") from None
            else:
                r = dns.asyncresolver.Resolver(configure=False)
                r.nameservers = list(self.nameservers)
                r.port = self.port
            r.search = []
            r.use_search_by_default = False
            r.cache = None  # no cache shared between sessions: its timing would leak their lookups
            r.lifetime = self.lifetime_s
            self._resolver = r
        return self._resolver

    def answer_now(self, host: str, port: int) -> list[str] | None:
        """The hosts file's addresses for ``host``, or None: DNS is needed (:meth:`answer_later`)."""
        return hosts_file_addrs(host, self.hosts_file or HOSTS_FILE) or None

    async def __call__(self, host: str, port: int) -> list[str]:
        return self.answer_now(host, port) or await self.answer_later(host, port)

    async def answer_later(self, host: str, port: int) -> list[str]:
        """DNS for the absolute name (after the hosts file had nothing)."""
        if "." not in host:
            raise socket.gaierror(socket.EAI_NONAME, "single-label names resolve only through the hosts file")
        import dns.exception
        import dns.name
        import dns.resolver

        r = self._get()
        name = dns.name.from_text(host + ".")  # absolute: search domains never apply

        async def one(rdtype: str) -> list[str]:
            try:
                ans = await r.resolve(name, rdtype, search=False, raise_on_no_answer=False)  # type: ignore[attr-defined]
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                return []
            return [rd.address for rd in ans] if ans.rrset is not None else []

        results = await asyncio.gather(one("A"), one("AAAA"), return_exceptions=True)
        out: list[str] = []
        errors: list[BaseException] = []
        for res in results:
            if isinstance(res, BaseException):
                errors.append(res)
            else:
                out += res
        if out:
            return list(dict.fromkeys(out))
        if any(isinstance(e, dns.exception.Timeout) for e in errors):
            raise TimeoutError(f"DNS lookup for {host} timed out")
        for e in errors:
            if not isinstance(e, Exception):
                raise e  # CancelledError and friends
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
