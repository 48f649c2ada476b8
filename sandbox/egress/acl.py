"""Pure egress decisions: host canonicalisation, address classification, allow/deny.

No sockets here, so every trick is unit-testable. The proxy feeds this module
what the client asked for and what the resolver answered, and connects only to
the address this module chose.

The stance (at least as strict as Stripe's smokescreen):
- a host that is not unambiguously one DNS name or one IP address is refused,
  never "repaired" into something else (control chars, zone ids, backslashes,
  double percent-encoding, non-canonical port text);
- legacy numeric IPv4 spellings (``2130706433``, ``0x7f.1``, ``0177.0.0.1``) are
  IP literals, because that is what a libc resolver would make of them;
- a destination is refused when ANY of its addresses is not globally routable
  unicast, unless an ``allow_cidrs`` entry contains it; cloud metadata addresses
  additionally need an entry naming exactly that address;
- IPv6 forms that embed an IPv4 address (mapped, compatible, SIIT, NAT64, 6to4)
  are judged by the embedded address.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from sandbox.egress.hosts import HostError, canonical_host, is_ip_literal, parse_authority, parse_port
from sandbox.egress.rules import EgressPolicy, EgressRule

__all__ = ["METADATA_ADDRESSES", "Decision", "HostError", "IPAddress", "canonical_host", "cidr_for", "classify",
           "decide", "deny", "embedded_ipv4", "is_ip_literal", "parse_authority", "parse_port", "precheck", "rule_for", "unwrap"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# ------------------------------------------------------------------ addresses

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network

# Exact addresses of instance-metadata and similar host-local cloud services. Many sit
# inside ranges denied anyway; listing them gives a precise reason and makes them immune
# to a broad allow_cidrs entry. 168.63.129.16 (Azure WireServer) is nominally PUBLIC.
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OCI, DigitalOcean, OpenStack, ...
        "169.254.169.253",  # AWS VPC DNS
        "169.254.169.123",  # AWS time sync
        "169.254.170.2",  # AWS ECS task metadata / credentials
        "169.254.170.23",  # AWS EKS pod identity agent
        "169.254.0.23",  # Tencent Cloud
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud (legacy)
        "168.63.129.16",  # Azure WireServer / host agent
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "fd00:ec2::23",  # AWS DNS over IPv6
        "fd00:ec2::123",  # AWS time sync over IPv6
        "fd20:ce::254",  # GCP metadata over IPv6
    )
)

# (network, category). Checked in order; the first hit names the refusal.
_V4_DENY: tuple[tuple[_V4, str], ...] = tuple(
    (ipaddress.IPv4Network(n), c)
    for n, c in (
        ("0.0.0.0/8", "unspecified"),
        ("127.0.0.0/8", "loopback"),
        ("10.0.0.0/8", "private"),
        ("172.16.0.0/12", "private"),
        ("192.168.0.0/16", "private"),
        ("100.64.0.0/10", "cgnat"),
        ("169.254.0.0/16", "link-local"),
        ("192.0.0.0/24", "reserved"),  # IETF protocol assignments (DS-Lite, NAT64 discovery, ...)
        ("192.0.2.0/24", "reserved"),  # documentation
        ("198.51.100.0/24", "reserved"),
        ("203.0.113.0/24", "reserved"),
        ("192.88.99.0/24", "reserved"),  # 6to4 relay anycast
        ("198.18.0.0/15", "reserved"),  # benchmarking
        ("224.0.0.0/4", "multicast"),
        ("255.255.255.255/32", "broadcast"),
        ("240.0.0.0/4", "reserved"),
    )
)

_V6_DENY: tuple[tuple[_V6, str], ...] = tuple(
    (ipaddress.IPv6Network(n), c)
    for n, c in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("64:ff9b:1::/48", "reserved"),  # local-use NAT64: translator-specific, not global
        ("100::/64", "reserved"),  # discard-only
        ("2001::/23", "reserved"),  # IETF protocol assignments incl. Teredo 2001::/32
        ("2001:db8::/32", "reserved"),  # documentation
        ("3fff::/20", "reserved"),  # documentation
        ("fc00::/7", "private"),  # ULA
        ("fe80::/10", "link-local"),
        ("fec0::/10", "link-local"),  # deprecated site-local
        ("ff00::/8", "multicast"),
    )
)
_V6_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SIIT = ipaddress.IPv6Network("::ffff:0:0:0/96")  # IPv4-translated (RFC 2765)
_COMPAT = ipaddress.IPv6Network("::/96")  # deprecated IPv4-compatible


def embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, if it is one of the translation forms
    whose real destination is that IPv4 (mapped, compatible, SIIT, NAT64, 6to4)."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    packed = int(addr)
    if addr in _NAT64 or addr in _SIIT:
        return ipaddress.IPv4Address(packed & 0xFFFFFFFF)
    if addr in _COMPAT and packed > 1:  # '::' and '::1' are themselves, not IPv4
        return ipaddress.IPv4Address(packed & 0xFFFFFFFF)
    return None


@functools.lru_cache(maxsize=4096)  # pure; ~16 network membership tests per uncached call
def classify(addr: IPAddress) -> str | None:
    """``None`` for a globally routable unicast address; else the category that refuses it
    (``loopback``, ``private``, ``cgnat``, ``link-local``, ``metadata``, ``multicast``,
    ``unspecified``, ``broadcast``, ``reserved``)."""
    if addr in METADATA_ADDRESSES:
        return "metadata"
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id:
            return "reserved"
        v4 = embedded_ipv4(addr)
        if v4 is not None:
            return classify(v4)
        for net, cat in _V6_DENY:
            if addr in net:
                return cat
        # Everything outside 2000::/3 is unallocated or special; only 2000::/3 is global unicast.
        return None if addr in _V6_GLOBAL_UNICAST else "reserved"
    for net4, cat in _V4_DENY:
        if addr in net4:
            return cat
    # Backstop: anything the IANA special-purpose registry (as Python knows it) calls non-global.
    return None if addr.is_global else "reserved"


def unwrap(addr: IPAddress) -> IPAddress:
    """The address to actually connect to: IPv4-mapped IPv6 becomes plain IPv4."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def cidr_for(addr: IPAddress, policy: EgressPolicy) -> str | None:
    """The allow_cidrs entry that admits ``addr`` despite its category, if any.

    Metadata addresses are admitted only by an entry that is exactly that address
    (/32 or /128): '10.0.0.0/8'-style convenience must never open the credentials endpoint.
    """
    cands = [unwrap(addr)]
    if isinstance(addr, ipaddress.IPv6Address):
        v4 = embedded_ipv4(addr)
        if v4 is not None:
            cands = [v4]  # an embedded form is admitted only by the range of its real target
    metadata = any(c in METADATA_ADDRESSES for c in cands) or addr in METADATA_ADDRESSES
    for net in policy.networks():
        for c in cands:
            if c.version == net.version and c in net:
                if metadata and net.num_addresses != 1:
                    continue
                return str(net)
    return None


# ------------------------------------------------------------------ decisions


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str | None  # the rule (or 'cidr:<net>') that allowed it, or that matched the host
    reason: str  # human-readable; safe to put in a header (ASCII, no CR/LF)
    addr: str | None = None  # the address to connect to (first of addrs)
    code: str = ""  # short machine-readable slug, e.g. 'no-matching-rule'
    addrs: tuple[str, ...] = field(default=())  # every checked address, in connect order

    def header(self) -> str:
        """Value of X-Sandbox-Egress-Denied: the refusing rule, or the reason."""
        return _header_safe(f"{self.code}: {self.reason}" if self.code else self.reason)


def _header_safe(text: str) -> str:
    return "".join(c if 0x20 <= ord(c) < 0x7F else "?" for c in text)[:300]


def deny(code: str, reason: str, rule: str | None = None) -> Decision:
    return Decision(False, rule, _header_safe(reason), None, code)


def _rules_for(policy: EgressPolicy, host: str) -> list[EgressRule]:
    found = [r for r in policy.rules if r.matches_host(host)]
    return sorted(found, key=lambda r: (r.host != host, -len(r.host)))


def rule_for(policy: EgressPolicy, host: str, port: int) -> EgressRule | None:
    """The rule that allows canonical ``host`` on ``port`` (the one :func:`precheck` names)."""
    for rule in _rules_for(policy, host):
        if port in rule.ports:
            return rule
    return None


def precheck(policy: EgressPolicy, host: str, port: int) -> Decision:
    """The name-and-port part of the decision, before any DNS lookup.

    The proxy calls this first so that a name no rule allows is never even resolved
    (a DNS query for 'secret-data.attacker.example' is itself an exfiltration channel).
    ``allowed`` here means "may resolve"; :func:`decide` makes the final call.
    """
    try:
        host = canonical_host(host)
    except HostError as e:
        return deny("invalid-host", f"invalid host: {e}")
    return _precheck(policy, host, port)


def _precheck(policy: EgressPolicy, host: str, port: int) -> Decision:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        return deny("invalid-port", "invalid port")
    if not policy.enabled:
        return deny("egress-disabled", "this session's policy allows no network access")
    if is_ip_literal(host):
        addr = ipaddress.ip_address(host)
        net = cidr_for(addr, policy)
        if net is not None:
            target = str(unwrap(addr))
            return Decision(True, f"cidr:{net}", f"address in allowed range {net}", target, "allowed", (target,))
    candidates = _rules_for(policy, host)
    if not candidates:
        return deny("no-matching-rule", f"no egress rule allows host {host}")
    for rule in candidates:
        if port in rule.ports:
            return Decision(True, rule.label(), f"allowed by rule {rule.label()}", None, "allowed")
    best = candidates[0]
    return deny("port-not-allowed", f"port {port} is not allowed for {host} (rule {best.label()})", best.label())


def decide(policy: EgressPolicy, host: str, port: int, resolved_addrs: Iterable[str | IPAddress]) -> Decision:
    """Final decision for ``host:port`` given what the resolver returned.

    For an IP-literal host ``resolved_addrs`` is ignored: the literal is the address.
    Refuses when ANY address is not public and no allow_cidrs entry admits it - one bad
    answer among good ones is how DNS rebinding hides.
    """
    try:
        host = canonical_host(host)
    except HostError as e:
        return deny("invalid-host", f"invalid host: {e}")
    pre = _precheck(policy, host, port)
    if not pre.allowed:
        return pre
    if is_ip_literal(host):
        literal = ipaddress.ip_address(host)
        if pre.rule and pre.rule.startswith("cidr:"):
            return pre
        addrs: Sequence[IPAddress] = [literal]
    else:
        addrs = []
        for a in resolved_addrs:
            try:
                addrs.append(a if isinstance(a, IPAddress) else ipaddress.ip_address(a))
            except ValueError:
                return deny("dns-bad-answer", f"resolver returned a non-address for {host}", pre.rule)
        if not addrs:
            return deny("dns-no-address", f"{host} did not resolve to any address", pre.rule)
    chosen: list[str] = []
    for a in addrs:
        category = classify(a)
        if category is not None and cidr_for(a, policy) is None:
            what = "is" if is_ip_literal(host) else "resolves to"
            return deny("non-public-address", f"{host} {what} {category} address {a}", pre.rule)
        target = str(unwrap(a))
        if target not in chosen:
            chosen.append(target)
    return Decision(True, pre.rule, pre.reason, chosen[0], "allowed", tuple(chosen))
