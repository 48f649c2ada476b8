"""Egress policy models: what a sandbox may reach through the proxy.

Embedded by the policy loader as the ``egress`` key of a profile. Everything is
validated and canonicalised at load time so the proxy only ever compares
canonical strings: a rule that would never match (bad name, port 0) or that
would match far more than its author meant (``*.com``, ``0.0.0.0/0``) is a load
error, not a silent surprise at run time.
"""

from __future__ import annotations

import ipaddress
import re
from functools import cached_property
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sandbox.egress.hosts import HostError, canonical_host, is_ip_literal

# Ranges shorter than this would let a sandbox reach "almost everything private"
# (or simply everything) through one line; an operator who really means that
# must split it, which makes the intent visible in review.
_MIN_V4_PREFIX = 8
_MIN_V6_PREFIX = 16


_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_METHOD = re.compile(r"^[A-Z][A-Z-]{0,19}$")
_PATH_PATTERN = re.compile(r"^/[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*$")
# Headers a credential may never be injected as: they frame or route the request.
_FRAMING_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer",
                              "keep-alive", "proxy-connection", "proxy-authorization", "cookie"})
_NEVER_METHODS = frozenset({"TRACE", "TRACK", "CONNECT"})  # TRACE echoes the injected header back


class Credential(BaseModel):
    """A secret the proxy adds to requests for a terminated host. Only its NAME is here: the
    value comes from the policy's ``credentials`` source on the host and never enters the
    sandbox, the policy, a log or the audit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    header: str = "Authorization"
    format: str = "Bearer {secret}"  # the header value; exactly one {secret}
    basic_user: str | None = None  # set: the value is "Basic base64(basic_user:secret)" and format is not used
    path_prefix: str = "/"  # injected only for paths under this prefix

    @field_validator("header")
    @classmethod
    def _header(cls, v: str) -> str:
        if not _TOKEN.match(v) or v.lower() in _FRAMING_HEADERS:
            raise ValueError(f"credential header {v!r} is not a header name a credential may use")
        return v

    @field_validator("format")
    @classmethod
    def _format(cls, v: str) -> str:
        if v.count("{secret}") != 1 or any(not 0x20 <= ord(c) < 0x7F for c in v):
            raise ValueError("credential format must be printable ASCII with exactly one {secret}")
        return v

    @field_validator("basic_user")
    @classmethod
    def _user(cls, v: str | None) -> str | None:
        if v is not None and (":" in v or any(not 0x21 <= ord(c) < 0x7F for c in v)):
            raise ValueError("basic_user must be printable ASCII without ':' or spaces")
        return v

    @field_validator("path_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/") or not _PATH_PATTERN.match(v) or "*" in v or "/../" in v + "/" or "%" in v:
            raise ValueError(f"credential path_prefix {v!r} must be a plain absolute path")
        return v


class HttpRule(BaseModel):
    """Requests allowed on a terminated host: any of ``methods`` (``*`` = any) on any of ``paths``
    (``*`` one path segment, ``**`` any number of segments, e.g. ``/repos/acme/**``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    methods: list[str] = Field(min_length=1)
    paths: list[str] = Field(default=["/**"], min_length=1)

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        out = []
        for m in v:
            m = m.upper()
            if m != "*" and not _METHOD.match(m):
                raise ValueError(f"{m!r} is not an HTTP method")
            if m in _NEVER_METHODS:
                raise ValueError(f"method {m} can never be allowed on a terminated host")
            out.append(m)
        return out

    @field_validator("paths")
    @classmethod
    def _paths(cls, v: list[str]) -> list[str]:
        for p in v:
            segs = p.split("/")[1:]
            if not _PATH_PATTERN.match(p) or "%" in p or any(s in (".", "..") for s in segs) or any("*" in s and s not in ("*", "**") for s in segs):
                raise ValueError(f"path pattern {p!r}: absolute, no '.'/'..' or %-escapes, '*' and '**' only as whole segments")
        return v

    def allows(self, method: str, path: str) -> bool:
        return ("*" in self.methods or method in self.methods) and any(path_matches(p, path) for p in self.paths)


def path_matches(pattern: str, path: str) -> bool:
    """``path`` is normalised (absolute, no dot segments, no empty segments but a final one)."""
    return _match(pattern.split("/")[1:], path.split("/")[1:])


def _match(pat: list[str], segs: list[str]) -> bool:
    if not pat:
        return not segs
    head = pat[0]
    if head == "**":
        return any(_match(pat[1:], segs[i:]) for i in range(len(segs) + 1))
    if not segs:
        return False
    return (head == "*" or head == segs[0]) and _match(pat[1:], segs[1:])


class CredentialSource(BaseModel):
    """Where the host side reads a credential: exactly one of an environment variable of the
    process that owns the sandbox, a file (owned by that user, not readable by group or
    others), or a command's standard output (argv, no shell)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
    file: str | None = None
    command: list[str] | None = Field(default=None, min_length=1)
    timeout_s: float = Field(default=10.0, gt=0, le=120)

    @model_validator(mode="after")
    def _one(self) -> CredentialSource:
        given = [k for k in ("env", "file", "command") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a credential source names exactly one of env, file, command")
        if self.file is not None and not self.file.startswith("/"):
            raise ValueError("a credential file must be an absolute path")
        return self

    def describe(self) -> str:
        if self.env is not None:
            return f"env {self.env}"
        if self.file is not None:
            return f"file {self.file}"
        assert self.command is not None
        return f"command {self.command[0]}"


class EgressRule(BaseModel):
    """One allowed destination: a host (exact or ``*.suffix``) and its ports.

    On its TLS ports (``tls_ports``, default 443 when allowed; ``[]`` for none, e.g. SSH on 443)
    a tunnel must start with a TLS ClientHello naming the host (``sni``: ``pin``,
    ``allow-missing``, ``off``; an encrypted ClientHello only with ``allow_ech``). A rule with a
    ``credential`` or ``http`` rules (or ``terminate: true``) is terminated by the proxy: it
    sees each request, applies the method/path rules and the body cap, and injects the
    credential; every other host stays an end-to-end tunnel."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str
    ports: list[int] = Field(min_length=1, max_length=64)
    sni: Literal["pin", "allow-missing", "off"] = "pin"
    allow_ech: bool = False
    tls_ports: list[int] | None = None
    terminate: bool = False
    credential: Credential | None = None
    http: list[HttpRule] | None = None
    max_body_bytes: int | None = Field(default=None, ge=0)
    upstream_ca: str | None = None  # PEM file on the host: an extra CA for this upstream (internal services)

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

    @model_validator(mode="after")
    def _termination(self) -> EgressRule:
        if self.tls_ports is not None:
            for p in self.tls_ports:
                if p not in self.ports:
                    raise ValueError(f"tls_ports entry {p} is not one of the rule's ports")
        if self.terminates:
            if self.host.startswith("*."):
                raise ValueError(f"rule {self.host}: credentials and http rules need an exact host, not a wildcard "
                                 "(a wildcard would hand the credential to every name under it)")
            if not self.tls_port_set:
                raise ValueError(f"rule {self.host}: a terminated rule needs a TLS port (443, or tls_ports)")
            if self.sni == "off" or self.allow_ech:
                raise ValueError(f"rule {self.host}: a terminated rule always checks the SNI")
        elif self.max_body_bytes is not None or self.upstream_ca is not None:
            raise ValueError(f"rule {self.host}: max_body_bytes and upstream_ca apply to terminated rules only")
        if self.upstream_ca is not None and not self.upstream_ca.startswith("/"):
            raise ValueError(f"rule {self.host}: upstream_ca must be an absolute path")
        return self

    @property
    def terminates(self) -> bool:
        return self.terminate or self.credential is not None or self.http is not None

    @cached_property
    def tls_port_set(self) -> frozenset[int]:
        return frozenset(self.tls_ports if self.tls_ports is not None else [p for p in self.ports if p == 443])

    def http_rule_for(self, method: str, path: str) -> int | None:
        """Index of the first http rule allowing the request (None: denied). No http rules: all allowed."""
        if self.http is None:
            return -1
        for i, r in enumerate(self.http):
            if r.allows(method, path):
                return i
        return None

    def describe(self, sources: dict[str, CredentialSource] | None = None) -> str:
        """One line for ``sandbox policy explain``: ports, tunnel or terminated, SNI, the injected
        credential by NAME (and where the host reads it), method/path rules and body cap."""
        parts = [f"{self.host} ports {', '.join(map(str, self.ports))}"]
        tls_ports = ", ".join(map(str, sorted(self.tls_port_set)))
        if self.terminates:
            parts.append(f"TLS TERMINATED on {tls_ports} (session CA; upstream verified against the host store"
                         + (f" + {self.upstream_ca}" if self.upstream_ca else "") + ")")
            if self.credential is not None:
                c = self.credential
                src = (sources or {}).get(c.name)
                how = f"Basic as {c.basic_user}" if c.basic_user is not None else c.format.replace("{secret}", "<secret>")
                where = f" from {src.describe()}" if src is not None else ""
                scope = f" under {c.path_prefix}" if c.path_prefix != "/" else ""
                parts.append(f"injects credential {c.name}{where} as {c.header}: {how}{scope}; the sandbox's own replaced")
            if self.http is None:
                parts.append("any method and path")
            else:
                parts.append("only " + "; ".join(f"{' '.join(h.methods)} {' '.join(h.paths)}" for h in self.http))
            if self.max_body_bytes is not None:
                parts.append(f"request bodies <= {self.max_body_bytes} bytes")
        elif tls_ports:
            sni = {"pin": "SNI must name the host", "allow-missing": "SNI must name the host or be absent",
                   "off": "SNI NOT checked"}[self.sni]
            parts.append(f"end-to-end TLS tunnel on {tls_ports}: {sni}" + ("; ECH allowed" if self.allow_ech else ""))
        return "; ".join(parts)

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
    # Where the host side reads each credential a rule names (never the value itself).
    credentials: dict[str, CredentialSource] = {}

    @model_validator(mode="after")
    def _credentials_named(self) -> EgressPolicy:
        for r in self.rules:
            if r.credential is not None and r.credential.name not in self.credentials:
                raise ValueError(f"rule {r.host}: credential {r.credential.name!r} has no entry in egress.credentials")
        return self

    @property
    def terminates(self) -> bool:
        return any(r.terminates for r in self.rules)

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
