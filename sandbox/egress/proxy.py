"""The egress proxy: HTTP/1.1 forward proxy + CONNECT tunnels, one listener per session.

A session is identified only by the listener a connection arrived on (a Unix
socket that only that session's sandbox has mounted), so nothing inside a
sandbox holds a secret. Every rule is enforced here, on the host side:

1. parse the request head (bounded size, bounded time);
2. :func:`acl.precheck` the canonical name and port BEFORE any DNS lookup;
3. resolve it ourselves (:mod:`resolve`: dnspython on the loop, a deadline that cancels
   the lookup, a per-session cap inside a global one, so no session starves another),
   :func:`acl.decide` on every answer, connect to the exact address checked (no second
   lookup, so no rebinding window);
4. on a rule's TLS ports (443 by default) read the ClientHello (:mod:`tls`): it must be TLS
   and name the CONNECT host (no SNI fronting), then either
   - tunnel it end to end (the usual case), or
   - for rules with a credential or method/path rules, TERMINATE it: serve a leaf from the
     session's CA (:mod:`mitm`), check the one request (Host, method/path rules, body cap,
     no TRACE, no upgrade), verify the upstream against the host's trust store, strip what
     the sandbox sent as credentials, inject the rule's credential (:mod:`credentials`:
     values read by the sandbox's owner, kept in memory here) and relay the response;
5. relay with idle/total timeouts and the session's byte budget;
6. write one audit record, into the session's own capped file (a flood evicts only its own).

Plain HTTP is one request per client connection: the proxy forwards exactly the
framed body and nothing after it, so a pipelined second request can never ride
an already-approved upstream connection.

Relaying starts as a plain copy (fewest syscalls for short exchanges) and switches
to splice(2) through a pipe once a transfer is bulk: bytes then go socket to socket
inside the kernel, and the proxy runs about as fast as a bare relay hop can.
The byte budget counts both directions (bytes to and from upstream).

Per request the cost is event-loop turns and Python, not the policy: the daemon runs on
uvloop (:mod:`evloop`), reads and sends go to the socket first and wait for the loop only when
it is not ready, a near upstream that accepted inside connect() is used without a loop turn,
and the pure ACL results are memoised per session for the current policy, keyed by the fresh
answer of a lookup that still happens for every request (bench/bench_egress.py measures it).
A resolver's answer that needs no waiting (a fixed mapping, the hosts file) skips the DNS
deadline and slots; a tunnel relays both directions in its connection's own task until it
turns bulk, and a response is read and copied in one coroutine, each keeping its sockets
watched across waits (:class:`_Waker`) instead of registering them with the loop per wait.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import os
import select
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.egress import acl, http1, tls
from sandbox.egress.audit import AuditLog, AuditRecord, SessionAuditLogs, now_ms
from sandbox.egress.credentials import SessionMaterial, header_value
from sandbox.egress.mitm import BUNDLE_FILE, CA_FILE, SessionCA, host_roots, write_trust_files
from sandbox.egress.resolve import HOSTS_FILE, DnsResolver, hosts_file_addrs
from sandbox.egress.rules import EgressPolicy, EgressRule
from sandbox.egress.unixsock import bind_unix

__all__ = ["HOSTS_FILE", "DnsResolver", "EgressProxy", "StaticResolver", "hosts_file_addrs", "system_resolver"]

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]

DENIED_HEADER = "X-Sandbox-Egress-Denied"
ERROR_HEADER = "X-Sandbox-Egress-Error"
SOCKET_NAME = "proxy.sock"

_CHUNK = 1024 * 1024
_COPY_CHUNK = 64 * 1024
_PIPE_SIZE = 1024 * 1024
_MAX_RESPONSE_HEAD = 64 * 1024
_MAX_CHUNK_LINE = 4096
_SWEEP_S = 0.2
_BUSY_TURNS = 16  # relay turns in a row (reads that found data) before a relay lets the loop run others
_MEMO_MAX = 512  # ACL results kept per session (see _Session.decisions)
_USE_SPLICE = hasattr(os, "splice")
_ESTABLISHED = b"HTTP/1.1 200 Connection Established\r\n\r\n"
_NONBLOCKING_STREAM = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


# The default resolver: hosts file, then DNS for the absolute name, cancellable (resolve.py).
system_resolver = DnsResolver()

# Fairness of name resolution: one session may have this many lookups in flight, all sessions
# together the global number; a session waiting for its own slots never holds a global one.
DNS_PER_SESSION = 4
DNS_GLOBAL = 64
DNS_DEADLINE_S = 5.0


_LITERALS: dict[str, tuple[int, str]] = {}


def _literal(addr: str) -> tuple[int, str]:
    """(family, canonical text) of an address literal; ValueError for anything else, a name
    included. Memoised (bounded): parsing it with ipaddress was a share of every request."""
    got = _LITERALS.get(addr)
    if got is None:
        ip = ipaddress.ip_address(addr)
        if len(_LITERALS) >= 4096:
            _LITERALS.clear()
        got = _LITERALS[addr] = (socket.AF_INET6 if ip.version == 6 else socket.AF_INET, str(ip))
    return got


class StaticResolver:
    """A resolver from a fixed mapping (tests, benchmarks, operators pinning names).
    Unknown names fail like NXDOMAIN."""

    def __init__(self, mapping: Mapping[str, Sequence[str]]) -> None:
        self.mapping = {acl.canonical_host(k): list(v) for k, v in mapping.items()}
        self.queries: list[str] = []

    def answer_now(self, host: str, port: int) -> list[str]:
        """The answer at once (no lookup to wait for: see :meth:`EgressProxy._resolve`)."""
        self.queries.append(host)
        try:
            return list(self.mapping[host])
        except KeyError:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known") from None

    async def __call__(self, host: str, port: int) -> list[str]:
        return self.answer_now(host, port)


class _Refuse(Exception):
    """Answer the client with a proxy-generated response and end the connection."""

    def __init__(self, status: int, code: str, reason: str, *, verdict: str = "deny", header: str = DENIED_HEADER, raw: bytes | None = None) -> None:
        super().__init__(reason)
        self.status, self.code, self.reason, self.verdict, self.header = status, code, reason, verdict, header
        self.raw = raw  # sent instead of an HTTP response (inside a tunnel: a TLS alert, or nothing)


async def _response_head(reader: _Buffered | _TLSReader) -> tuple[bytes, int]:
    """An upstream response head and its status, or a 502 refusal naming what was wrong."""
    try:
        head = await reader.until(b"\r\n\r\n", _MAX_RESPONSE_HEAD)
    except OverflowError:
        head = None
    if head is None:
        raise _Refuse(502, "bad-upstream-response", "upstream sent no valid response head", verdict="error", header=ERROR_HEADER)
    status = http1.response_status(head)
    if status == 0:
        raise _Refuse(502, "bad-upstream-response", "upstream response is not HTTP/1.x", verdict="error", header=ERROR_HEADER)
    return head, status


class _BudgetSpent(Exception):
    pass


@dataclass(eq=False)
class _Session:
    id: str
    policy: EgressPolicy
    socket_path: Path | None = None
    listeners: list[_socket.socket] = field(default_factory=list)
    conns: set[_Conn] = field(default_factory=set)
    bytes_used: int = 0
    closed: bool = False
    dns_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(DNS_PER_SESSION))
    material: SessionMaterial = field(default_factory=SessionMaterial)
    ca: SessionCA | None = None  # only when the policy terminates some host
    upstream_ctx: dict[str | None, ssl.SSLContext] = field(default_factory=dict)
    # acl results for the policy object they were computed under (see decisions())
    _memo: dict[tuple[object, ...], object] = field(default_factory=dict)
    _memo_policy: EgressPolicy | None = None

    def decisions(self) -> dict[tuple[object, ...], object]:
        """Memo of pure ACL results (precheck, decide on a given answer, rule_for) for the
        CURRENT policy: replacing the policy empties it, so no decision outlives the policy
        it came from. Bounded: a session asking for many names just refills it."""
        if self._memo_policy is not self.policy or len(self._memo) >= _MEMO_MAX:
            self._memo = {}
            self._memo_policy = self.policy
        return self._memo

    @property
    def budget_left(self) -> int | None:
        b = self.policy.byte_budget
        return None if b is None else max(0, b - self.bytes_used)

    def charge(self, n: int, by: _Conn) -> int:
        """Account ``n`` bytes; returns how many may still move. Spending the last byte
        closes every other connection of the session too."""
        if self.policy.byte_budget is None:  # no budget: nothing to cut (budget_left is None)
            self.bytes_used += n
            return n
        left = self.budget_left
        assert left is not None
        ok = min(n, left)
        self.bytes_used += ok
        if ok < n or self.budget_left == 0:
            for c in list(self.conns):
                if c is not by:
                    c.kill("budget-exhausted", "session egress byte budget spent")
        return ok


class _Conn:
    """One client connection. A plain class with slots: a dataclass's generated __init__ (eleven
    fields, two clock reads) was a measurable share of a small request."""

    __slots__ = ("session", "client", "started", "last_active", "active", "in_head", "task", "upstream",
                 "killed", "client_tls", "up_tls", "record")

    def __init__(self, session: _Session, client: _socket.socket) -> None:
        self.session, self.client = session, client
        self.started = self.last_active = time.monotonic()
        self.active = False  # traffic since the last sweep (which turns it into last_active)
        self.in_head = True
        self.task: asyncio.Task[None] | None = None
        self.upstream: _socket.socket | None = None
        self.killed: tuple[str, str] | None = None  # (code, reason) set by whoever cancelled us
        self.client_tls: _TLS | None = None  # terminated: plaintext goes through these instead of the sockets
        self.up_tls: _TLS | None = None
        self.record = AuditRecord(session=session.id)

    def touch(self) -> None:
        # A flag, not a clock read: it is set on every read and send, and the sweeper reads the
        # clock once for all connections (idle timeouts are seconds; it runs every _SWEEP_S).
        self.active = True

    def kill(self, code: str, reason: str) -> None:
        if self.killed is None and self.task is not None and not self.task.done():
            self.killed = (code, reason)
            self.task.cancel()


async def _wait_any(read_fd: int | None, write_fd: int | None, deadline: float | None = None) -> None:
    """Until read_fd is readable or write_fd is writable (either may be None); TimeoutError
    once the loop's clock passes ``deadline`` (one timer, no asyncio.timeout context)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    def expired() -> None:
        if not fut.done():
            fut.set_exception(TimeoutError())

    if read_fd is not None:
        loop.add_reader(read_fd, ready)
    if write_fd is not None:
        loop.add_writer(write_fd, ready)
    timer = None if deadline is None else loop.call_at(deadline, expired)
    try:
        await fut
    finally:
        if read_fd is not None:
            loop.remove_reader(read_fd)
        if write_fd is not None:
            loop.remove_writer(write_fd)
        if timer is not None:
            timer.cancel()


async def _recv(sock: _socket.socket, n: int) -> bytes:
    """``loop.sock_recv``, but reading at once when data is there: uvloop's version always
    waits for a poll first (one more loop turn per read; most reads find data waiting)."""
    while True:
        try:
            return sock.recv(n)
        except (BlockingIOError, InterruptedError):
            await _wait_any(sock.fileno(), None)


async def _sendall(sock: _socket.socket, data: bytes | memoryview) -> None:
    """``loop.sock_sendall`` without its per-call future when the socket takes it all at once."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except (BlockingIOError, InterruptedError):
            await _wait_any(None, sock.fileno())


class _Waker:
    """Readiness of a few fds, each watched (level-triggered) until dropped rather than only for
    one wait: a wait is then one future, not a poll handle and an epoll_ctl pair per fd and wait
    (what :func:`_wait_any` costs). Ready reads are keyed by fd, ready writes by ~fd."""

    __slots__ = ("loop", "ready", "fut", "reads", "writes")

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.ready: set[int] = set()
        self.fut: asyncio.Future[None] | None = None
        self.reads: set[int] = set()
        self.writes: set[int] = set()

    def _on(self, key: int) -> None:
        self.ready.add(key)
        fut = self.fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    def want_read(self, fd: int) -> None:
        self.reads.add(fd)
        self.loop.add_reader(fd, self._on, fd)

    def drop_read(self, fd: int) -> None:
        self.reads.discard(fd)
        self.ready.discard(fd)
        self.loop.remove_reader(fd)

    def want_write(self, fd: int) -> None:
        self.writes.add(fd)
        self.loop.add_writer(fd, self._on, ~fd)

    def drop_write(self, fd: int) -> None:
        self.writes.discard(fd)
        self.ready.discard(~fd)
        self.loop.remove_writer(fd)

    async def wait(self) -> set[int]:
        """What became ready since the last call, after at least one loop turn (so a stream
        that is always ready cannot keep other connections off the loop)."""
        fut = self.fut = self.loop.create_future()
        if self.ready:
            self.loop.call_soon(_set_none, fut)
        try:
            await fut
        finally:
            self.fut = None
        ready, self.ready = self.ready, set()
        return ready

    def close(self) -> None:
        for fd in self.reads:
            self.loop.remove_reader(fd)
        for fd in self.writes:
            self.loop.remove_writer(fd)
        self.reads.clear()
        self.writes.clear()


class _End:
    """One direction of a tunnel in :meth:`EgressProxy._tunnel`."""

    __slots__ = ("src", "dst", "direction", "sfd", "dfd", "pending")

    def __init__(self, src: _socket.socket, dst: _socket.socket, direction: str) -> None:
        self.src, self.dst, self.direction = src, dst, direction
        self.sfd, self.dfd = src.fileno(), dst.fileno()
        self.pending = b""  # read, charged, not yet taken by dst


def _set_none(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Buffered:
    """Reads from a non-blocking socket with a small user-space buffer, for heads and
    chunked framing; :meth:`take` hands the unread rest to the splice relay."""

    _raw = True  # reads the socket itself (a subclass reading something else overrides _fill and sets False)
    waker: _Waker | None = None  # set when the caller keeps the socket watched (else a wait per read)

    def __init__(self, sock: _socket.socket, conn: _Conn) -> None:
        self.sock, self.conn, self.buf = sock, conn, bytearray()

    async def _fill(self) -> bool:
        data = await _recv(self.sock, 65536)
        if data:
            self.buf += data
            self.conn.active = True
        return bool(data)

    async def until(self, sep: bytes, limit: int) -> bytes | None:
        """Up to and including ``sep``; None on EOF; raises OverflowError past ``limit``."""
        if self._raw and not self.buf:  # the usual head: one read holds all of it (no bytearray work)
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                data = None
            if data is not None:
                if not data:
                    return None
                self.conn.active = True
                i = data.find(sep)
                end = i + len(sep)
                if i >= 0 and end <= limit:
                    if end < len(data):
                        self.buf += data[end:]
                    return data if end == len(data) else data[:end]
                self.buf += data
        start = 0
        while True:
            i = self.buf.find(sep, start)
            if i >= 0:
                end = i + len(sep)
                if end > limit:
                    raise OverflowError
                out = bytes(self.buf[:end])
                del self.buf[:end]
                return out
            if len(self.buf) > limit:
                raise OverflowError
            start = max(0, len(self.buf) - len(sep) + 1)
            if self._raw:  # _fill inlined: a head is read about three times per request
                try:
                    data = self.sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    if self.waker is not None:
                        await self.waker.wait()
                    else:
                        await _wait_any(self.sock.fileno(), None)
                    continue
                if not data:
                    return None
                self.buf += data
                self.conn.active = True
            elif not await self._fill():
                return None

    async def exact(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            if not await self._fill():
                return None
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def take(self, max_n: int | None = None) -> bytes:
        n = len(self.buf) if max_n is None else min(max_n, len(self.buf))
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


class _TLS:
    """TLS over one of our non-blocking sockets with ``ssl.SSLObject`` and memory BIOs: bytes the
    proxy already read (a ClientHello behind the CONNECT) go straight into the incoming BIO."""

    def __init__(self, sock: _socket.socket, ctx: ssl.SSLContext, conn: _Conn, *, server_side: bool,
                 server_hostname: str | None = None, early: bytes = b"") -> None:
        self.sock, self.conn = sock, conn
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_side=server_side, server_hostname=server_hostname)
        if early:
            self.inc.write(early)

    async def _flush(self) -> None:
        data = self.out.read()
        if data:
            await _sendall(self.sock, data)
            self.conn.touch()

    async def _fill(self) -> None:
        data = await _recv(self.sock, 65536)
        if data:
            self.inc.write(data)
            self.conn.touch()
        else:
            self.inc.write_eof()

    async def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
                await self._flush()
                return
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
            except ssl.SSLError:
                with contextlib.suppress(OSError):
                    await self._flush()  # our alert, so the peer learns why
                raise

    async def recv(self, n: int = 65536) -> bytes:
        """Plaintext; b"" after the peer's close_notify. An EOF without close_notify raises
        (ssl.SSLEOFError): a truncated response must not look complete."""
        while True:
            try:
                return self.obj.read(n)
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
            except ssl.SSLZeroReturnError:
                return b""

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = self.obj.write(view[:16384])
            view = view[n:]
            await self._flush()

    async def close(self) -> None:
        """close_notify, best effort."""
        with contextlib.suppress(ssl.SSLError, OSError, ValueError):
            self.obj.unwrap()
        with contextlib.suppress(ssl.SSLError, OSError):
            await self._flush()


class _TLSReader(_Buffered):
    """:class:`_Buffered` over a :class:`_TLS` (heads, chunked framing inside a terminated tunnel)."""

    _raw = False

    def __init__(self, t: _TLS, conn: _Conn) -> None:
        super().__init__(t.sock, conn)
        self.t = t

    async def _fill(self) -> bool:
        data = await self.t.recv()
        if data:
            self.buf += data
        return bool(data)


class _LeakGuard:
    """Watches a byte stream for any of ``needles`` (a credential's value and header value), also
    across chunk boundaries, so an upstream that echoes the injected header cannot hand it to
    the sandbox."""

    def __init__(self, needles: Sequence[bytes]) -> None:
        self.needles = [n for n in needles if n]
        self.keep = max((len(n) for n in self.needles), default=1) - 1
        self.tail = b""

    def hit(self, data: bytes) -> bool:
        if not self.needles:
            return False
        window = self.tail + data
        found = any(n in window for n in self.needles)
        self.tail = window[-self.keep:] if self.keep else b""
        return found


class EgressProxy:
    """The proxy. All methods must be called from the event loop it runs on."""

    def __init__(self, resolver: Resolver | None = None, audit: AuditLog | SessionAuditLogs | None = None, *,
                 dns_per_session: int = DNS_PER_SESSION, dns_global: int = DNS_GLOBAL) -> None:
        self.resolver: Resolver = resolver or system_resolver
        self.audit = audit
        self.dns_per_session = dns_per_session
        self._dns_slots = asyncio.Semaphore(dns_global)
        self._roots: bytes | None = None  # the host's trust store, read once for the sandboxes' bundles
        self.upstream_cafile: str | None = None  # None: the host's default trust store for upstreams
        self._sessions: dict[str, _Session] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self.on_record: Callable[[AuditRecord], None] | None = None  # e.g. the CLI's live view

    # ------------------------------------------------------------ sessions

    async def add_session(self, session_id: str, policy: EgressPolicy, socket_dir: Path, material: SessionMaterial | None = None) -> Path:
        """Listen for ``session_id`` on ``socket_dir/proxy.sock`` (mode 0666: the sandbox's
        uid must connect; only that sandbox gets ``socket_dir`` mounted). Re-adding a live
        session replaces its policy for new connections and keeps its socket.

        ``material`` holds the values of the credentials the policy injects (read on the host
        by the sandbox's owner, never by the sandbox). The directory also gets ``ca.pem`` and
        ``ca-bundle.pem``: the session CA for terminated hosts, and the host's roots plus it."""
        self._check_material(policy, material)
        existing = self._sessions.get(session_id)
        if existing is not None and existing.socket_path is not None:
            existing.policy = policy
            self._setup_tls(existing, material, existing.socket_path.parent)
            return existing.socket_path
        socket_dir = Path(socket_dir)
        socket_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
        if socket_dir.is_symlink() or not socket_dir.is_dir():
            raise ValueError(f"{socket_dir} is not a plain directory")
        os.chmod(socket_dir, 0o711)  # its parent is ours alone, so no swap can race this
        path = socket_dir / SOCKET_NAME
        sess = existing or self._new_session(session_id, policy)
        sess.policy = policy
        self._setup_tls(sess, material, socket_dir)
        sock = bind_unix(path, 0o666)
        sess.socket_path = path
        self._listen(sess, sock)
        return path

    @staticmethod
    def _check_material(policy: EgressPolicy, material: SessionMaterial | None) -> None:
        m = material or SessionMaterial()
        missing = sorted({r.credential.name for r in policy.rules if r.credential is not None} - set(m.secrets))
        if missing:
            raise ValueError(f"no value given for credential(s) {', '.join(missing)}")
        cas = sorted({r.upstream_ca for r in policy.rules if r.upstream_ca is not None} - set(m.upstream_cas))
        if cas:
            raise ValueError(f"upstream CA file(s) not provided: {', '.join(cas)}")
        for path, pem in m.upstream_cas.items():
            try:
                ssl.create_default_context(cadata=pem)
            except (ssl.SSLError, ValueError):
                raise ValueError(f"upstream CA {path} holds no usable certificate") from None

    def _setup_tls(self, sess: _Session, material: SessionMaterial | None, socket_dir: Path | None) -> None:
        sess.material = material or SessionMaterial()
        sess.upstream_ctx = {}
        hosts = {r.host for r in sess.policy.rules if r.terminates}
        if not hosts:
            sess.ca = None
        elif sess.ca is None or sess.ca.hosts != hosts:
            sess.ca = SessionCA(hosts)  # its name constraints list exactly these hosts
        if socket_dir is not None:
            if self._roots is None:
                self._roots = host_roots()
            write_trust_files(socket_dir, sess.ca.pem if sess.ca else None, self._roots)

    async def add_tcp_listener(self, session_id: str, policy: EgressPolicy, host: str = "127.0.0.1", port: int = 0,
                               material: SessionMaterial | None = None) -> tuple[str, int]:
        """An extra TCP listener bound to one fixed session (operators testing rules, benches).
        Loopback only: a TCP port cannot tell sandboxes apart."""
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError("the TCP listener binds loopback addresses only")
        self._check_material(policy, material)
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(fam, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(256)
        sock.setblocking(False)
        sess = self._sessions.get(session_id) or self._new_session(session_id, policy)
        sess.policy = policy
        self._setup_tls(sess, material, None)
        self._listen(sess, sock)
        bound = sock.getsockname()
        return str(bound[0]), int(bound[1])

    def _new_session(self, session_id: str, policy: EgressPolicy) -> _Session:
        return _Session(session_id, policy, dns_slots=asyncio.Semaphore(self.dns_per_session))

    def _listen(self, sess: _Session, sock: _socket.socket) -> None:
        self._sessions[sess.id] = sess
        sess.listeners.append(sock)
        self._watch(sess, sock)
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def remove_session(self, session_id: str) -> None:
        """Stop listening, close every connection of the session, remove its socket."""
        sess = self._sessions.pop(session_id, None)
        if sess is None:
            return
        sess.closed = True
        loop = asyncio.get_running_loop()
        for s in sess.listeners:
            if s.fileno() >= 0:
                loop.remove_reader(s.fileno())
            s.close()
        tasks = [c.task for c in sess.conns if c.task is not None]
        for c in list(sess.conns):
            c.kill("session-removed", "the session ended")
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        if isinstance(self.audit, SessionAuditLogs):
            self.audit.close_session(session_id)
        if sess.socket_path is not None:
            for name in (SOCKET_NAME, CA_FILE, BUNDLE_FILE):
                with contextlib.suppress(OSError):
                    os.unlink(sess.socket_path.parent / name)
            with contextlib.suppress(OSError):
                sess.socket_path.parent.rmdir()

    def session_ca_pem(self, session_id: str) -> bytes | None:
        """The session CA certificate (public), or None when the session terminates nothing."""
        ca = self._sessions[session_id].ca
        return None if ca is None else ca.pem

    def sessions(self) -> list[str]:
        return sorted(self._sessions)

    def session_info(self, session_id: str) -> dict[str, object]:
        s = self._sessions[session_id]
        return {"session": s.id, "connections": len(s.conns), "bytes_used": s.bytes_used, "budget_left": s.budget_left}

    async def close(self) -> None:
        for sid in list(self._sessions):
            await self.remove_session(sid)
        if self._sweeper is not None:
            self._sweeper.cancel()

    # ------------------------------------------------------------ plumbing

    def _on_acceptable(self, sess: _Session, lsock: _socket.socket) -> None:
        """Reader callback kept registered for the listener's life: accepting everything that
        is pending per wake-up costs no per-connection epoll_ctl or future."""
        loop = asyncio.get_running_loop()
        family = lsock.family
        tcp = family != socket.AF_UNIX
        for _ in range(64):  # bounded, so one busy session cannot monopolise a loop turn
            try:
                # socket.accept() converts family and type to enums for every connection
                fd, _ = lsock._accept()  # type: ignore[attr-defined]  # CPython: what accept() calls
                sock = _socket.socket(family, socket.SOCK_STREAM, 0, fd)  # the C type: socket.socket's __init__ and close are Python
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of fds: stop watching for a moment rather than spin on a ready listener.
                    loop.remove_reader(lsock.fileno())
                    loop.call_later(0.1, self._watch, sess, lsock)
                return
            sock.setblocking(False)
            if tcp:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sess, sock)
            conn.task = loop.create_task(self._serve(conn))

    def _watch(self, sess: _Session, lsock: _socket.socket) -> None:
        if not sess.closed and lsock.fileno() >= 0:
            asyncio.get_running_loop().add_reader(lsock.fileno(), self._on_acceptable, sess, lsock)

    async def _sweep(self) -> None:
        """One timer for all connections: cheaper than a wait_for around every read, and the
        only thing that can stop a client that trickles one byte at a time."""
        while True:
            await asyncio.sleep(_SWEEP_S)
            now = time.monotonic()
            for sess in list(self._sessions.values()):
                p = sess.policy
                for c in list(sess.conns):
                    if c.active:  # traffic since the last sweep: idle from now on at the earliest
                        c.active = False
                        c.last_active = now
                    if c.in_head and now - c.started > p.header_timeout_s:
                        c.kill("header-timeout", f"request head not received within {p.header_timeout_s:g}s")
                    elif now - c.started > p.total_timeout_s:
                        c.kill("total-timeout", f"connection exceeded {p.total_timeout_s:g}s")
                    elif now - c.last_active > p.idle_timeout_s:
                        c.kill("idle-timeout", f"no traffic for {p.idle_timeout_s:g}s")

    def _emit(self, rec: AuditRecord) -> None:
        if self.audit is not None:
            self.audit.write(rec)
        if self.on_record is not None:
            self.on_record(rec)

    async def _serve(self, conn: _Conn) -> None:
        sess, rec = conn.session, conn.record
        try:
            if sess.closed:
                return
            if len(sess.conns) >= sess.policy.max_connections:
                raise _Refuse(429, "too-many-connections", f"session already has {sess.policy.max_connections} open connections")
            sess.conns.add(conn)
            await self._handle(conn)
        except _Refuse as r:
            rec.decision, rec.code, rec.reason = r.verdict, r.code, r.reason  # type: ignore[assignment]
            body = f"sandbox egress proxy refused this request: {r.reason}"
            with contextlib.suppress(OSError):
                conn.client.send(r.raw if r.raw is not None else http1.refusal(r.status, r.header, f"{r.code}: {r.reason}", body))
        except asyncio.CancelledError:
            if conn.killed is None:
                raise
            code, reason = conn.killed
            if rec.decision != "allow":
                rec.decision = "deny"
            rec.code, rec.reason = code, reason
            if conn.in_head:
                status = 408 if code == "header-timeout" else 403
                with contextlib.suppress(OSError):
                    conn.client.send(http1.refusal(status, DENIED_HEADER, f"{code}: {reason}", reason))
        except _BudgetSpent:
            rec.code, rec.reason = "budget-exhausted", "session egress byte budget spent; connection closed"
        except (OSError, EOFError) as e:
            if rec.decision == "allow":
                rec.code, rec.reason = rec.code or "allowed", f"{rec.reason}; connection ended: {type(e).__name__}"
            else:
                rec.decision, rec.code, rec.reason = "error", "client-error", f"client connection failed: {type(e).__name__}"
        except Exception as e:  # noqa: BLE001 - one bad connection must never take the proxy down
            rec.decision, rec.code, rec.reason = "error", "internal-error", f"proxy error: {type(e).__name__}"
            with contextlib.suppress(OSError):
                conn.client.send(http1.refusal(502, ERROR_HEADER, "internal-error", "sandbox egress proxy: internal error"))
        finally:
            sess.conns.discard(conn)
            # Audit before closing: once a client sees EOF, its decision is on record.
            if rec.reason or rec.host or rec.method:  # a silent connect+close is not a decision
                rec.duration_ms = now_ms(conn.started)
                self._emit(rec)
            for s in (conn.client, conn.upstream):
                if s is not None:
                    s.close()

    async def _handle(self, conn: _Conn) -> None:
        sess, rec, pol = conn.session, conn.record, conn.session.policy
        reader = _Buffered(conn.client, conn)
        try:
            head = await reader.until(b"\r\n\r\n", pol.max_header_bytes)
        except OverflowError:
            raise _Refuse(431, "headers-too-large", f"request head exceeds {pol.max_header_bytes} bytes") from None
        if head is None:
            if reader.buf:
                raise _Refuse(400, "bad-request", "connection closed inside the request head")
            return
        conn.in_head = False
        try:
            req = http1.parse_head(head)
            rec.method = req.method
            if req.method == "CONNECT":
                host, port = http1.connect_target(req)
                fwd = None
            else:
                fwd = http1.forward_target(req)
                host, port = fwd.host, fwd.port
                rec.path = fwd.log_path
                framing = http1.body_framing(req)
        except http1.ProtocolError as e:
            raise _Refuse(e.status, e.code, e.reason) from None
        rec.host, rec.port = host, port

        if sess.policy.byte_budget is not None and sess.budget_left == 0:
            raise _Refuse(403, "budget-exhausted", "session egress byte budget spent")
        decision = self._decide_now(sess, host, port) or await self._decide(sess, host, port)
        rec.rule, rec.addr = decision.rule, decision.addr
        if not decision.allowed:
            raise _Refuse(403, decision.code, decision.reason)
        rule = None if (decision.rule or "").startswith("cidr:") else self._rule_for(sess, host, port)
        if fwd is not None and rule is not None and rule.terminates:
            raise _Refuse(403, "plaintext-terminated-host", f"{host} is reached over TLS only: its rule {rule.label()} "
                          "injects a credential or checks requests (use https://)")
        tls_checked = fwd is None and (rule.tls_port_set if rule is not None else port == 443)
        if not tls_checked:
            await self._open_upstream(conn, decision, port)

        if fwd is None:
            try:
                sent = conn.client.send(_ESTABLISHED)  # all of it, nearly always: no coroutine for it
            except (BlockingIOError, InterruptedError):
                sent = 0
            if sent < len(_ESTABLISHED):
                await _sendall(conn.client, _ESTABLISHED[sent:])
            conn.active = True
            if tls_checked:
                # The ClientHello is read and checked before any connection upstream: a refused
                # server name never costs the allowed host a handshake.
                hello = await self._client_hello(conn, reader)
                self._check_sni(conn, hello, host, rule)
                try:
                    await self._open_upstream(conn, decision, port)
                except _Refuse as e:  # past our 200 the client speaks TLS: answer with an alert
                    raise _Refuse(e.status, e.code, e.reason, verdict=e.verdict, header=e.header,
                                  raw=tls.alert(tls.ALERT_HANDSHAKE_FAILURE)) from None
                if rule is not None and rule.terminates:
                    await self._terminate(conn, reader, rule, host, port)
                    return
            early = reader.take()  # e.g. a TLS ClientHello sent without waiting for our 200
            if early:
                await self._send_up(conn, early)
            upstream = conn.upstream
            assert upstream is not None  # opened above, before or after the hello was checked
            await self._tunnel(conn, conn.client, upstream)
        else:
            await self._send_up(conn, http1.upstream_head(req, fwd, framing))
            if framing == 0:
                await self._response(conn)  # no body to forward: skip the second task
            else:
                await _both(self._request_body(conn, reader, framing), self._response(conn), b_ends_all=True)

    async def _open_upstream(self, conn: _Conn, decision: acl.Decision, port: int) -> None:
        conn.upstream, addr = await self._connect(decision, port, conn.session.policy.connect_timeout_s)
        rec = conn.record
        rec.decision, rec.code, rec.reason = "allow", "allowed", decision.reason
        rec.addr = addr  # the checked address connected to, as getpeername() would give it back

    async def _client_hello(self, conn: _Conn, reader: _Buffered) -> tls.Hello:
        """The tunnel's first bytes as a ClientHello (they stay in ``reader`` to be forwarded).
        A client that sends anything else on a TLS port is refused: an HTTP 403 for plaintext
        (that client reads it), a TLS alert for a malformed hello."""
        limit = conn.session.policy.header_timeout_s
        conn.record.tls = "tunnel"
        try:
            async with asyncio.timeout(limit):
                while True:
                    try:
                        return tls.read_hello(bytes(reader.buf))
                    except tls.NeedMore:
                        if len(reader.buf) > tls.MAX_HELLO + 64 or not await reader._fill():
                            raise tls.BadHello("the client ended inside its ClientHello") from None
        except TimeoutError:
            raise _Refuse(408, "handshake-timeout", f"no complete TLS ClientHello within {limit:g}s", raw=b"") from None
        except tls.NotTLS:
            raise _Refuse(403, "not-tls", "this port of the rule carries TLS only; the tunnel did not start with a TLS ClientHello") from None
        except tls.BadHello as e:
            raise _Refuse(403, "bad-client-hello", f"malformed TLS ClientHello: {e}", raw=tls.alert(tls.ALERT_HANDSHAKE_FAILURE)) from None

    def _check_sni(self, conn: _Conn, hello: tls.Hello, host: str, rule: EgressRule | None) -> None:
        """The ClientHello must name the CONNECT host: no other name behind an allowed address."""
        if hello.sni is not None:
            conn.record.sni = hello.sni[:253]
        label = rule.label() if rule is not None else "the allowed address range"
        if hello.ech and not (rule is not None and rule.allow_ech):
            raise _Refuse(403, "ech-refused", f"encrypted ClientHello (ECH) hides the real server name ({label})", raw=tls.alert(tls.ALERT_ACCESS_DENIED))
        if rule is not None and rule.sni == "off":
            return
        if hello.sni is None:
            if acl.is_ip_literal(host) or (rule is not None and rule.sni == "allow-missing"):
                return
            raise _Refuse(403, "sni-missing", f"the TLS ClientHello names no server; {host} requires one ({label})", raw=tls.alert(tls.ALERT_ACCESS_DENIED))
        try:
            named = acl.canonical_host(hello.sni)
        except acl.HostError:
            named = None
        if named != host:
            raise _Refuse(403, "sni-mismatch", f"the TLS ClientHello names another server than the CONNECT target {host} ({label})",
                          raw=tls.alert(tls.ALERT_UNRECOGNIZED_NAME))

    def _decide_now(self, sess: _Session, host: str, port: int) -> acl.Decision | None:
        """precheck (before any lookup), our own resolution, then decide on exactly that
        answer; None when the resolution has to be awaited (:meth:`_decide`). The ACL
        functions are pure, so their results are memoised per session and policy, keyed by
        everything they read (the answer included); the lookup itself happens for every
        request."""
        pol, memo = sess.policy, sess.decisions()
        pre = memo.get(("pre", host, port))
        if pre is None:
            pre = memo[("pre", host, port)] = acl.precheck(pol, host, port)
        assert isinstance(pre, acl.Decision)
        addrs: tuple[str, ...] = ()
        if pre.allowed and not acl.is_ip_literal(host):
            now = self._answer_now(host, port)
            if now is None:
                return None
            addrs = tuple(now)
        return self._decided(sess, host, port, addrs)

    async def _decide(self, sess: _Session, host: str, port: int) -> acl.Decision:
        """The rest of :meth:`_decide_now` for a name whose precheck passed and whose answer
        has to be awaited."""
        pol = sess.policy
        addrs = tuple(await self._resolve(sess, host, port))
        if sess.policy is not pol:  # replaced during the lookup: decided under the request's own policy
            return acl.decide(pol, host, port, addrs)
        return self._decided(sess, host, port, addrs)

    @staticmethod
    def _decided(sess: _Session, host: str, port: int, addrs: tuple[str, ...]) -> acl.Decision:
        memo = sess.decisions()
        got = memo.get(("dec", host, port, addrs))
        if got is None:
            got = memo[("dec", host, port, addrs)] = acl.decide(sess.policy, host, port, addrs)
        assert isinstance(got, acl.Decision)
        return got

    @staticmethod
    def _rule_for(sess: _Session, host: str, port: int) -> EgressRule | None:
        memo = sess.decisions()
        key = ("rule", host, port)
        if key not in memo:
            memo[key] = acl.rule_for(sess.policy, host, port)
        rule = memo[key]
        assert rule is None or isinstance(rule, EgressRule)
        return rule

    def _answer_now(self, host: str, port: int) -> Sequence[str] | None:
        """The resolver's answer when it has one without waiting (its ``answer_now``: a fixed
        mapping, the hosts file), else None. Nothing waits, so no slot or deadline is involved."""
        now = getattr(self.resolver, "answer_now", None)
        if now is None:
            return None
        try:
            got: Sequence[str] | None = now(host, port)
        except (OSError, LookupError):
            raise _Refuse(502, "dns-failure", f"could not resolve {host}", verdict="error", header=ERROR_HEADER) from None
        return got

    async def _resolve(self, sess: _Session, host: str, port: int) -> Sequence[str]:
        """Resolve under the session's deadline, in one of the session's own slots first and
        then one of the global ones: a session flooding slow names queues behind itself and
        holds at most DNS_PER_SESSION global slots. The deadline cancels the lookup itself
        (the resolver runs on the loop, not in a thread that would keep going)."""
        lookup = getattr(self.resolver, "answer_later", self.resolver)  # after answer_now had none
        try:
            async with asyncio.timeout(min(sess.policy.connect_timeout_s, DNS_DEADLINE_S)):  # no extra task, unlike wait_for
                async with sess.dns_slots, self._dns_slots:
                    result: Sequence[str] = await lookup(host, port)
                    return result
        except (OSError, TimeoutError, LookupError):
            raise _Refuse(502, "dns-failure", f"could not resolve {host}", verdict="error", header=ERROR_HEADER) from None

    async def _connect(self, decision: acl.Decision, port: int, timeout: float) -> tuple[_socket.socket, str]:
        """Connect to the checked addresses only, in order; the socket and the address (canonical
        text). Never a name: no second lookup (a non-blocking connect of our own: the loop's
        sock_connect may pass even a numeric address through getaddrinfo)."""
        deadline: float | None = None
        last: str = "no address"
        for addr in decision.addrs or ((decision.addr,) if decision.addr else ()):
            family, literal = _literal(addr)  # the checked address, as text: a literal, never a name
            sock = _socket.socket(family, _NONBLOCKING_STREAM)  # non-blocking from the start: no ioctl
            try:
                err = sock.connect_ex((literal, port))
                if err in (errno.EINPROGRESS, errno.EAGAIN, errno.EINTR):
                    # A near upstream (loopback, a LAN) has usually answered before connect()
                    # returns: one poll(2) then saves a loop turn; a far one is waited for.
                    ready = select.poll()
                    ready.register(sock.fileno(), select.POLLOUT)
                    if not ready.poll(0):
                        if deadline is None:  # taken when connect has to wait; one for all the addresses tried
                            deadline = asyncio.get_running_loop().time() + timeout
                        await _wait_any(None, sock.fileno(), deadline)
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err))
            except (OSError, TimeoutError) as e:
                sock.close()
                last = "timed out" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__)
                if isinstance(e, TimeoutError):
                    break
                continue
            except BaseException:
                sock.close()
                raise
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock, literal
        raise _Refuse(502, "upstream-unreachable", f"could not connect to {decision.addr} port {port}: {last}", verdict="error", header=ERROR_HEADER)


    # ------------------------------------------------------------ terminated hosts

    def _upstream_context(self, sess: _Session, rule: EgressRule) -> ssl.SSLContext:
        """Verify the upstream against the HOST's trust store (never the sandbox's bundle), plus
        the rule's extra CA; HTTP/1.1 only."""
        key = rule.upstream_ca
        ctx = sess.upstream_ctx.get(key)
        if ctx is None:
            ctx = ssl.create_default_context(cafile=self.upstream_cafile)
            if key is not None:
                ctx.load_verify_locations(cadata=sess.material.upstream_cas[key])
            ctx.set_alpn_protocols(["http/1.1"])
            sess.upstream_ctx[key] = ctx
        return ctx

    async def _terminate(self, conn: _Conn, reader: _Buffered, rule: EgressRule, host: str, port: int) -> None:
        """Be the server for ``host`` (a leaf from the session CA), check the one request the
        client sends, then be its client towards the real upstream (verified), inject the
        rule's credential and relay the response. One request per connection, as plain HTTP."""
        sess, rec, pol = conn.session, conn.record, conn.session.policy
        rec.tls = "terminated"
        assert sess.ca is not None and conn.upstream is not None
        client = _TLS(conn.client, sess.ca.server_context(host), conn, server_side=True, early=reader.take())
        try:
            async with asyncio.timeout(pol.header_timeout_s):
                await client.handshake()
        except TimeoutError:
            raise _Refuse(408, "handshake-timeout", f"TLS handshake not finished within {pol.header_timeout_s:g}s", raw=b"") from None
        except ssl.SSLError as e:
            why = str(getattr(e, "reason", "") or "")
            if any(k in why for k in ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN", "DECRYPT_ERROR")):
                raise _Refuse(403, "client-rejected-leaf", "the client does not trust the session CA (is its CA bundle "
                              "/run/sandbox-egress/ca-bundle.pem? clients that pin certificates need a tunnelled host)", raw=b"") from None
            raise _Refuse(403, "handshake-failed", f"TLS handshake with the client failed: {why or type(e).__name__}", raw=b"") from None
        conn.client_tls = client
        try:
            await self._terminated_exchange(conn, client, rule, host, port)
        except _Refuse as r:
            if rec.status is None:  # nothing of a response sent yet: the refusal goes inside the TLS
                body = f"sandbox egress proxy refused this request: {r.reason}"
                with contextlib.suppress(OSError, ssl.SSLError):
                    await client.send(http1.refusal(r.status, r.header, f"{r.code}: {r.reason}", body))
                    await client.close()
                rec.status = r.status
            r.raw = b""
            raise
        await client.close()

    async def _terminated_exchange(self, conn: _Conn, client: _TLS, rule: EgressRule, host: str, port: int) -> None:
        sess, rec, pol = conn.session, conn.record, conn.session.policy
        creader = _TLSReader(client, conn)
        try:
            async with asyncio.timeout(pol.header_timeout_s):
                head = await creader.until(b"\r\n\r\n", pol.max_header_bytes)
        except OverflowError:
            raise _Refuse(431, "headers-too-large", f"request head exceeds {pol.max_header_bytes} bytes") from None
        except TimeoutError:
            raise _Refuse(408, "header-timeout", f"request head not received within {pol.header_timeout_s:g}s") from None
        if head is None:
            if creader.buf.startswith(b"PRI * HTTP/2.0"):
                raise _Refuse(505, "h2-refused", "HTTP/2 is not spoken on terminated hosts (ALPN offers http/1.1 only)")
            raise _Refuse(400, "bad-request", "connection closed before a request head", raw=b"")
        if head.startswith(b"PRI * HTTP/2.0"):
            raise _Refuse(505, "h2-refused", "HTTP/2 is not spoken on terminated hosts (ALPN offers http/1.1 only)")
        try:
            req = http1.parse_head(head)
            rec.method = req.method
            target = req.target
            if "://" in target:  # absolute-form must name this very host
                scheme, _, rest = target.partition("://")
                authority, slash, tail = rest.partition("/")
                if scheme.lower() != "https" or acl.parse_authority(authority, 443, allow_userinfo=False) != (host, port):
                    raise _Refuse(421, "misdirected", f"the request names another host than the tunnel's {host}")
                target = slash + tail
            path, query = http1.origin_path(target)
            rec.path = path[:256]
            hosts = req.get_all("host")
            if len(hosts) != 1 or acl.parse_authority(hosts[0], 443, allow_userinfo=False) != (host, port):
                raise _Refuse(421, "misdirected", f"the Host header must name the tunnel's host {host}")
            framing = http1.body_framing(req)
        except http1.ProtocolError as e:
            raise _Refuse(e.status, e.code, e.reason) from None
        except acl.HostError:
            raise _Refuse(421, "misdirected", f"the Host header must name the tunnel's host {host}") from None
        if req.method in ("TRACE", "TRACK", "CONNECT"):
            raise _Refuse(405, "method-not-allowed", f"{req.method} is never allowed on a terminated host (rule {rule.label()})")
        which = rule.http_rule_for(req.method, path)
        if which is None:
            raise _Refuse(403, "path-denied", f"{req.method} {path} is not allowed by rule {rule.label()}")
        if req.get_all("upgrade"):
            raise _Refuse(501, "upgrade-refused", f"protocol upgrades (WebSocket) are not relayed on terminated hosts (rule {rule.label()})")
        cap = rule.max_body_bytes
        if cap is not None and isinstance(framing, int) and framing > cap:
            raise _Refuse(413, "body-too-large", f"request body of {framing} bytes exceeds {cap} (rule {rule.label()})")

        add: list[tuple[str, str]] = []
        strip: set[str] = {"authorization", "proxy-authorization"}
        needles: list[bytes] = []
        cred = rule.credential
        if cred is not None:
            # Whatever the sandbox sends as credentials for this host is dropped, injected or not:
            # it must not reach the host with its own account.
            strip |= {http1.fold_name(cred.header), "cookie"}
            secret = sess.material.secrets[cred.name]
            value = header_value(cred, secret)
            needles = [secret.encode(), value.encode()]
            if path.startswith(cred.path_prefix) or path + "/" == cred.path_prefix:
                add.append((cred.header, value))
                rec.credential = cred.name

        # The upstream's identity is checked BEFORE a credential is written to it.
        assert conn.upstream is not None
        up = _TLS(conn.upstream, self._upstream_context(sess, rule), conn, server_side=False, server_hostname=host)
        try:
            async with asyncio.timeout(pol.connect_timeout_s):
                await up.handshake()
        except ssl.SSLCertVerificationError as e:
            raise _Refuse(502, "upstream-cert", f"the upstream's certificate for {host} did not verify: {e.verify_message}",
                          verdict="error", header=ERROR_HEADER) from None
        except (ssl.SSLError, OSError, TimeoutError) as e:
            raise _Refuse(502, "upstream-tls", f"TLS with the upstream {host} failed: {type(e).__name__}", verdict="error", header=ERROR_HEADER) from None
        conn.up_tls = up
        host_header = host if port == 443 else f"{host}:{port}"
        if ":" in host:
            host_header = f"[{host}]" if port == 443 else f"[{host}]:{port}"
        upstream_head = http1.terminated_head(req, host_header, path + query, framing, frozenset(strip), add)
        await self._send_up(conn, upstream_head)
        response = self._terminated_response(conn, up, client, _LeakGuard(needles))
        if framing == 0:
            await response
        else:
            await _both(self._request_body(conn, creader, framing, cap), response, b_ends_all=True)
        await up.close()

    async def _terminated_response(self, conn: _Conn, up: _TLS, client: _TLS, guard: _LeakGuard) -> None:
        rec = conn.record
        ureader = _TLSReader(up, conn)
        while True:
            head, status = await _response_head(ureader)
            if guard.hit(head):
                raise _Refuse(502, "leak-blocked", "the upstream's response repeated the injected credential", verdict="error", header=ERROR_HEADER)
            if 100 <= status < 200 and status != 101:
                await self._send_down(conn, head)
                continue
            break
        rec.status = status
        first = http1.rewrite_response_head(head) + ureader.take()
        if guard.hit(first[len(head):]):
            rec.code = "leak-blocked"
            raise EOFError  # the head is not sent: the client sees the connection close
        await self._send_down(conn, first)
        turns = 0
        while True:
            data = await up.recv()
            if not data:
                return
            if guard.hit(data):
                rec.code, rec.reason = "leak-blocked", "the upstream's response repeated the injected credential; connection cut"
                raise EOFError
            await self._send_down(conn, data)
            turns += 1
            if turns % _BUSY_TURNS == 0:
                await asyncio.sleep(0)  # reads and sends that never wait would keep other sessions off the loop

    # ------------------------------------------------------------ relaying

    @staticmethod
    def _account(conn: _Conn, n: int, direction: str) -> int:
        sess = conn.session
        if sess.policy.byte_budget is None:  # charge() without a budget to cut, inlined
            sess.bytes_used += n
            ok = n
        else:
            ok = sess.charge(n, conn)
        if direction == "up":
            conn.record.bytes_up += ok
        else:
            conn.record.bytes_down += ok
        conn.active = True
        return ok

    async def _send(self, sock: _socket.socket, data: bytes, conn: _Conn) -> None:
        try:
            n = sock.send(data)  # usually all of it: no second coroutine then
        except (BlockingIOError, InterruptedError):
            n = 0
        if n < len(data):
            await _sendall(sock, memoryview(data)[n:])
        conn.active = True

    async def _send_up(self, conn: _Conn, data: bytes) -> None:
        assert conn.upstream is not None
        ok = self._account(conn, len(data), "up")
        if conn.up_tls is not None:
            await conn.up_tls.send(data[:ok])
        else:
            await self._send(conn.upstream, data[:ok], conn)
        if ok < len(data):
            raise _BudgetSpent

    async def _send_down(self, conn: _Conn, data: bytes) -> None:
        ok = self._account(conn, len(data), "down")
        if conn.client_tls is not None:
            await conn.client_tls.send(data[:ok])
        else:
            await self._send(conn.client, data[:ok], conn)
        if ok < len(data):
            raise _BudgetSpent

    async def _tunnel(self, conn: _Conn, client: _socket.socket, upstream: _socket.socket) -> None:
        """Both directions of a tunnel, in this one task while its exchanges are short: no
        second task, and each socket stays watched across waits (:class:`_Waker`). Each
        direction copies what arrived, charged to the budget, stops reading while its
        destination is full, and half-closes the destination at its EOF, as :meth:`_relay`
        does. A read that fills the copy buffer means bulk: whatever is still open then
        goes on in :meth:`_relay` (splice), one task per direction as before."""
        ends = [_End(client, upstream, "up"), _End(upstream, client, "down")]
        bulk = False
        w = _Waker()
        try:
            for e in ends:
                w.want_read(e.sfd)
            while ends and not bulk:
                ready = await w.wait()
                for e in list(ends):
                    if e.pending:
                        if ~e.dfd in ready:
                            try:
                                e.pending = e.pending[e.dst.send(e.pending):]
                            except (BlockingIOError, InterruptedError):
                                continue
                            conn.active = True
                            if not e.pending:
                                w.drop_write(e.dfd)
                                w.want_read(e.sfd)
                        continue
                    if e.sfd not in ready:
                        continue
                    try:
                        data = e.src.recv(_COPY_CHUNK)
                    except (BlockingIOError, InterruptedError):
                        continue
                    if not data:
                        w.drop_read(e.sfd)
                        with contextlib.suppress(OSError):
                            e.dst.shutdown(socket.SHUT_WR)
                        ends.remove(e)
                        continue
                    n = len(data)
                    ok = self._account(conn, n, e.direction)
                    if ok < n:
                        w.close()
                        await _sendall(e.dst, memoryview(data)[:ok])
                        raise _BudgetSpent
                    try:
                        sent = e.dst.send(data)
                    except (BlockingIOError, InterruptedError):
                        sent = 0
                    if sent < n:
                        e.pending = data[sent:]
                        w.drop_read(e.sfd)
                        w.want_write(e.dfd)
                    if _USE_SPLICE and n == _COPY_CHUNK:
                        bulk = True
        finally:
            w.close()
        if ends:
            rest = [self._tunnel_rest(conn, e) for e in ends]
            await (_both(rest[0], rest[1]) if len(rest) == 2 else rest[0])

    async def _tunnel_rest(self, conn: _Conn, e: _End) -> None:
        if e.pending:
            await _sendall(e.dst, e.pending)
            conn.active = True
        await self._relay(conn, e.src, e.dst, e.direction)

    async def _relay(self, conn: _Conn, src: _socket.socket, dst: _socket.socket, direction: str, limit: int | None = None, half_close: bool = True) -> None:
        """Move bytes src -> dst until EOF (or exactly ``limit`` bytes), charging the budget.

        Starts by copying through a small buffer (fewest syscalls for the typical short
        exchange) and hands over to splice(2) once a read fills that buffer (a bulk transfer).
        """
        done = await self._relay_copy(conn, src, dst, direction, limit, upgrade=_USE_SPLICE)
        if done is not None:
            await self._relay_splice(conn, src, dst, direction, None if limit is None else limit - done)
        if half_close and limit is None:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    async def _relay_splice(self, conn: _Conn, src: _socket.socket, dst: _socket.socket, direction: str, limit: int | None) -> None:
        """src -> pipe -> dst inside the kernel. Reading and writing are interleaved (the pipe
        is the only buffer, up to _PIPE_SIZE), so both sockets stay busy at the same time."""
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            cap = fcntl.fcntl(wfd, _F_SETPIPE_SZ, _PIPE_SIZE)
        except OSError:
            cap = 65536
        s, d = src.fileno(), dst.fileno()
        flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
        taken = 0  # bytes accepted from src (and charged)
        pending = 0  # of those, still in the pipe
        eof = spent = False
        # A pipe counts slots, not bytes: small fragments can fill it below cap. Then splice-in
        # says EAGAIN while src stays readable; waiting on src would spin, so wait on dst.
        full = False
        busy = 0  # turns in a row without waiting: yield now and then so other connections run
        try:
            while True:
                progressed = False
                room = cap - pending if limit is None else min(cap - pending, limit - taken)
                if not eof and not spent and not full and room > 0:
                    try:
                        n = os.splice(s, wfd, min(room, _CHUNK), flags=flags)
                    except BlockingIOError:
                        n = -1
                        full = pending > 0  # with an empty pipe it was src that had nothing
                    if n == 0:
                        eof = True
                    elif n > 0:
                        ok = self._account(conn, n, direction)
                        taken += ok
                        pending += ok  # bytes over budget stay in the pipe and die with it
                        spent = ok < n
                        progressed = True
                if pending:
                    try:
                        pending -= os.splice(rfd, d, pending, flags=flags)
                        progressed = True
                        full = False
                    except BlockingIOError:
                        pass
                if pending == 0:
                    if spent:
                        raise _BudgetSpent
                    if eof:
                        if limit is not None and taken < limit:
                            raise EOFError
                        return
                    if limit is not None and taken >= limit:
                        return
                if not progressed:
                    busy = 0
                    can_read = not eof and not spent and not full and (cap - pending) > 0
                    await _wait_any(s if can_read else None, d if pending else None)
                else:
                    busy += 1
                    if busy >= _BUSY_TURNS:
                        busy = 0
                        await asyncio.sleep(0)
        finally:
            os.close(rfd)
            os.close(wfd)

    async def _relay_copy(self, conn: _Conn, src: _socket.socket, dst: _socket.socket, direction: str, limit: int | None, upgrade: bool) -> int | None:
        """Copy loop. Returns None when finished, or (with ``upgrade``) the bytes moved so far
        as soon as a read fills the buffer, so the caller can switch to splice."""
        done = turns = 0
        while limit is None or done < limit:
            want = _COPY_CHUNK if limit is None else min(_COPY_CHUNK, limit - done)
            data = await _recv(src, want)  # bytes of the size read: no zeroed 64 KiB buffer per relay
            n = len(data)
            if n == 0:
                if limit is not None:
                    raise EOFError
                return None
            ok = self._account(conn, n, direction)
            try:
                sent = dst.send(data if ok == n else data[:ok])
            except (BlockingIOError, InterruptedError):
                sent = 0
            if sent < ok:
                await _sendall(dst, memoryview(data)[sent:ok])
            done += ok
            if ok < n:
                raise _BudgetSpent
            if upgrade and n == _COPY_CHUNK:
                return done
            turns += 1
            if turns % _BUSY_TURNS == 0:
                await asyncio.sleep(0)  # as in _relay_splice: let other connections run
        return None

    async def _request_body(self, conn: _Conn, reader: _Buffered, framing: int | str, cap: int | None = None) -> None:
        """Forward exactly the framed body; anything the client sends after it is never read."""
        if framing == "chunked":
            await self._chunked_body(conn, reader, cap)
            return
        assert isinstance(framing, int)
        early = reader.take(framing)
        if early:
            await self._send_up(conn, early)
        left = framing - len(early)
        if left and conn.client_tls is not None:
            while left:
                piece = await reader.exact(min(left, 65536))
                if piece is None:
                    raise EOFError
                await self._send_up(conn, piece)
                left -= len(piece)
        elif left:
            assert conn.upstream is not None
            await self._relay(conn, conn.client, conn.upstream, "up", limit=left)

    async def _chunked_body(self, conn: _Conn, reader: _Buffered, cap: int | None = None) -> None:
        # Re-framed chunk by chunk rather than passed through, so what upstream sees is
        # exactly what we parsed (no chunk-extension or trailer games).
        total = 0
        while True:
            try:
                line = await reader.until(b"\r\n", _MAX_CHUNK_LINE)
            except OverflowError:
                raise EOFError from None
            if line is None:
                raise EOFError
            size_text = line[:-2].split(b";", 1)[0].strip()
            if not size_text or len(size_text) > 15 or any(c not in b"0123456789abcdefABCDEF" for c in size_text):
                raise EOFError
            size = int(size_text, 16)
            total += size
            if cap is not None and total > cap:
                raise _Refuse(413, "body-too-large", f"chunked request body exceeds {cap} bytes (rule's max_body_bytes)")
            if size == 0:
                while True:  # discard trailers
                    t = await reader.until(b"\r\n", _MAX_CHUNK_LINE)
                    if t is None or t == b"\r\n":
                        break
                await self._send_up(conn, b"0\r\n\r\n")
                return
            await self._send_up(conn, b"%x\r\n" % size)
            remaining = size
            while remaining:
                piece = reader.take(remaining) or await reader.exact(min(remaining, 65536))
                if piece is None:
                    raise EOFError
                await self._send_up(conn, piece)
                remaining -= len(piece)
            if await reader.exact(2) != b"\r\n":
                raise EOFError
            await self._send_up(conn, b"\r\n")

    async def _response(self, conn: _Conn) -> None:
        """Relay the upstream response, telling the client the connection closes after it.

        The upstream socket stays watched (one :class:`_Waker`) from the wait for the head,
        which comes first (the request has only just been sent), to the end of a short body;
        a read that fills the copy buffer hands the rest to the splice relay. While the
        client is slow to take bytes the upstream is not watched (nor read)."""
        upstream, client = conn.upstream, conn.client
        assert upstream is not None
        fd = upstream.fileno()
        w = _Waker()
        up = _Buffered(upstream, conn)
        up.waker = w
        bulk = False
        w.want_read(fd)
        try:
            await w.wait()
            while True:
                head, status = await _response_head(up)
                if 100 <= status < 200 and status != 101:
                    w.drop_read(fd)
                    await self._send_down(conn, head)  # 100 Continue etc.: pass on, wait for the real one
                    w.want_read(fd)
                    continue
                break
            # Head and the body bytes already read go out in one write (no Nagle stall).
            data = http1.rewrite_response_head(head) + up.take()
            turns = 0
            while True:
                n = len(data)
                ok = self._account(conn, n, "down")
                try:
                    sent = client.send(data if ok == n else data[:ok])
                except (BlockingIOError, InterruptedError):
                    sent = 0
                if sent < ok:
                    w.drop_read(fd)
                    await _sendall(client, memoryview(data)[sent:ok])
                    w.want_read(fd)
                if ok < n:
                    raise _BudgetSpent
                if _USE_SPLICE and n == _COPY_CHUNK:
                    bulk = True
                    break
                turns += 1
                if turns % _BUSY_TURNS == 0:
                    await asyncio.sleep(0)  # reads that never wait must not keep other connections off the loop
                while True:
                    try:
                        data = upstream.recv(_COPY_CHUNK)
                        break
                    except (BlockingIOError, InterruptedError):
                        await w.wait()
                if not data:
                    return
        finally:
            w.close()
        if bulk:
            await self._relay_splice(conn, upstream, client, "down", None)


async def _both(a: Coroutine[object, object, None], b: Coroutine[object, object, None], *, b_ends_all: bool = False) -> None:
    """Run two relay halves until both finish. The first failure (or outside cancellation)
    stops both; with ``b_ends_all`` the end of ``b`` (a plain-HTTP response) also ends ``a``
    (the request body the client may still be trickling).

    One future and done-callbacks instead of asyncio.wait/gather: this runs once per tunnel
    and per request with a body, and their bookkeeping was a measurable share of it."""
    loop = asyncio.get_running_loop()
    ta, tb = loop.create_task(a), loop.create_task(b)
    try:
        while True:
            for t in (ta, tb):
                if t.done():
                    exc = t.exception()
                    if exc is not None:
                        raise exc
            if tb.done() and (b_ends_all or ta.done()):
                return
            wake: asyncio.Future[None] = loop.create_future()

            def woken(_: object, wake: asyncio.Future[None] = wake) -> None:
                if not wake.done():
                    wake.set_result(None)

            waiting = [t for t in (ta, tb) if not t.done()]
            for t in waiting:
                t.add_done_callback(woken)
            try:
                await wake
            finally:
                for t in waiting:
                    t.remove_done_callback(woken)
    finally:
        left = [t for t in (ta, tb) if not t.done()]
        for t in left:
            t.cancel()
        if left:
            await asyncio.wait(left)
        for t in (ta, tb):
            if t.done() and not t.cancelled():
                t.exception()  # retrieved: a second failure is not logged as never retrieved
