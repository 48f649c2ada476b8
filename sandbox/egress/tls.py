"""Reading a TLS ClientHello without terminating it: is it TLS, and which name (SNI) does it ask for.

Used to pin tunnels that stay end to end: on a rule's TLS ports the first bytes after
``CONNECT host:443`` must be a ClientHello whose server_name is ``host``, so an allowed
tunnel cannot be used to reach another name on the same address (domain fronting by SNI).

Byte layout (RFC 8446 4.1.2, 5.1; RFC 6066 3). The handshake message may span several
records (post-quantum key shares push ClientHellos past one TCP segment, and the in-sandbox
forwarder re-chunks anyway): fragments are concatenated. Every length is bounds-checked;
anything malformed raises :class:`BadHello`, a prefix raises :class:`NeedMore`.
Limits: only the first ClientHello is seen, and the Host inside the tunnel stays hidden, so
this stops SNI-vs-CONNECT fronting, not CDN Host fronting (terminate the host for that).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_HELLO = 64 * 1024
EXT_SERVER_NAME = 0x0000
EXT_ECH = 0xFE0D
EXT_ESNI = 0xFFCE  # the draft that preceded ECH


class NeedMore(Exception):
    """A valid prefix: read more bytes."""


class NotTLS(Exception):
    """The first bytes are not a TLS handshake record."""


class BadHello(ValueError):
    """A TLS handshake record that is not a well-formed ClientHello."""


@dataclass(frozen=True)
class Hello:
    sni: str | None  # lowercased host_name, or None when absent
    ech: bool  # an encrypted ClientHello: ``sni`` is only the outer (public) name
    alpn: tuple[str, ...] = ()


def is_tls_start(data: bytes) -> bool:
    """Whether ``data`` (at least 3 bytes) can start a TLS handshake record (as mitmproxy checks)."""
    return len(data) >= 3 and data[0] == 0x16 and data[1] == 0x03 and data[2] <= 0x04


def client_hello_body(buf: bytes) -> bytes:
    """The ClientHello body from the records at the start of ``buf``."""
    hs = bytearray()
    off = 0
    while True:
        if len(buf) < off + 5:
            if off == 0 and len(buf) >= 1 and buf[0] != 0x16:
                raise NotTLS
            if off == 0 and len(buf) >= 3 and not is_tls_start(buf):
                raise NotTLS
            raise NeedMore
        t, maj, mnr = buf[off], buf[off + 1], buf[off + 2]
        n = int.from_bytes(buf[off + 3 : off + 5], "big")
        if t != 0x16 or maj != 3 or mnr > 4:
            if off == 0:
                raise NotTLS
            raise BadHello("a non-handshake record inside the ClientHello")
        if not 0 < n <= 16384:
            raise BadHello("record length out of range")
        if len(buf) < off + 5 + n:
            raise NeedMore
        hs += buf[off + 5 : off + 5 + n]
        off += 5 + n
        if len(hs) >= 4:
            if hs[0] != 0x01:
                raise BadHello("the first handshake message is not a ClientHello")
            m = int.from_bytes(hs[1:4], "big")
            if m > MAX_HELLO:
                raise BadHello("ClientHello too large")
            if len(hs) >= 4 + m:
                if len(hs) > 4 + m:
                    raise BadHello("data after the ClientHello in its records")
                return bytes(hs[4 : 4 + m])
        if off > MAX_HELLO + 5 * 8:
            raise BadHello("ClientHello too large")


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise BadHello("truncated ClientHello")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def vec8(self) -> bytes:
        return self.take(self.u8())

    def vec16(self) -> bytes:
        return self.take(self.u16())

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def parse_hello(body: bytes) -> Hello:
    c = _Cursor(body)
    c.take(2 + 32)  # legacy_version, random
    if len(c.vec8()) > 32:
        raise BadHello("session id longer than 32 bytes")
    suites = c.vec16()
    if not suites or len(suites) % 2:
        raise BadHello("bad cipher suite list")
    if not c.vec8():
        raise BadHello("no compression methods")
    if c.left == 0:
        return Hello(None, False)  # TLS <= 1.2 without extensions
    exts = _Cursor(c.vec16())
    if c.left:
        raise BadHello("bytes after the extensions")
    seen: set[int] = set()
    sni: str | None = None
    ech = False
    alpn: tuple[str, ...] = ()
    while exts.left:
        etype = exts.u16()
        data = exts.vec16()
        if etype in seen:
            raise BadHello("an extension appears twice")
        seen.add(etype)
        if etype == EXT_SERVER_NAME:
            sni = _server_name(data)
        elif etype in (EXT_ECH, EXT_ESNI):
            ech = True
        elif etype == 0x0010:  # ALPN
            a = _Cursor(_Cursor(data).vec16())
            names = []
            while a.left:
                names.append(a.vec8().decode("ascii", "replace"))
            alpn = tuple(names)
    return Hello(sni, ech, alpn)


def _server_name(data: bytes) -> str:
    outer = _Cursor(data)
    lst = _Cursor(outer.vec16())
    if outer.left:
        raise BadHello("bytes after the server_name list")
    name: str | None = None
    while lst.left:
        kind = lst.u8()
        value = lst.vec16()
        if kind == 0:
            if name is not None:
                raise BadHello("two host_name entries")
            if not value or not all(0x21 <= b < 0x7F for b in value):
                raise BadHello("host_name is not printable ASCII")
            name = value.decode("ascii").lower()
    if name is None:
        raise BadHello("server_name without a host_name")
    return name


def read_hello(buf: bytes) -> Hello:
    """:class:`Hello` from the bytes a client sent first; NeedMore / NotTLS / BadHello otherwise."""
    return parse_hello(client_hello_body(buf))


def alert(description: int) -> bytes:
    """A fatal TLS alert record (e.g. 112 unrecognized_name, 49 access_denied)."""
    return bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, description])


ALERT_UNRECOGNIZED_NAME = 112
ALERT_ACCESS_DENIED = 49
ALERT_HANDSHAKE_FAILURE = 40
