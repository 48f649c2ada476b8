"""The socket side: a stdlib ThreadingHTTPServer that turns bytes into `api.Request`s.

Everything a client can get wrong at this layer (malformed request line,
oversized or chunked body, bad Content-Length) is answered with the API's JSON
error shape, and the connection is closed when its framing can no longer be
trusted. One thread per connection (daemon); the server tracks connections so
`stop()` can cut idle keep-alives and open event streams instead of waiting
for them.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import socket
import socketserver
import ssl
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .api import Api, BytesResponse, JsonResponse, Request, Response, StreamResponse
from .errors import ApiError
from .keys import redact

log = logging.getLogger("sandbox.controlplane")

DEFAULT_MAX_BODY = 8 << 20
IDLE_TIMEOUT = 120.0  # seconds a keep-alive connection may sit idle


MAX_HEADER_LINE = 65536  # bytes of one header line (the stdlib's limit)
MAX_HEADERS = 100  # header lines in one request (the stdlib's limit)
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Framing headers: a second copy could make two parsers frame one request differently (request smuggling).
_SINGLE = frozenset({"content-length", "transfer-encoding", "host"})

LOOPBACK_HOST_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
TLS_HANDSHAKE_TIMEOUT = 10.0  # seconds a new connection has to send its ClientHello and finish the handshake


def _peer(sock: socket.socket) -> str:
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return "?"


def _host_name(host_header: str) -> str:
    """`Host` without the port, brackets removed, lower-cased (`[::1]:80` -> `::1`)."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1:].split("]", 1)[0]
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


class ControlPlaneHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(
        self, address: tuple[str, int], api: Api | None, max_body: int, allowed_hosts: frozenset[str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.api = api
        self.max_body = max_body
        # TLS: each connection's handshake runs in its own thread (a slow client never holds up accept()).
        self.ssl_context = ssl_context
        # On loopback, only loopback Host headers: a web page that DNS-rebinds its
        # own name to 127.0.0.1 then cannot talk to us even without the keys.
        self.allowed_hosts = allowed_hosts
        self._conn_lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._conn_threads: set[threading.Thread] = set()
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        super().__init__(address, RequestHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the FQDN of the bind address, which
        # can stall for seconds on hosts with slow reverse DNS; we never use it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        t = threading.Thread(target=self._serve_connection, args=(request, client_address), daemon=True)
        t.name = "controlplane-conn"
        with self._conn_lock:
            self._conns.add(request)
            self._conn_threads.add(t)
        t.start()

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        conn: Any = request
        try:
            if self.ssl_context is not None:
                conn = self._tls_accept(request)  # None: it was closed (no TLS, failed handshake)
            if conn is not None:
                self.finish_request(conn, client_address)
        except Exception:  # noqa: BLE001 - a broken connection must not take the server down
            log.debug("connection error", exc_info=True)
        finally:
            if conn is not None:
                self.shutdown_request(conn)
            with self._conn_lock:
                self._conns.discard(conn)
                self._conn_threads.discard(threading.current_thread())

    def _tls_accept(self, raw: socket.socket) -> ssl.SSLSocket | None:
        """The TLS side of a new connection, or None (closed) when there is none to have.

        A client speaking plain HTTP to the TLS port gets a plain-text 400 saying so, rather than a
        reset it cannot explain."""
        assert self.ssl_context is not None
        raw.settimeout(TLS_HANDSHAKE_TIMEOUT)
        first = raw.recv(1, socket.MSG_PEEK)
        if not first:
            self._close_raw(raw)
            return None
        if first[0] != 0x16:  # not a TLS handshake record
            body = b"this control plane speaks HTTPS only: use https:// and the CA it printed\n"
            try:
                raw.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            except OSError:
                pass
            self._close_raw(raw)
            return None
        peer = _peer(raw)
        with self._conn_lock:
            tls = self.ssl_context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            self._conns.discard(raw)  # wrap_socket took its descriptor
            self._conns.add(tls)
        try:
            tls.do_handshake()
        except (ssl.SSLError, OSError) as e:
            log.debug("TLS handshake from %s failed: %s", peer, getattr(e, "reason", None) or e)
            with self._conn_lock:
                self._conns.discard(tls)
            tls.close()
            return None
        return tls

    def _close_raw(self, raw: socket.socket) -> None:
        with self._conn_lock:
            self._conns.discard(raw)
        try:
            raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        raw.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection error", exc_info=True)

    def close_connections(self, join_timeout: float = 5.0) -> None:
        with self._conn_lock:
            conns, threads = list(self._conns), list(self._conn_threads)
        for conn in conns:
            try:
                # socket.socket's own shutdown: SSLSocket's would drop its TLS state under the thread reading it.
                socket.socket.shutdown(conn, socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + join_timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))


class RequestHandler(BaseHTTPRequestHandler):
    server: ControlPlaneHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "sandbox-controlplane/1"
    sys_version = ""
    timeout = IDLE_TIMEOUT
    header_map: dict[str, str] = {}  # this request's headers, names lower-cased (parse_request)

    def setup(self) -> None:
        super().setup()
        # Headers and body go out as separate writes; without NODELAY, Nagle plus
        # the client's delayed ACK adds ~40 ms to every response.
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    # ----------------------------------------------------------------- core

    def _handle(self) -> None:
        rid = "req_local_" + secrets.token_hex(10)
        try:
            req = self._read_request()
            api = self.server.api
            if api is None:
                raise ApiError(503, "the control plane is starting")
            resp: Response = api.handle(req)
        except ApiError as e:
            resp = JsonResponse(e.status, e.body(rid))
        except (ConnectionError, socket.timeout):
            self.close_connection = True
            return
        except Exception:  # noqa: BLE001 - report, keep serving
            log.exception("unhandled error serving %s", redact(self.requestline))
            resp = JsonResponse(500, ApiError(500, "internal error").body(rid))
        try:
            if isinstance(resp, StreamResponse):
                self._send_stream(resp, rid)
            elif isinstance(resp, BytesResponse):
                self._send_bytes(resp, rid)
            else:
                self._send_json(resp.status, resp.body, rid)
        except (ConnectionError, socket.timeout, OSError):
            self.close_connection = True

    def _read_request(self) -> Request:
        split = urlsplit(self.path)
        headers = self.header_map
        allowed = self.server.allowed_hosts
        if allowed is not None and _host_name(headers.get("host", "")) not in allowed:
            raise ApiError(400, "Host header does not name this server (loopback only)")
        if headers.get("transfer-encoding", "identity").lower() != "identity":
            self.close_connection = True
            raise ApiError(411, "chunked request bodies are not supported; send Content-Length")
        body = b""
        raw_len = headers.get("content-length")
        if raw_len is not None:
            try:
                length = int(raw_len)
                if length < 0:
                    raise ValueError
            except ValueError:
                self.close_connection = True
                raise ApiError(400, "invalid Content-Length") from None
            if length > self.server.max_body:
                # The body is not read, so the connection cannot be reused.
                self.close_connection = True
                raise ApiError(413, f"request body exceeds {self.server.max_body} bytes")
            body = self.rfile.read(length)
            if len(body) != length:
                raise ConnectionError("client closed before sending the whole body")
        query = parse_qs(split.query, keep_blank_values=True)
        query.pop("beta", None)  # the SDK's `?beta=true` qualifier
        return Request(method=self.command, path=split.path, query=query, headers=headers, body=body)

    def _send_json(self, status: int, body: Any, rid: str) -> None:
        data = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("request-id", rid)
        if self.close_connection:
            self.send_header("Connection", "close")
        self._end_headers_with(data)

    def _send_bytes(self, resp: BytesResponse, rid: str) -> None:
        self.send_response(resp.status)
        self.send_header("Content-Type", resp.content_type)
        self.send_header("Content-Length", str(len(resp.body)))
        self.send_header("request-id", rid)
        if self.close_connection:
            self.send_header("Connection", "close")
        self._end_headers_with(resp.body)

    def _end_headers_with(self, body: bytes) -> None:
        """End the headers and send them with the body in one write (one segment for a small response,
        one system call, instead of two)."""
        if self.request_version == "HTTP/0.9":  # no status line, no headers: the stdlib buffered none
            self.wfile.write(body)
            return
        self._headers_buffer.append(b"\r\n" + body)  # type: ignore[attr-defined]  # BaseHTTPRequestHandler's
        self.flush_headers()

    def _send_stream(self, resp: StreamResponse, rid: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("request-id", rid)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        for chunk in resp.stream.frames():
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.wfile.write(b"0\r\n\r\n")

    # ------------------------------------------------------ stdlib overrides

    def parse_request(self) -> bool:
        """The stdlib's request-line checks, with the header block read here instead of by the
        stdlib's email parser (about a fifth of the control plane's CPU per request).

        Stricter than the email parser, which reads a line without a colon as the start of the body:
        a header line that is not `token: value`, an obsolete folded line, or a second Content-Length,
        Transfer-Encoding or Host is a 400 and the connection is closed."""
        self.command = None  # type: ignore[assignment]  # set in case of error on the first line
        self.request_version = version = self.default_request_version
        self.close_connection = True
        raw: bytes = self.raw_requestline  # type: ignore[attr-defined]  # set by handle_one_request
        requestline = str(raw, "iso-8859-1").rstrip("\r\n")
        self.requestline = requestline
        words = requestline.split()
        if not words:
            return False
        if len(words) >= 3:  # enough to determine the protocol version
            version = words[-1]
            try:
                if not version.startswith("HTTP/"):
                    raise ValueError
                base_version_number = version.split("/", 1)[1]
                parts = base_version_number.split(".")
                if len(parts) != 2 or any(not p.isdigit() or len(p) > 10 for p in parts):
                    raise ValueError
                version_number = int(parts[0]), int(parts[1])
            except (ValueError, IndexError):
                self.send_error(HTTPStatus.BAD_REQUEST, f"Bad request version ({version!r})")
                return False
            if version_number >= (1, 1) and self.protocol_version >= "HTTP/1.1":
                self.close_connection = False
            if version_number >= (2, 0):
                self.send_error(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, f"Invalid HTTP version ({base_version_number})")
                return False
            self.request_version = version
        if not 2 <= len(words) <= 3:
            self.send_error(HTTPStatus.BAD_REQUEST, f"Bad request syntax ({requestline!r})")
            return False
        command, path = words[:2]
        if len(words) == 2:
            self.close_connection = True
            if command != "GET":
                self.send_error(HTTPStatus.BAD_REQUEST, f"Bad HTTP/0.9 request type ({command!r})")
                return False
        self.command, self.path = command, path
        if self.path.startswith("//"):  # gh-87389, as the stdlib: never read as a scheme-less absolute URI
            self.path = "/" + self.path.lstrip("/")
        problem = self._read_headers()
        if problem is not None:
            self.send_error(*problem)
            return False
        conntype = self.header_map.get("connection", "").lower()
        if conntype == "close":
            self.close_connection = True
        elif conntype == "keep-alive" and self.protocol_version >= "HTTP/1.1":
            self.close_connection = False
        if (self.header_map.get("expect", "").lower() == "100-continue" and self.protocol_version >= "HTTP/1.1"
                and self.request_version >= "HTTP/1.1"):
            return self.handle_expect_100()
        return True

    def _read_headers(self) -> tuple[int, str] | None:
        """Read the header block into `header_map` (names lower-cased; a repeated header's values
        joined with ", ", as HTTP allows); the error to answer when it is malformed."""
        headers: dict[str, str] = {}
        readline = self.rfile.readline
        for _ in range(MAX_HEADERS + 1):
            line = readline(MAX_HEADER_LINE + 1)
            if len(line) > MAX_HEADER_LINE:
                return HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Line too long"
            if line in (b"\r\n", b"\n", b""):
                self.header_map = headers
                self.headers = headers  # type: ignore[assignment]  # a dict, not an email Message
                return None
            name, colon, value = line.partition(b":")
            if not colon or not _TOKEN.fullmatch(name):  # no colon, space before it, or a folded line
                return HTTPStatus.BAD_REQUEST, "malformed header line"
            key = name.decode("ascii").lower()
            text = value.strip(b" \t\r\n").decode("iso-8859-1")
            if key in headers:
                if key in _SINGLE:
                    return HTTPStatus.BAD_REQUEST, f"repeated {key} header"
                text = headers[key] + ", " + text
            headers[key] = text
        return HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Too many headers"

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Malformed requests (bad request line, huge headers) get the JSON error shape too."""
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        err = ApiError(code, message or phrase)
        rid = "req_local_" + secrets.token_hex(10)
        try:
            self._send_json(code, err.body(rid), rid)
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        # Request lines are client-controlled: redact anything shaped like a key.
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s", self.address_string(), redact(format % args))
