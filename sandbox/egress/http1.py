"""Minimal, strict HTTP/1.x head parsing for the egress proxy (no sockets).

Strict on purpose: anything two parsers could read differently (bare LF, obs-fold,
space before ':', duplicate Content-Length, Transfer-Encoding together with
Content-Length) is refused instead of interpreted, because the proxy forwards
exactly one request per client connection and must know where it ends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sandbox.egress.acl import HostError, parse_authority

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_METHOD = re.compile(r"^[A-Z][A-Z-]{0,19}$")
_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # control characters but HTAB

# Never forwarded upstream: connection-scoped, or proxy credentials that belong to us.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

PHRASES = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    421: "Misdirected Request",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    504: "Gateway Timeout",
}


class ProtocolError(Exception):
    """A request the proxy refuses before any policy decision (status, code, reason)."""

    def __init__(self, status: int, code: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.code, self.reason = status, code, reason


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    # values by lower-cased name, built once: a request's policy checks ask for six names
    _by_name: dict[str, list[str]] = field(init=False, repr=False, compare=False)
    # connection_tokens(), made once (the framing check and the upstream head both need it)
    _tokens: frozenset[str] | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        by: dict[str, list[str]] = {}
        for k, v in self.headers:
            by.setdefault(k.lower(), []).append(v)
        object.__setattr__(self, "_by_name", by)

    def get_all(self, name: str) -> list[str]:
        return list(self._by_name.get(name.lower(), ()))


@dataclass(frozen=True)
class ForwardTarget:
    host: str  # canonical
    port: int
    origin_form: str  # path + query for the upstream request line
    log_path: str  # path without query or fragment, safe to log


def parse_head(head: bytes) -> Request:
    """``head`` includes the terminating CRLFCRLF."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError(400, "bad-request", "non-ASCII bytes in request head") from None
    if not text.endswith("\r\n\r\n"):
        raise ProtocolError(400, "bad-request", "request head not terminated by CRLF CRLF")
    body = text[:-4]
    lines = body.split("\r\n")
    if "\x00" in body or body.count("\r") != len(lines) - 1 or body.count("\n") != len(lines) - 1:
        raise ProtocolError(400, "bad-request", "bare CR, LF or NUL in request head")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise ProtocolError(400, "bad-request", "malformed request line")
    method, target, version = parts
    if not _METHOD.match(method):
        raise ProtocolError(400, "bad-request", "malformed method")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise ProtocolError(400, "bad-request", "unsupported HTTP version")
    headers: list[tuple[str, str]] = []
    for ln in lines[1:]:
        if ln[:1] in (" ", "\t"):
            raise ProtocolError(400, "bad-request", "obsolete header line folding")
        name, sep, value = ln.partition(":")
        if not sep or not _TOKEN.match(name):
            raise ProtocolError(400, "bad-request", "malformed header line")
        value = value.strip(" \t")
        if _CTL.search(value):
            raise ProtocolError(400, "bad-request", "control character in header value")
        headers.append((name, value))
    return Request(method, target, version, headers)


def connect_target(req: Request) -> tuple[str, int]:
    """CONNECT authority-form: host:port, no userinfo, port required."""
    try:
        return parse_authority(req.target, None, allow_userinfo=False)
    except HostError as e:
        raise ProtocolError(403, "invalid-host", f"invalid CONNECT target: {e}") from None


def forward_target(req: Request) -> ForwardTarget:
    """Absolute-form http:// target, cross-checked against the Host header."""
    target = req.target
    scheme, sep, rest = target.partition("://")
    if not sep:
        raise ProtocolError(400, "not-a-proxy-request", "a proxy request needs an absolute http:// URI")
    if scheme.lower() != "http":
        raise ProtocolError(400, "unsupported-scheme", "only http:// is forwarded; use CONNECT for https")
    end = len(rest)
    for ch in "/?#":
        i = rest.find(ch)
        if i >= 0:
            end = min(end, i)
    authority, tail = rest[:end], rest[end:]
    try:
        host, port = parse_authority(authority, 80, allow_userinfo=True)
    except HostError as e:
        raise ProtocolError(403, "invalid-host", f"invalid request target: {e}") from None
    tail = tail.partition("#")[0]
    origin = tail if tail.startswith("/") else "/" + tail
    hosts = req.get_all("host")
    if len(hosts) > 1:
        raise ProtocolError(400, "bad-request", "more than one Host header")
    if hosts:
        if hosts[0] != authority or "@" in authority:  # the same text without userinfo parses the same
            try:
                h_host, h_port = parse_authority(hosts[0], 80, allow_userinfo=False)
            except HostError as e:
                raise ProtocolError(403, "host-mismatch", f"invalid Host header: {e}") from None
            if (h_host, h_port) != (host, port):
                raise ProtocolError(403, "host-mismatch", "Host header does not match the request target")
    elif req.version == "HTTP/1.1":
        raise ProtocolError(400, "bad-request", "HTTP/1.1 request without Host header")
    log_path = origin.partition("?")[0][:256]
    return ForwardTarget(host, port, origin, log_path)


# Headers that decide where a request ends or where it goes: a Connection header naming one
# would make us drop it while the body it framed is still forwarded (``Connection:
# content-length`` turns the body into a second request upstream), so such a request is refused.
_FRAMING = frozenset({"content-length", "transfer-encoding", "host"})


def connection_tokens(req: Request) -> frozenset[str]:
    tokens = req._tokens
    if tokens is None:
        tokens = frozenset(t.strip().lower() for v in req._by_name.get("connection", ()) for t in v.split(",") if t.strip())
        object.__setattr__(req, "_tokens", tokens)
    return tokens


def body_framing(req: Request) -> int | str:
    """Content length in bytes, or ``"chunked"``. Ambiguous framing is refused, and so is a
    ``Connection`` header that names a framing header (Content-Length, Transfer-Encoding, Host)."""
    named = sorted(connection_tokens(req) & _FRAMING)
    if named:
        raise ProtocolError(400, "bad-request", f"Connection header names the framing header {named[0]}")
    te = req.get_all("transfer-encoding")
    cl = req.get_all("content-length")
    if te and cl:
        raise ProtocolError(400, "bad-request", "both Transfer-Encoding and Content-Length")
    if te:
        if len(te) != 1 or te[0].lower() != "chunked":
            raise ProtocolError(501, "bad-request", "only Transfer-Encoding: chunked is supported")
        return "chunked"
    if len(cl) > 1:
        raise ProtocolError(400, "bad-request", "more than one Content-Length")
    if cl:
        if not cl[0].isascii() or not cl[0].isdigit() or len(cl[0]) > 18:
            raise ProtocolError(400, "bad-request", "malformed Content-Length")
        return int(cl[0])
    return 0


def upstream_head(req: Request, fwd: ForwardTarget, framing: int | str) -> bytes:
    """The request head sent upstream: origin-form, hop-by-hop headers dropped, one
    request per connection (Connection: close)."""
    drop = _HOP_BY_HOP | connection_tokens(req)
    out = [f"{req.method} {fwd.origin_form} {req.version}"]
    if not req.get_all("host"):
        out.append(f"Host: {_host_header(fwd)}")
    out += [f"{k}: {v}" for k, v in req.headers if k.lower() not in drop]
    if framing == "chunked":
        out.append("Transfer-Encoding: chunked")
    out.append("Connection: close")
    return ("\r\n".join(out) + "\r\n\r\n").encode("ascii")


def fold_name(name: str) -> str:
    """Header names as CGI-style servers see them: case, '-', '_' and '.' folded together."""
    return name.lower().replace("_", "-").replace(".", "-")


def origin_path(target: str) -> tuple[str, str]:
    """(path, query) of an origin-form target on a terminated host, strict: the path the rules
    match is exactly the path forwarded, so anything a server could read as another path
    (dot segments, empty segments, encoded '/', '\\' or '.', control or non-ASCII) is refused."""
    if not target.startswith("/"):
        raise ProtocolError(400, "bad-request", "expected an origin-form request target (/path)")
    path, sep, query = target.partition("?")
    if "#" in target or any(not 0x21 <= ord(c) < 0x7F for c in target) or "\\" in path:
        raise ProtocolError(400, "ambiguous-path", "request target with a fragment, backslash, space, control or non-ASCII character")
    low = path.lower()
    if "%2f" in low or "%5c" in low or "%2e" in low or "%00" in low:
        raise ProtocolError(400, "ambiguous-path", "encoded '/', '\\', '.' or NUL in the path")
    segs = path.split("/")[1:]
    if any(s in (".", "..") for s in segs) or any(s == "" for s in segs[:-1]):
        raise ProtocolError(400, "ambiguous-path", "dot or empty segments in the path")
    return path, (sep + query)


def terminated_head(req: Request, host_header: str, target: str, framing: int | str, strip: frozenset[str], add: list[tuple[str, str]]) -> bytes:
    """The head sent to a terminated host's upstream: hop-by-hop headers, headers named in
    Connection and every (folded) name in ``strip`` dropped; Host rebuilt from the CONNECT
    target; ``add`` appended last, so nothing the client sent can remove or duplicate it."""
    drop = _HOP_BY_HOP | connection_tokens(req) | {"host"}
    out = [f"{req.method} {target} HTTP/1.1", f"Host: {host_header}"]
    out += [f"{k}: {v}" for k, v in req.headers if k.lower() not in drop and fold_name(k) not in strip]
    if framing == "chunked":
        out.append("Transfer-Encoding: chunked")
    out += [f"{k}: {v}" for k, v in add]
    out.append("Connection: close")
    return ("\r\n".join(out) + "\r\n\r\n").encode("ascii")


def _host_header(fwd: ForwardTarget) -> str:
    host = f"[{fwd.host}]" if ":" in fwd.host else fwd.host
    return host if fwd.port == 80 else f"{host}:{fwd.port}"


def response_status(head: bytes) -> int:
    """Status code of an upstream response head, or 0 when it is not HTTP/1.x."""
    line = head.split(b"\r\n", 1)[0]
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        return 0
    return int(parts[1])


def rewrite_response_head(head: bytes) -> bytes:
    """Tell the client the connection ends after this response (it does)."""
    lines = head[:-4].split(b"\r\n")
    kept = [ln for ln in lines[1:] if ln.split(b":", 1)[0].strip().lower() not in (b"connection", b"keep-alive", b"proxy-connection")]
    return b"\r\n".join([lines[0], *kept, b"Connection: close"]) + b"\r\n\r\n"


def refusal(status: int, header: str, value: str, body: str) -> bytes:
    """A complete proxy-generated response (the client connection closes after it)."""
    data = (body.rstrip("\n") + "\n").encode("utf-8", "replace")
    safe_value = "".join(c if 0x20 <= ord(c) < 0x7F else "?" for c in value)[:300]
    head = (
        f"HTTP/1.1 {status} {PHRASES.get(status, 'Error')}\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(data)}\r\n"
        f"Connection: close\r\n"
        f"{header}: {safe_value}\r\n\r\n"
    )
    return head.encode("ascii") + data
