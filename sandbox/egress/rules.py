"""Egress policy models: what a sandbox may reach through the proxy.

Embedded by the policy loader as the ``egress`` key of a profile. Everything is
validated and canonicalised at load time so the proxy only ever compares
canonical strings: a rule that would never match (bad name, port 0) or that
would match far more than its author meant (``*.com``, ``0.0.0.0/0``) is a load
error, not a silent surprise at run time.
"""

from __future__ import annotations

import ipaddress
from functools import cached_property

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sandbox.egress.hosts import HostError, canonical_host, is_ip_literal

# Ranges shorter than this would let a sandbox reach "almost everything private"
# (or simply everything) through one line; an operator who really means that
# must split it, which makes the intent visible in review.
_MIN_V4_PREFIX = 8
_MIN_V6_PREFIX = 16


class EgressRule(BaseModel):
    """One allowed destination: a host (exact or ``*.suffix``) and its ports."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str
    ports: list[int] = Field(min_length=1, max_length=64)

    @field_validator("host")
    @classmethod
    def _canonical_host(cls, v: str) -> str:
        wildcard = v.startswith("*.")
        try:
            canon = canonical_host(v[2:] if wildcard else v)
        except HostError as e:
            raise ValueError(f"invalid egress host {v!r}: {e}") from None
        if wildcard:
            if is_ip_literal(canon):
                raise ValueError(f"wildcard over an IP address is meaningless: {v!r}")
            # '*.com' or '*.internal' would open a whole TLD; require a registrable-looking suffix.
            if canon.count(".") < 1:
                raise ValueError(f"wildcard {v!r} is too broad; name at least two labels after '*.'")
            return "*." + canon
        return canon

    @field_validator("ports")
    @classmethod
    def _ports(cls, v: list[int]) -> list[int]:
        for p in v:
            if isinstance(p, bool) or not 1 <= p <= 65535:
                raise ValueError(f"port {p!r} is not in 1-65535")
        return sorted(set(v))

    def matches_host(self, host: str) -> bool:
        """``host`` must already be canonical. ``*.x.y`` matches subdomains of x.y at any
        depth, never ``x.y`` itself (name the apex in its own rule)."""
        if self.host.startswith("*."):
            return host.endswith(self.host[1:]) and len(host) > len(self.host) - 1
        return host == self.host

    def label(self) -> str:
        """Short stable name used in denials and audit records, e.g. ``pypi.org:443``."""
        return self._label

    @cached_property
    def _label(self) -> str:
        return f"{self.host}:{','.join(str(p) for p in self.ports)}"


class EgressPolicy(BaseModel):
    """A session's egress: no rules and no CIDRs means no network at all."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: list[EgressRule] = []
    # Ranges allowed even though they are private/loopback/etc. A resolved address in one of
    # them passes the non-public check; an IP-literal destination in one is allowed on any port.
    allow_cidrs: list[str] = []
    byte_budget: int | None = Field(default=None, ge=1)  # bytes up + down per session; None = unlimited
    max_connections: int = Field(default=32, ge=1, le=1024)  # concurrent client connections per session
    idle_timeout_s: float = Field(default=60.0, gt=0, le=3600)  # no byte either way for this long -> close
    total_timeout_s: float = Field(default=3600.0, gt=0, le=24 * 3600)  # hard cap on one connection's life
    header_timeout_s: float = Field(default=10.0, gt=0, le=300)  # whole request head must arrive by then
    connect_timeout_s: float = Field(default=10.0, gt=0, le=120)  # DNS + TCP connect to the upstream
    max_header_bytes: int = Field(default=32 * 1024, ge=1024, le=1024 * 1024)

    @field_validator("allow_cidrs")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        out: list[str] = []
        for raw in v:
            try:
                net = ipaddress.ip_network(raw.strip(), strict=True)
            except ValueError as e:
                raise ValueError(f"allow_cidrs entry {raw!r} is not a network: {e}") from None
            floor = _MIN_V4_PREFIX if net.version == 4 else _MIN_V6_PREFIX
            if net.prefixlen < floor:
                raise ValueError(f"allow_cidrs entry {raw!r} is broader than /{floor}; split it")
            if net.version == 6 and net.subnet_of(ipaddress.IPv6Network("::ffff:0:0/96")):
                raise ValueError(f"allow_cidrs entry {raw!r}: write IPv4-mapped ranges as IPv4")
            out.append(str(net))
        return out

    @property
    def enabled(self) -> bool:
        return bool(self.rules or self.allow_cidrs)

    def networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return self._networks

    @cached_property
    def _networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        # parsed once per policy object (it is frozen), not once per connection
        return tuple(ipaddress.ip_network(c) for c in self.allow_cidrs)
