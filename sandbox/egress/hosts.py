"""Host and authority canonicalisation for egress: one DNS name or one IP literal, or an error.

Split from :mod:`sandbox.egress.acl` so that the rule models (:mod:`sandbox.egress.rules`)
can canonicalise hosts at load time without importing the decision code, which needs the
rule models: no import cycle. :mod:`sandbox.egress.acl` re-exports these names.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import unicodedata
from urllib.parse import unquote_to_bytes

import idna


class HostError(ValueError):
    """A host or authority that cannot be canonicalised. The message never echoes input."""


# ------------------------------------------------------------------ host names

_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_NUMERIC_PART = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")
_FORBIDDEN = re.compile(r"[\x00-\x20\x7f\\/?#@\[\]<>\"'`{}|^]")


def _legacy_ipv4(name: str) -> ipaddress.IPv4Address | None:
    """inet_aton()-style IPv4 ("127.1", "2130706433", "0x7f.0.0.1", "0177.0.0.1").

    A name whose last label is numeric is what WHATWG URL parsing and libc resolvers
    treat as IPv4; refusing to see it would let '2130706433' reach 127.0.0.1.
    Returns None when the name is not numeric; raises when it is numeric but invalid.
    """
    parts = name.split(".")
    if not _NUMERIC_PART.match(parts[-1]):
        return None
    if len(parts) > 4 or not all(_NUMERIC_PART.match(p) for p in parts):
        raise HostError("numeric host is not a valid IPv4 address")
    values: list[int] = []
    for p in parts:
        if p.startswith("0x"):
            values.append(int(p[2:] or "0", 16))
        elif len(p) > 1 and p.startswith("0"):
            if not all(c in "01234567" for c in p):
                raise HostError("numeric host is not a valid IPv4 address")
            values.append(int(p, 8))
        else:
            values.append(int(p))
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        raise HostError("numeric host is not a valid IPv4 address")
    n = 0
    for v in head:
        n = (n << 8) | v
    n = (n << (8 * (4 - len(head)))) | last
    return ipaddress.IPv4Address(n)


def _parse_ipv6(text: str) -> ipaddress.IPv6Address:
    if "%" in text:
        raise HostError("IPv6 zone identifiers are not allowed")
    try:
        return ipaddress.IPv6Address(text)
    except ValueError:
        raise HostError("invalid IPv6 address") from None


@functools.lru_cache(maxsize=4096)  # pure; a session asks for the same few hosts again and again
def canonical_host(raw: str) -> str:
    """The one canonical spelling of a host, or HostError.

    Names: lower-case A-labels (IDNA/UTS-46, punycode), no trailing dot, LDH labels.
    IPv4: dotted quad. IPv6: compressed form without brackets. Accepts ``[v6]`` brackets
    and one percent-decoding pass; refuses userinfo, ports, whitespace and control characters
    (use :func:`parse_authority` for a full ``user@host:port``).
    """
    if not isinstance(raw, str) or not raw or len(raw) > 1024:
        raise HostError("empty or overlong host")
    if raw.startswith("[") or raw.endswith("]"):
        if not (raw.startswith("[") and raw.endswith("]")):
            raise HostError("unbalanced brackets")
        return str(_parse_ipv6(raw[1:-1]))
    if "%" in raw:
        decoded = unquote_to_bytes(raw)
        try:
            text = decoded.decode("utf-8")
        except UnicodeDecodeError:
            raise HostError("percent-encoding is not UTF-8") from None
        if "%" in text:
            raise HostError("double percent-encoding")
        raw = text
    if _FORBIDDEN.search(raw):
        raise HostError("forbidden character in host")
    if not raw.isascii() and any(c.isspace() or unicodedata.category(c)[0] in "CZ" for c in raw):
        # control, format (zero-width, bidi overrides), separators: invisible in logs and
        # reviews, and silently dropped by some IDNA mappings - refuse rather than guess
        raise HostError("control, format or whitespace character in host")
    if ":" in raw:
        # Only a bare IPv6 literal may contain ':' here; 'host:port' belongs to parse_authority.
        return str(_parse_ipv6(raw))
    name = raw
    if not name.isascii():
        try:
            name = idna.encode(name, uts46=True, std3_rules=False, transitional=False).decode("ascii")
        except (idna.IDNAError, UnicodeError):
            raise HostError("invalid internationalised name") from None
    name = name.lower()
    name = name.removesuffix(".")
    if not name or len(name) > 253:
        raise HostError("empty or overlong host")
    v4 = _legacy_ipv4(name)
    if v4 is not None:
        return str(v4)
    for label in name.split("."):
        if not _LABEL.match(label):
            raise HostError("invalid DNS label")
        if label.startswith("xn--"):
            try:
                idna.decode(label)
            except (idna.IDNAError, UnicodeError):
                raise HostError("invalid punycode label") from None
    return name


def is_ip_literal(host: str) -> bool:
    """``host`` must be canonical: then IPv6 is exactly "has a colon" and IPv4 exactly
    "last label is numeric" (canonical_host turns every numeric-ending name into IPv4),
    which spares the hot path ipaddress' exception-driven parsing of every name."""
    return ":" in host or host.rpartition(".")[2].isdigit()


def parse_port(text: str) -> int:
    # Digits only, no sign/space/underscore (int() would accept ' 80', '+80', '8_0').
    if not text or len(text) > 5 or not text.isascii() or not text.isdigit():
        raise HostError("invalid port")
    port = int(text)
    if not 1 <= port <= 65535:
        raise HostError("port out of range")
    return port


def parse_authority(authority: str, default_port: int | None, *, allow_userinfo: bool) -> tuple[str, int]:
    """``[userinfo@]host[:port]`` -> (canonical host, port).

    Userinfo is dropped (never returned, never in an error) when allowed - as in an
    absolute URI - and refused otherwise (CONNECT targets and Host headers have none).
    The host is taken after the LAST '@', as RFC 3986 parsers do, so
    'allowed.test@evil.test' means evil.test.
    """
    if not authority or len(authority) > 2048:
        raise HostError("empty or overlong authority")
    if "@" in authority:
        if not allow_userinfo:
            raise HostError("userinfo is not allowed here")
        authority = authority.rpartition("@")[2]
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise HostError("unbalanced brackets")
        host_part, rest = authority[: end + 1], authority[end + 1 :]
        if rest and not rest.startswith(":"):
            raise HostError("garbage after IPv6 literal")
        port_text = rest[1:] if rest else None
    elif authority.count(":") > 1:
        raise HostError("IPv6 literal must be bracketed")
    else:
        host_part, sep, port_text_ = authority.partition(":")
        port_text = port_text_ if sep else None
    if port_text is None:
        if default_port is None:
            raise HostError("port required")
        port = default_port
    else:
        port = parse_port(port_text)
    return canonical_host(host_part), port
