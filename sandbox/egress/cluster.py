"""The egress proxy in cluster mode: one TCP listener for every sandbox pod, sessions told apart by
the connection's source address, and an authenticated admin endpoint where the Kubernetes backend
registers each pod's address.

On one host each sandbox reaches the proxy over its own Unix socket (``daemon.py``), so the
socket *is* the session. A pod cannot be given a socket; it reaches the proxy Deployment through
a Service, and the only thing the proxy can tie a connection to is the pod's IP. So:

- the backend, once a claim is ready and its pod has an IP, registers ``(session, pod IP,
  egress policy, expiry)`` at ``PUT /v1/sessions/<session>`` on the admin port, with the admin
  token (a Secret mounted into the worker and the proxy only, never into a sandbox pod), and
  removes it at ``DELETE /v1/sessions/<session>`` when the claim goes;
- a connection to the proxy port from an address no live registration names gets nothing: it is
  closed before one byte is read or written (counted, and logged once a minute per address);
- the worker copies each session's numbered decisions into a local file for the session's trail,
  and registers a live session again when the proxy has forgotten it (a restarted proxy);
- the proxy runs as several replicas, each holding every live registration (the pods' Service
  spreads their connections over them): the worker finds the replicas (a headless Service's DNS
  records, or a list), registers each session with every one, registers its live sessions with a
  replica that restarted or appeared within a poll, tells a replica it could not reach of an
  unregistration until it hears it, and copies every replica's decisions into the session's one
  trail (each numbered in its replica's stream: each exactly once). A session starts when no
  replica refused it and one accepted it; a replica that lacks a pod's registration refuses that
  pod like any stranger (deny by default), never serves it under a default. For a policy that
  terminates TLS the worker makes the session CA and sends it (certificate and key) in every
  registration, so each replica presents leaves of the one CA in the pod's trust bundle, before
  and after a restart; the key stays in the worker's and the replicas' memory (see SECURITY.md),
  and crosses the network only in registrations, over TLS (``--admin-tls-cert/--admin-tls-key``
  and the worker's ``admin_tls_ca_file``, made by ``sandbox kube admin-tls``): plain HTTP beyond
  loopback is refused at both ends unless allowed by name (``--allow-plain-admin``, the
  configuration's ``allow_plain_admin``);
- of two registrations of one pod address, the later-registered session holds it on every
  replica, whatever order they arrive in (a pod IP is reused only after its pod is gone);
- on SIGTERM a replica takes no new registration and is not ready, serves its pods a few seconds
  more, closes, and waits for the workers to fetch its last decisions before it exits;
- a registered connection is served by the very same proxy code as on a host
  (:class:`sandbox.egress.proxy.EgressProxy`): same ACL, same per-session limits and byte
  budget, one audit record per decision in the session's own capped log.

Why the source address can be trusted: sandbox pods run with every capability dropped (no
``NET_RAW``: no forged packets), the NetworkPolicy lets them reach only this port, and a
registration expires at the session's limit (the claim's ``shutdownTime``), so a pod IP reused
after a worker died without unregistering cannot inherit a policy for longer than the session
it belonged to could have had it. Registering an address again replaces the previous session
on it (the backend only registers a pod it just saw become ready): that session's connections
are closed. Pod-to-Service traffic must reach the proxy without source NAT (the default for
ClusterIP Services reached from pods; not with kube-proxy's ``masqueradeAll``).

Credential injection (rules with ``credential:``): the worker never holds or sends a value. A
registration carries the policy, whose ``credentials:`` name each credential's *source* (env,
file, command); the proxy resolves them itself, in its own pod, with the host proxy's code
(:func:`sandbox.egress.credentials.resolve`), from what is given to the proxy Deployment only: a
Secret whose keys are copied as files into a memory volume that is both ``--credential-dir``
(``file:`` sources) and ``--credential-env-dir`` (``env: NAME`` reads the file NAME there, so a
policy written for a host runs unchanged and no value sits in the process environment). File sources
are read only under a ``--credential-dir``, command sources only with
``--allow-credential-commands``: the admin token lets the worker choose which source goes to
which host, not read whatever the proxy's pod can. A source the proxy cannot read refuses the
registration with the credential's name and source (never a value), so the session fails to
start instead of its sandbox getting 401s later. Terminated hosts' ``upstream_ca`` files are
read in the proxy's pod too. The registration's reply carries the trust bundle the pod must use
(the host's roots plus the session CA), which the backend writes into the pod through the agent.

    python -m sandbox.egress.cluster --listen 0.0.0.0:3128 --admin-listen 0.0.0.0:3129 \\
        --token-file /var/run/sandbox-egress-admin/token --state-dir /var/lib/sandbox-egress \\
        --admin-tls-cert /run/sandbox-egress-admin-tls/tls.crt --admin-tls-key /run/sandbox-egress-admin-tls/tls.key \\
        [--credential-dir /run/sandbox-egress-credentials] [--allow-credential-commands] \\
        [--drain-seconds 5 --drain-fetch-seconds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import datetime
import os
import errno
import functools
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import re
import secrets
import signal
import socket
import ssl
import sys
import threading
import time
from collections import deque
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlparse

from sandbox.egress import credentials
from sandbox.egress.audit import AuditRecord, SessionAuditLogs, read_records, session_file
from sandbox.egress.credentials import CredentialError, SessionMaterial
from sandbox.egress.mitm import SessionCA, SessionCAError, host_roots
from sandbox.egress.proxy import EgressProxy, _Conn
from sandbox.egress.rules import CredentialSource, EgressPolicy

log = logging.getLogger("sandbox.egress.cluster")

AUDIT = "audit.jsonl"
SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # as the host daemon's (sandbox/egress/daemon.py)
MIN_TOKEN_CHARS = 32
MAX_ADMIN_BODY = 256 * 1024
MAX_ADMIN_HEAD = 16 * 1024
ADMIN_TIMEOUT_S = 10.0
MAX_TTL_S = 7 * 24 * 3600.0
_UNREGISTERED_LOG_EVERY_S = 60.0
STREAM_KEEP = 10_000        # decisions kept per session for the worker's trail to fetch (by sequence number)
STREAM_PAGE = 1_000
POLL_MAX_SESSIONS = 500      # sessions in one batched fetch (POST /v1/poll)
POLL_MAX_RECORDS = 5_000     # decisions in one batched reply, all sessions together (the rest: next poll)
MIRROR_POLL_S = 0.5


class ClusterEgressError(RuntimeError):
    """A registration the proxy refused, or an admin endpoint that cannot be reached. Never carries the token."""


class ClusterEgressRefused(ClusterEgressError):
    """A replica answered and refused (4xx): the request itself is wrong there, trying again will not help."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Superseded(ValueError):
    """The pod address is registered to a session registered later: this (older) one is not put back on it."""


class ProxyDraining(RuntimeError):
    """This replica is shutting down and takes no new registration (503: the worker tries the others)."""


def pod_address(value: str) -> str:
    """A pod IP in canonical form (an IPv4-mapped IPv6 address as IPv4); ValueError if it is none."""
    ip = ipaddress.ip_address(value.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or ip.is_multicast:
        raise ValueError(f"{value!r} cannot be a pod's address")
    return str(ip)


def read_token(path: str | Path) -> str:
    """The admin token from its file (a mounted Secret). Errors name the file, never the content."""
    p = Path(path)
    try:
        token = p.read_text().strip()
    except OSError as e:
        raise ClusterEgressError(f"cannot read the egress admin token file {p}: {e.strerror or e}") from None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ClusterEgressError(f"the egress admin token in {p} must be one word of at least {MIN_TOKEN_CHARS} "
                                 "characters (e.g. `openssl rand -hex 32`)")
    return token


class ClusterEgressProxy(EgressProxy):
    """:class:`EgressProxy` with one shared TCP listener whose connections are attributed by source
    address (module docstring). All methods run on the proxy's event loop."""

    def __init__(self, *, credential_dirs: Sequence[str | Path] = (), allow_credential_commands: bool = False,
                 credential_env_dir: str | Path | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        # Where this process may read credential values (module docstring): files under these
        # directories only, commands only when allowed; `env:` sources from the files of
        # credential_env_dir (file name = variable name) when given, else from its own environment.
        self.credential_dirs = tuple(Path(os.path.realpath(d)) for d in credential_dirs)
        self.allow_credential_commands = allow_credential_commands
        self.credential_env_dir = Path(credential_env_dir) if credential_env_dir is not None else None
        self._by_addr: dict[str, str] = {}      # pod address -> session id
        self._addr_of: dict[str, str] = {}      # session id -> pod address
        self._expires: dict[str, float] = {}    # session id -> monotonic expiry
        self._since: dict[str, float] = {}      # session id -> when the worker first registered it (wall clock)
        self._listeners: list[socket.socket] = []
        self._expiry_task: asyncio.Task[None] | None = None
        self.unregistered = 0                   # connections refused for want of a registration
        self._unregistered_logged: dict[str, float] = {}
        # Each session's decisions, numbered, for the worker that follows them into the session's trail.
        self._stream: dict[str, deque[tuple[int, str]]] = {}
        self._seq: dict[str, int] = {}
        # Each stream's random name: a worker that sees another name (this replica restarted, or
        # forgot the session and got it again) numbers from the start of the new stream.
        self._stream_id: dict[str, str] = {}
        self._fetched: dict[str, int] = {}      # session id -> the highest number a worker has fetched
        self.draining = False                   # SIGTERM: no new registration, the last decisions wait

    def _emit(self, rec: AuditRecord) -> None:
        super()._emit(rec)
        q = self._stream.get(rec.session)
        if q is not None:
            n = self._seq[rec.session] = self._seq.get(rec.session, 0) + 1
            q.append((n, rec.to_json()))

    def stream_id(self, session_id: str) -> str | None:
        return self._stream_id.get(session_id)

    def records_after(self, session_id: str, after: int, limit: int = STREAM_PAGE) -> tuple[list[str], int, bool]:
        """The session's decisions numbered above ``after`` (JSON lines, oldest first), the number of
        the last one returned, and whether some were dropped before they could be fetched."""
        q = self._stream.get(session_id) or deque()
        if session_id in self._stream:
            self._fetched[session_id] = max(self._fetched.get(session_id, 0), after)
        out = [(n, line) for n, line in q if n > after][:limit]
        lost = bool(q) and q[0][0] > after + 1
        return [line for _, line in out], (out[-1][0] if out else max(after, 0)), lost

    # ------------------------------------------------------------ registry

    async def register(self, session_id: str, pod_ip: str, policy: EgressPolicy, ttl_s: float,
                       ca: SessionCA | None = None, since: float | None = None) -> bytes:
        """Attribute connections from ``pod_ip`` to ``session_id`` under ``policy`` for ``ttl_s``
        seconds (or until :meth:`unregister`). Returns the trust bundle for the pod (PEM).
        ``ca``: the session CA for the terminated hosts, made by the worker (every replica must
        present the same one); without it this process makes one (one replica only). ``since``:
        when the worker first registered this session (default now). Of two sessions on one address
        the later-registered one holds it: a pod IP is reused only after its pod is gone, so the
        older registration is a dead pod's, and a worker that puts it back (it has not noticed the
        death yet, and this replica restarted or was new) is refused instead of taking the address
        from the live pod, whatever order the workers come in."""
        if self.draining:
            raise ProxyDraining("this egress proxy replica is shutting down")
        if not SESSION_ID.match(session_id):
            raise ValueError("invalid session id (letters, digits, '_.-', at most 64)")
        addr = pod_address(pod_ip)
        if not policy.enabled:
            raise ValueError("the policy allows no egress: register nothing")
        if not 0 < ttl_s <= MAX_TTL_S:
            raise ValueError(f"ttl_s must be in (0, {MAX_TTL_S:.0f}]")
        material = SessionMaterial()
        if any(r.credential is not None or r.upstream_ca is not None for r in policy.rules):
            material = await asyncio.to_thread(self.resolve_material, policy)  # a command source may take seconds
        self._check_material(policy, material)
        terminated = {r.host for r in policy.rules if r.terminates}
        if ca is not None and ca.hosts != terminated:
            raise ValueError("the session CA is for other hosts than the policy terminates")
        since = time.time() if since is None else since
        previous = self._by_addr.get(addr)
        if previous is not None and previous != session_id and self._since.get(previous, 0.0) > since:
            raise Superseded(f"pod address {addr} is registered to a session registered later")
        if previous is not None and previous != session_id:
            log.warning("pod address %s re-registered: session %s replaces %s", addr, session_id, previous)
            await self.unregister(previous)
        old_addr = self._addr_of.get(session_id)
        if old_addr is not None and old_addr != addr:
            self._by_addr.pop(old_addr, None)
        sess = self._sessions.get(session_id)
        if sess is None:
            sess = self._new_session(session_id, policy)
            self._sessions[session_id] = sess
        if session_id not in self._stream:
            self._stream[session_id] = deque(maxlen=STREAM_KEEP)
            self._stream_id[session_id] = secrets.token_hex(8)
        sess.policy = policy
        if ca is not None:
            sess.ca = ca  # (_setup_tls keeps a CA whose hosts are the terminated ones)
        self._setup_tls(sess, material, None)
        self._by_addr[addr] = session_id
        self._addr_of[session_id] = addr
        self._expires[session_id] = time.monotonic() + ttl_s
        self._since[session_id] = since
        self._start_tasks()
        if self._roots is None:
            self._roots = host_roots()
        ca_pem = sess.ca.pem if sess.ca else b""
        return (self._roots.rstrip(b"\n") + b"\n" + ca_pem) if self._roots else ca_pem

    def resolve_material(self, policy: EgressPolicy) -> SessionMaterial:
        """The values of the credentials the policy's rules inject, read HERE (the proxy's pod) from
        the policy's sources, and its rules' extra upstream CAs. Raises :class:`CredentialError`
        naming the credential and its source, never a value."""
        env: Mapping[str, str] = os.environ if self.credential_env_dir is None else {}
        for name in sorted({r.credential.name for r in policy.rules if r.credential is not None}):
            src = policy.credentials[name]
            where = f"credential {name!r} ({src.describe()})"
            if src.env is not None and self.credential_env_dir is not None:
                path = self.credential_env_dir / src.env
                if not path.is_file():
                    raise CredentialError(f"{where}: the variable is not set in the egress proxy's pod (no file "
                                          f"{src.env} in its --credential-env-dir {self.credential_env_dir}: a key "
                                          "of the sandbox-egress-credentials Secret)")
                assert isinstance(env, dict)
                env[src.env] = credentials.read_source(name, CredentialSource(file=str(path)))
            elif src.env is not None and src.env not in env:
                raise CredentialError(f"{where}: the variable is not set in the egress proxy's pod (give it to the "
                                      "proxy Deployment: a key of the sandbox-egress-credentials Secret)")
            if src.file is not None:
                real = Path(os.path.realpath(os.path.dirname(src.file))) / os.path.basename(src.file)
                if not any(real.is_relative_to(d) for d in self.credential_dirs):
                    dirs = ", ".join(map(str, self.credential_dirs)) or "none configured"
                    raise CredentialError(f"{where}: the egress proxy reads credential files only under its "
                                          f"--credential-dir ({dirs})")
            if src.command is not None and not self.allow_credential_commands:
                raise CredentialError(f"{where}: the egress proxy runs no credential commands unless started "
                                      "with --allow-credential-commands")
        return credentials.resolve(policy, env)

    async def unregister(self, session_id: str, keep_stream: bool = False) -> bool:
        """Forget the session: its address gets nothing from now on, its connections are closed.
        ``keep_stream``: its numbered decisions stay until :meth:`forget_stream` (the admin endpoint
        hands the last ones to the worker first)."""
        addr = self._addr_of.pop(session_id, None)
        if addr is not None and self._by_addr.get(addr) == session_id:
            del self._by_addr[addr]
        self._expires.pop(session_id, None)
        self._since.pop(session_id, None)
        known = session_id in self._sessions
        await self.remove_session(session_id)  # (its connections' last decisions are emitted by now)
        if not keep_stream:
            self.forget_stream(session_id)
        return known or addr is not None

    def forget_stream(self, session_id: str) -> None:
        self._stream.pop(session_id, None)
        self._seq.pop(session_id, None)
        self._stream_id.pop(session_id, None)
        self._fetched.pop(session_id, None)

    async def drain(self, serve_s: float, fetch_wait_s: float) -> None:
        """A graceful stop (SIGTERM; the Deployment rolls or a node drains): refuse new
        registrations, keep serving pods for ``serve_s`` (the Service's endpoints take a moment to
        drop this replica), then close the pod listener and every session's connections (their last
        decisions are emitted), and wait up to ``fetch_wait_s`` until the workers have fetched every
        decision (they poll every half second), so none is left only in this pod's files."""
        self.draining = True
        if self._addr_of:
            log.info("draining: serving %d session(s) for %.0f s more, then closing", len(self._addr_of), serve_s)
            await asyncio.sleep(serve_s)
        self._close_listeners()
        for sid in list(self._addr_of):
            await self.unregister(sid, keep_stream=True)
        end = time.monotonic() + fetch_wait_s
        while time.monotonic() < end and self.unfetched():
            await asyncio.sleep(0.1)
        if self.unfetched():
            log.warning("stopping with decisions of %d session(s) not fetched by a worker (they stay in this pod's "
                        "audit files)", len(self.unfetched()))

    def unfetched(self) -> list[str]:
        """Sessions whose stream holds decisions no worker has fetched yet."""
        return [sid for sid, q in self._stream.items() if q and q[-1][0] > self._fetched.get(sid, 0)]

    def session_for(self, addr: str) -> str | None:
        try:
            return self._by_addr.get(pod_address(addr))
        except ValueError:
            return None

    def registrations(self) -> dict[str, str]:
        return dict(self._addr_of)

    def _start_tasks(self) -> None:
        loop = asyncio.get_running_loop()
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = loop.create_task(self._sweep())
        if self._expiry_task is None or self._expiry_task.done():
            self._expiry_task = loop.create_task(self._expire_loop())

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for sid in [s for s, t in self._expires.items() if t <= now]:
                log.info("registration of session %s expired; its pod address gets nothing now", sid)
                await self.unregister(sid)

    # ------------------------------------------------------------ the shared listener

    def listen_tcp(self, host: str, port: int) -> tuple[str, int]:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(fam, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
        self._listeners.append(sock)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_pod_connection, sock)
        self._start_tasks()
        bound = sock.getsockname()
        return str(bound[0]), int(bound[1])

    def _on_pod_connection(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(64):
            try:
                sock, peer = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    loop.remove_reader(lsock.fileno())
                    loop.call_later(0.1, self._rewatch, lsock)
                return
            sid = self.session_for(str(peer[0]))
            sess = self._sessions.get(sid) if sid is not None else None
            if sess is None or sess.closed:
                self._refuse_unregistered(sock, str(peer[0]))
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sess, sock)
            conn.task = loop.create_task(self._serve(conn))

    def _rewatch(self, lsock: socket.socket) -> None:
        if lsock.fileno() >= 0:
            asyncio.get_running_loop().add_reader(lsock.fileno(), self._on_pod_connection, lsock)

    def _refuse_unregistered(self, sock: socket.socket, addr: str) -> None:
        """Nothing for an address no registration names: no byte read, none written (an RST)."""
        self.unregistered += 1
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
        now = time.monotonic()
        if now - self._unregistered_logged.get(addr, -1e9) >= _UNREGISTERED_LOG_EVERY_S:
            self._unregistered_logged[addr] = now
            if len(self._unregistered_logged) > 4096:
                self._unregistered_logged.clear()
            log.warning("refused a connection from %s: no sandbox session is registered for that address", addr)

    def _close_listeners(self) -> None:
        """Stop accepting pods' connections (the ones already open go on)."""
        loop = asyncio.get_running_loop()
        for s in self._listeners:
            if s.fileno() >= 0:
                loop.remove_reader(s.fileno())
            s.close()
        self._listeners.clear()

    async def close(self) -> None:
        self._close_listeners()
        if self._expiry_task is not None:
            self._expiry_task.cancel()
        for sid in list(self._addr_of):
            await self.unregister(sid)
        await super().close()


class AdminServer:
    """The registration endpoint: HTTP/1.1 on its own port, bearer token, JSON bodies.

    ``GET /healthz`` (no token), ``PUT /v1/sessions/<id>`` {pod_ip, policy, ttl_s} -> {ca_bundle},
    ``DELETE /v1/sessions/<id>``, ``GET /v1/sessions/<id>/records?limit=N`` (the session's audit
    records, for the worker's trail). Anything else, or a wrong token: an error, and nothing changes."""

    def __init__(self, proxy: ClusterEgressProxy, token: str, audit_path: Path | None) -> None:
        self.proxy = proxy
        self._token_digest = hashlib.sha256(token.encode()).digest()
        self.audit_path = audit_path
        self._server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._client, host, port, limit=MAX_ADMIN_HEAD, ssl=tls,
                                                  ssl_handshake_timeout=ADMIN_TIMEOUT_S if tls else None)
        bound = self._server.sockets[0].getsockname()
        return str(bound[0]), int(bound[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _authorised(self, headers: dict[str, str]) -> bool:
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            return False
        return hmac.compare_digest(hashlib.sha256(given.strip().encode()).digest(), self._token_digest)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), ADMIN_TIMEOUT_S)
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, _, rest = lines[0].partition(" ")
                target = rest.rpartition(" ")[0]
                headers = {}
                for line in lines[1:]:
                    k, sep, v = line.partition(":")
                    if sep:
                        headers[k.strip().lower()] = v.strip()
                if "transfer-encoding" in headers:
                    await self._reply(writer, 411, {"error": "a Content-Length body is required"}, close=True)
                    return
                try:
                    n = int(headers.get("content-length") or 0)
                except ValueError:
                    n = -1
                if not 0 <= n <= MAX_ADMIN_BODY:
                    await self._reply(writer, 413, {"error": f"body must be 0..{MAX_ADMIN_BODY} bytes"}, close=True)
                    return
                try:
                    body = await asyncio.wait_for(reader.readexactly(n), ADMIN_TIMEOUT_S) if n else b""
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    return
                try:
                    code, reply = await self._route(method, target, headers, body)
                except Exception as e:  # noqa: BLE001 - a bad request must not take the endpoint down
                    code, reply = 400, {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                await self._reply(writer, code, reply, close=headers.get("connection", "").lower() == "close")
                if headers.get("connection", "").lower() == "close":
                    return
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _reply(self, writer: asyncio.StreamWriter, code: int, obj: dict[str, Any], close: bool = False) -> None:
        data = json.dumps(obj).encode()
        reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
                  409: "Conflict", 411: "Length Required", 413: "Payload Too Large", 503: "Service Unavailable"}.get(code, "Error")
        writer.write(f"HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                     f"{'Connection: close' + chr(13) + chr(10) if close else ''}\r\n".encode() + data)
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    def _poll(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """Many sessions' new decisions in one request (a worker's poll of this replica: one request
        per half second, not one per session): {sessions: {id: {after, stream}}} -> {sessions: {id:
        {records, next, lost, registered, stream}}, draining}, at most POLL_MAX_RECORDS decisions in
        all (a session past the budget gets none this time, and its cursor stays)."""
        msg = json.loads(body or b"{}")
        sessions = msg.get("sessions") if isinstance(msg, dict) else None
        if not isinstance(sessions, dict) or len(sessions) > POLL_MAX_SESSIONS:
            return 400, {"error": f"sessions must be an object of at most {POLL_MAX_SESSIONS} session ids"}
        registered = self.proxy.registrations()
        budget = POLL_MAX_RECORDS
        out: dict[str, Any] = {}
        for sid, cur in sessions.items():
            if not isinstance(sid, str) or not SESSION_ID.match(sid) or not isinstance(cur, dict):
                return 400, {"error": "each session id maps to a cursor {after, stream}"}
            after, stream = cur.get("after", 0), cur.get("stream")
            if not isinstance(after, int) or (stream is not None and not isinstance(stream, str)):
                return 400, {"error": "a cursor is {after: integer, stream: string or null}"}
            if stream is not None and stream != self.proxy.stream_id(sid):
                after = 0
            lines, last, lost = self.proxy.records_after(sid, after, limit=max(0, min(STREAM_PAGE, budget)))
            budget -= len(lines)
            out[sid] = {"records": [json.loads(x) for x in lines], "next": last, "lost": lost,
                        "registered": sid in registered, "stream": self.proxy.stream_id(sid)}
        return 200, {"sessions": out, "draining": self.proxy.draining}

    def _after(self, sid: str, query: dict[str, list[str]]) -> int:
        """Where the caller's copy of the session's decisions ends: ``after``, unless it names
        another stream than this replica's (``stream``: it restarted, or forgot the session and
        got it again), then from the start of this one."""
        stream = query.get("stream")
        if stream and stream[0] != self.proxy.stream_id(sid):
            return 0
        return int(query["after"][0])

    async def _route(self, method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        u = urlparse(target)
        if u.path == "/healthz" and method == "GET":  # (not ready while draining: the Service drops this replica)
            return (503 if self.proxy.draining else 200), {"ok": not self.proxy.draining, "draining": self.proxy.draining,
                                                            "sessions": len(self.proxy.registrations())}
        if not self._authorised(headers):
            return 401, {"error": "a valid admin token is required"}
        if u.path == "/v1/poll":
            if method != "POST":
                return 405, {"error": "POST"}
            return self._poll(body)
        parts = u.path.strip("/").split("/")
        if len(parts) < 3 or parts[:2] != ["v1", "sessions"] or not SESSION_ID.match(parts[2]):
            return 404, {"error": "no such endpoint"}
        sid = parts[2]
        query = parse_qs(u.query)
        if len(parts) == 4 and parts[3] == "records" and method == "GET" and "after" in query:
            lines, last, lost = self.proxy.records_after(sid, self._after(sid, query))
            return 200, {"records": [json.loads(x) for x in lines], "next": last, "lost": lost,
                         "registered": sid in self.proxy.registrations(), "stream": self.proxy.stream_id(sid),
                         "draining": self.proxy.draining}
        if len(parts) == 4 and parts[3] == "records" and method == "GET":
            if self.audit_path is None:
                return 200, {"records": []}
            limit = min(10_000, max(1, int((parse_qs(u.query).get("limit") or ["100"])[0] or 100)))
            records = await asyncio.to_thread(read_records, self.audit_path, sid, limit)
            return 200, {"records": records}
        if len(parts) != 3:
            return 404, {"error": "no such endpoint"}
        if method == "DELETE":
            known = await self.proxy.unregister(sid, keep_stream=True)
            reply: dict[str, Any] = {"ok": True, "known": known, "stream": self.proxy.stream_id(sid)}
            if "after" in query:  # the decisions the caller has not fetched yet, the last ones included
                lines, last, lost = self.proxy.records_after(sid, self._after(sid, query), limit=STREAM_KEEP)
                reply.update(records=[json.loads(x) for x in lines], next=last, lost=lost)
            self.proxy.forget_stream(sid)
            return 200, reply
        if method != "PUT":
            return 405, {"error": "PUT or DELETE"}
        try:
            msg = json.loads(body)
            if not isinstance(msg, dict):
                raise ValueError("the body must be a JSON object")
            policy = EgressPolicy.model_validate(msg["policy"])
            pod_ip = msg["pod_ip"]
            if not isinstance(pod_ip, str):
                raise ValueError("pod_ip must be a string")
            ttl = float(msg["ttl_s"])
            ca = _session_ca(msg.get("session_ca"), policy)
            since = msg.get("registered_at")
            if since is not None and not isinstance(since, (int, float)):
                raise ValueError("registered_at must be a number (seconds since the epoch)")
            bundle = await self.proxy.register(sid, pod_ip, policy, ttl, ca, None if since is None else float(since))
        except ProxyDraining as e:
            return 503, {"error": str(e)}
        except Superseded as e:
            return 409, {"error": str(e)}
        except KeyError as e:
            return 400, {"error": f"missing field {e.args[0]!r}"}
        except (ValueError, TypeError) as e:
            return 400, {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        return 200, {"ok": True, "ca_bundle": bundle.decode("ascii", "replace"), "stream": self.proxy.stream_id(sid)}


def _session_ca(value: Any, policy: EgressPolicy) -> SessionCA | None:
    """The registration's ``session_ca`` ({cert, key}: PEM strings) as a checked CA, or None.
    Errors say what is wrong, never what the key is."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("cert"), str) or not isinstance(value.get("key"), str):
        raise ValueError("session_ca must be an object with the PEM strings cert and key")
    hosts = {r.host for r in policy.rules if r.terminates}
    if not hosts:
        raise ValueError("session_ca given, but the policy terminates no host")
    try:
        return SessionCA.from_pem(value["cert"].encode(), value["key"].encode(), hosts)
    except SessionCAError as e:
        raise ValueError(str(e)) from None


# ---------------------------------------------------------------- the backend's side


def dns_endpoints(name: str, port: int, scheme: str = "http") -> Callable[[], list[str]]:
    """The admin endpoints of every proxy replica: the A/AAAA records of a headless Service
    (``clusterIP: None``), resolved on each call."""

    def resolve() -> list[str]:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
        addrs = sorted({str(i[4][0]) for i in infos})
        return [f"{scheme}://[{a}]:{port}" if ":" in a else f"{scheme}://{a}:{port}" for a in addrs]

    resolve.__qualname__ = f"dns:{name}:{port}"
    return resolve


ADMIN_TLS_RENEW_DAYS = 30


def admin_client_context(ca_file: str | Path) -> ssl.SSLContext:
    """The worker's context for the admin endpoints: trusts this CA only (TLS 1.2+). A file that is
    missing or holds no certificate is an error naming it; a CA that has expired is refused, and one
    that expires within 30 days is logged (the replicas' certificate from `sandbox kube admin-tls`
    ends with it: renew both)."""
    try:
        data = Path(ca_file).read_bytes()
        ctx = ssl.create_default_context(cadata=data.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError):  # (before OSError: SSLError is one)
        raise ClusterEgressError(f"egress_proxy.admin_tls_ca_file {ca_file}: no PEM CA certificate in it") from None
    except OSError as e:
        raise ClusterEgressError(f"egress_proxy.admin_tls_ca_file {ca_file}: cannot read it: "
                                 f"{e.strerror or type(e).__name__}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    from cryptography import x509

    with contextlib.suppress(ValueError):
        now = datetime.datetime.now(datetime.UTC)
        # (a bundle of the old and the new CA, while the replicas' certificate is rotated: the later one counts)
        ends = max(c.not_valid_after_utc for c in x509.load_pem_x509_certificates(data))
        if ends <= now:
            raise ClusterEgressError(f"egress_proxy.admin_tls_ca_file {ca_file}: the CA expired on {ends:%Y-%m-%d}; "
                                     "make new material with `sandbox kube admin-tls` (see deploy/kubernetes/proxy.yaml)")
        if ends - now < datetime.timedelta(days=ADMIN_TLS_RENEW_DAYS):
            log.warning("the egress admin CA %s expires on %s: renew it and the proxy's certificate with "
                        "`sandbox kube admin-tls` before then", ca_file, f"{ends:%Y-%m-%d}")
    return ctx


class _NamedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a replica's address, verifying the certificate for one fixed name (the replicas
    are reached by pod IP, which no certificate can list in advance)."""

    def __init__(self, *a: Any, tls_name: str, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._tls_name = tls_name

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self._tls_name)  # type: ignore[attr-defined]


class _NamedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, context: ssl.SSLContext, tls_name: str) -> None:
        super().__init__(context=context)
        self._ctx, self._tls_name = context, tls_name

    def https_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(functools.partial(_NamedHTTPSConnection, tls_name=self._tls_name), req,
                            context=self._ctx)


@dataclass
class _Stream:
    """What the worker has of one session's decisions on one replica: the stream's name there and
    the number of the last decision copied."""

    stream: str | None
    seq: int = 0


@dataclass
class _Reg:
    """A live session as the worker registered it: what a replica that lacks it gets again."""

    session_id: str
    pod_ip: str
    policy: EgressPolicy
    until: float                                   # monotonic end of the registration
    ca: SessionCA | None = field(repr=False)
    mirror: _MirrorFile | None = field(repr=False)
    since: float = field(default_factory=time.time)                    # first registered (wall clock)
    streams: dict[str, _Stream] = field(default_factory=dict)            # replica URL -> its stream
    superseded: set[str] = field(default_factory=set)                   # replicas where a later session holds the IP
    refused_logged: dict[str, float] = field(default_factory=dict)      # replica URL -> when a refusal was logged
    locks: dict[str, threading.Lock] = field(default_factory=dict)      # replica URL -> one caller at a time
    closing: bool = False

    def lock(self, url: str) -> threading.Lock:
        return self.locks.setdefault(url, threading.Lock())

    def body(self) -> dict[str, Any]:
        """The registration (for what is left of its time). The session CA's key goes to the
        replicas over the authenticated admin channel only; it is never logged."""
        msg: dict[str, Any] = {"pod_ip": self.pod_ip, "policy": self.policy.model_dump(mode="json"),
                               "ttl_s": max(1.0, self.until - time.monotonic()), "registered_at": self.since}
        if self.ca is not None:
            msg["session_ca"] = {"cert": self.ca.pem.decode("ascii"), "key": self.ca.key_pem().decode("ascii")}
        return msg


class ClusterEgressClient:
    """The Kubernetes backend's handle on the proxy replicas' session tables (``sandbox.kube.backend.PodEgress``).

    ``base_url``: one admin endpoint or a list of them (one per replica); ``discover``: a callable
    returning the replicas' admin URLs as they are now (:func:`dns_endpoints` of the headless
    Service), which wins over ``base_url``. Each session is registered with every replica, and a
    background thread per replica keeps it so: a replica that lacks a live session (it restarted,
    it is new, it was unreachable at the start) gets it again within a poll, and one that could not
    be told of an unregistration is told again until it answers or the registration has expired.

    A session starts when no replica refused it and at least one accepted it; a replica that did
    not answer is registered by its thread as soon as it does, and until then it refuses the pod
    (deny by default: a pod gets nothing from a replica that lacks its registration, never more).
    When the policy terminates TLS, the session CA is made here, once, and sent in every
    registration, so each replica presents leaves the pod's one trust bundle accepts.

    With a ``mirror_dir``, each session's decisions are copied, as each replica numbers them,
    into ``<mirror_dir>/audit/<session>.jsonl`` (the layout the host daemon writes), so the worker
    follows them into the session's trail exactly as on Docker (``audit_path``): every decision
    once, whichever replica made it; the last ones come back with the unregistration."""

    def __init__(self, base_url: str | Sequence[str], token: str, timeout: float = ADMIN_TIMEOUT_S,
                 mirror_dir: Path | None = None, discover: Callable[[], list[str]] | None = None,
                 tls_ca_file: str | Path | None = None, tls_name: str | None = None) -> None:
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        self._static = [u.rstrip("/") for u in urls]
        self._discover = discover
        self.base_url = self._static[0] if self._static else getattr(discover, "__qualname__", "discovered")
        self._token = token
        self.timeout = timeout
        self.ttl_s: float = 3600.0  # the session limit, set by the backend per registration
        self.mirror_dir = mirror_dir
        self._regs: dict[str, _Reg] = {}
        self._pending: dict[str, dict[str, float]] = {}   # replica URL -> session -> until (unregistrations owed)
        self._lock = threading.Lock()
        self._known: list[str] = list(self._static)
        self._resolved_at = -1e9
        self._syncs: dict[str, _ReplicaSync] = {}
        self._supervisor: threading.Thread | None = None
        self._closed = threading.Event()
        # TLS to the admin endpoints (registrations carry session CA keys): the replicas' certificate
        # is verified against this CA only, for the one name tls_name, whatever address answers.
        self._opener: urllib.request.OpenerDirector | None = None
        if tls_ca_file is not None:
            ctx = admin_client_context(tls_ca_file)
            self._opener = urllib.request.build_opener(_NamedHTTPSHandler(ctx, tls_name or "sandbox-egress-admin"))
        for u in self._static:
            if self._opener is not None and not u.startswith("https://"):
                raise ClusterEgressError(f"egress admin URL {u}: with a TLS CA the admin endpoints are https:// URLs")

    @property
    def audit_path(self) -> Path:
        """Where the worker looks for the sessions' decision files (``session_file(audit_path, s)``)."""
        if self.mirror_dir is None:
            raise ClusterEgressError("this egress client keeps no local copy of the decisions (no mirror_dir)")
        return self.mirror_dir / AUDIT

    @classmethod
    def from_config(cls, cfg: Any, mirror_dir: Path | None = None) -> "ClusterEgressClient":
        """From the backend configuration's ``egress_proxy``: the replicas' headless Service
        (``admin_dns``), else a fixed list (``admin_urls``), else the one admin URL; the token file.
        Plain HTTP beyond loopback is refused unless the configuration opts in (``allow_plain_admin``)."""
        token = read_token(cfg.admin_token_file)
        refusal = cfg.plain_admin_refusal() if hasattr(cfg, "plain_admin_refusal") else None
        if refusal:
            raise ClusterEgressError(refusal)
        tls = {"tls_ca_file": cfg.admin_tls_ca_file, "tls_name": cfg.admin_tls_name} \
            if getattr(cfg, "admin_tls_ca_file", None) else {}
        if getattr(cfg, "admin_dns", None):
            return cls([], token, mirror_dir=mirror_dir, **tls,
                       discover=dns_endpoints(cfg.admin_dns, cfg.admin_port, "https" if tls else "http"))
        urls = list(getattr(cfg, "admin_urls", None) or []) or [cfg.admin_base_url()]
        return cls(urls, token, mirror_dir=mirror_dir, **tls)

    # -- the replicas

    def endpoints(self) -> list[str]:
        """The replicas' admin URLs now (resolved at most once per poll; the last answer when
        resolution fails, with a warning)."""
        if self._discover is None:
            return list(self._static)
        with self._lock:
            if time.monotonic() - self._resolved_at < MIRROR_POLL_S:
                return list(self._known)
            self._resolved_at = time.monotonic()
        try:
            found = sorted({u.rstrip("/") for u in self._discover()})
        except (OSError, ValueError) as e:
            log.warning("cannot list the egress proxy replicas (%s): %s; using the last list",
                        self.base_url, getattr(e, "strerror", None) or e)
            with self._lock:
                return list(self._known)
        with self._lock:
            if found != self._known:
                log.info("egress proxy replicas: %s", ", ".join(found) or "none")
            self._known = found
            return list(found)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None, base: str | None = None) -> dict[str, Any]:
        base = base or self.base_url
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{base}{path}", data=data, method=method,
                                     headers={"Authorization": f"Bearer {self._token}",
                                              "Content-Type": "application/json"})
        if self._opener is not None and not base.startswith("https://"):
            raise ClusterEgressError(f"egress admin URL {base}: with a TLS CA the admin endpoints are https:// URLs")
        try:
            with (self._opener.open(req, timeout=self.timeout) if self._opener is not None
                  else urllib.request.urlopen(req, timeout=self.timeout)) as r:  # noqa: S310 - our own admin URL
                return dict(json.loads(r.read() or b"{}"))
        except urllib.error.HTTPError as e:
            try:
                why = json.loads(e.read() or b"{}").get("error", "")
            except ValueError:
                why = ""
            what = f"the egress proxy at {base} refused {method} {path.split('?')[0]}: {e.code} {why}"[:800]
            if 400 <= e.code < 500:
                raise ClusterEgressRefused(what, e.code) from None
            raise ClusterEgressError(what) from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise ClusterEgressError(f"cannot reach the egress proxy's admin endpoint {base}: {reason}") from None

    def _put(self, reg: _Reg, url: str) -> dict[str, Any]:
        """Register ``reg`` with one replica (under that replica's lock for the session)."""
        reply = self._call("PUT", f"/v1/sessions/{quote(reg.session_id, safe='')}", reg.body(), base=url)
        if reg.ca is not None and reg.ca.pem.decode("ascii") not in str(reply.get("ca_bundle", "")):
            # An older proxy ignores session_ca and makes its own: the pod's bundle would not match it.
            with contextlib.suppress(ClusterEgressError):
                self._call("DELETE", f"/v1/sessions/{quote(reg.session_id, safe='')}", base=url)
            raise ClusterEgressRefused(f"the egress proxy at {url} did not take the session CA (an older version?)")
        st = reg.streams.get(url)
        if st is None or st.stream != reply.get("stream"):
            reg.streams[url] = _Stream(reply.get("stream"))
        return reply

    def _start_sync(self) -> None:
        with self._lock:
            if self._supervisor is None and not self._closed.is_set():
                self._supervisor = threading.Thread(target=self._supervise, name="egress-replicas", daemon=True)
                self._supervisor.start()

    def _supervise(self) -> None:
        """One thread per replica (a replica that hangs delays only itself), started as replicas appear."""
        while not self._closed.is_set():
            try:
                urls = self.endpoints()
            except Exception as e:  # noqa: BLE001 - a discovery bug must not end the sync
                log.warning("egress proxy replicas not listed: %s", e)
                urls = []
            with self._lock:
                for url in urls:
                    sync = self._syncs.get(url)
                    if sync is None or not sync.is_alive():
                        self._syncs[url] = _ReplicaSync(self, url)
                        self._syncs[url].start()
            self._closed.wait(MIRROR_POLL_S)

    def close(self) -> None:
        """Stop the background threads (registrations stay until unregistered or expired)."""
        self._closed.set()
        for t in [self._supervisor, *self._syncs.values()]:
            if t is not None and t.is_alive() and t is not threading.current_thread():
                t.join(self.timeout + 1)

    # -- sessions

    def register(self, session_id: str, pod_ip: str, policy: EgressPolicy, ttl_s: float | None = None) -> bytes:
        """Register the pod's address for the session with every replica; returns the trust bundle
        (PEM) for the pod. Raises if a replica refused it (the others are told to forget it) or
        none accepted it."""
        ttl = ttl_s or self.ttl_s
        if not 0 < ttl <= MAX_TTL_S:
            raise ClusterEgressRefused(f"ttl_s must be in (0, {MAX_TTL_S:.0f}]")
        hosts = {r.host for r in policy.rules if r.terminates}
        ca = SessionCA(hosts, lifetime=datetime.timedelta(seconds=ttl + 3600)) if hosts else None
        with self._lock:
            old = self._regs.get(session_id)
        mirror = old.mirror if old is not None else None
        if mirror is None and self.mirror_dir is not None:
            mirror = _MirrorFile(session_id, session_file(self.audit_path, session_id))
        reg = _Reg(session_id, pod_ip, policy, time.monotonic() + ttl, ca, mirror)
        if old is not None:  # the same session again (a replacement pod): its streams go on
            reg.streams, reg.locks = old.streams, old.locks
            old.closing = True
        urls = self.endpoints()
        if not urls:
            raise ClusterEgressError(f"no egress proxy replica found ({self.base_url})")
        accepted: dict[str, dict[str, Any]] = {}
        refused: dict[str, ClusterEgressError] = {}
        unreachable: dict[str, ClusterEgressError] = {}

        def one(url: str) -> None:
            try:
                with reg.lock(url):
                    accepted[url] = self._put(reg, url)
            except ClusterEgressRefused as e:
                refused[url] = e
            except ClusterEgressError as e:
                unreachable[url] = e

        threads = [threading.Thread(target=one, args=(u,), daemon=True) for u in urls[1:]]
        for t in threads:
            t.start()
        one(urls[0])
        for t in threads:
            t.join()
        if refused or not accepted:
            for url in accepted:  # all or nothing: no replica keeps a session that did not start
                try:
                    self._call("DELETE", f"/v1/sessions/{quote(session_id, safe='')}", base=url)
                except ClusterEgressError:
                    with self._lock:
                        self._pending.setdefault(url, {})[session_id] = reg.until
                    self._start_sync()
            if old is not None:  # the session's previous pod is not put back: the session is gone everywhere
                with contextlib.suppress(ClusterEgressError):
                    self.unregister(session_id)
            elif mirror is not None:
                mirror.close()
            if refused:
                raise next(iter(refused.values()))
            raise ClusterEgressError(f"no egress proxy replica accepted session {session_id}: "
                                     + "; ".join(str(e) for e in unreachable.values()))
        if unreachable:
            log.warning("session %s registered with %d of %d egress proxy replicas; the others refuse its pod until "
                        "they answer and get it (%s)", session_id, len(accepted), len(urls),
                        "; ".join(str(e) for e in unreachable.values()))
        with self._lock:
            self._regs[session_id] = reg
            for url in urls:
                self._pending.get(url, {}).pop(session_id, None)
        self._start_sync()
        return str(accepted[min(accepted)].get("ca_bundle", "")).encode()

    def _sessions(self) -> list[_Reg]:
        with self._lock:
            return [r for r in self._regs.values() if not r.closing]

    def unregister(self, session_id: str) -> None:
        """Forget the session on every replica (their last decisions come back with it). A replica
        that does not answer is told again by its thread until it does or the registration expired."""
        with self._lock:
            reg = self._regs.pop(session_id, None)
        if reg is None:  # not registered through this client: every replica is told, the first error raised
            failed: list[ClusterEgressError] = []
            for url in self.endpoints():
                try:
                    self._call("DELETE", f"/v1/sessions/{quote(session_id, safe='')}", base=url)
                except ClusterEgressError as e:
                    failed.append(e)
            if failed:
                raise failed[0]
            return
        reg.closing = True
        urls = sorted(set(reg.streams) | set(self.endpoints()))
        errors: list[ClusterEgressError] = []

        def one(url: str) -> None:
            with reg.lock(url):
                q = f"?{_cursor(reg.streams.get(url))}" if reg.mirror is not None else ""
                try:
                    reply = self._call("DELETE", f"/v1/sessions/{quote(session_id, safe='')}{q}", base=url)
                except ClusterEgressRefused as e:
                    errors.append(e)
                    return
                except ClusterEgressError as e:
                    log.warning("egress proxy replica %s not told that session %s ended (told again until its "
                                "registration expires): %s", url, session_id, e)
                    with self._lock:
                        self._pending.setdefault(url, {})[session_id] = reg.until
                    return
                if reg.mirror is not None:
                    _copy(reg, url, reply)

        threads = [threading.Thread(target=one, args=(u,), daemon=True) for u in urls]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if reg.mirror is not None:
            reg.mirror.close()
        if errors:
            raise errors[0]

    def records(self, session: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """A session's recent decisions: from the local copy when there is one (no request), else every replica's."""
        if not session:
            return []
        if self.mirror_dir is not None:
            return read_records(self.audit_path, session=session, limit=limit)
        out: list[dict[str, Any]] = []
        for url in self.endpoints():
            out += self._call("GET", f"/v1/sessions/{quote(session, safe='')}/records?limit={int(limit)}",
                              base=url).get("records") or []
        return sorted(out, key=lambda r: str(r.get("ts", "")))[-limit:]


def _cursor(st: _Stream | None) -> str:
    """The query naming what the worker has of a session's decisions on a replica."""
    if st is None or st.stream is None:
        return "after=0"
    return f"after={st.seq}&stream={quote(st.stream, safe='')}"


def _cursor_obj(st: _Stream | None) -> dict[str, Any]:
    return {"after": 0, "stream": None} if st is None or st.stream is None else {"after": st.seq, "stream": st.stream}


def _copy(reg: _Reg, url: str, reply: dict[str, Any]) -> None:
    """A replica's answer to :func:`_cursor` into the session's copy: it answers from the start of
    its stream when the cursor named another, so each decision is appended once. (Under the
    session's lock for that replica.)"""
    stream = reply.get("stream")
    if stream is None or "records" not in reply:
        return
    st = reg.streams.get(url)
    if st is None or st.stream != stream:
        st = reg.streams[url] = _Stream(stream)
    if reg.mirror is not None:
        reg.mirror.append(reply, url)
    st.seq = max(st.seq, int(reply.get("next") or 0))


class _ReplicaSync(threading.Thread):
    """Keeps one replica in step with the worker's sessions: copies their decisions, registers a
    session it lacks (restarted, new, or unreachable before), repeats owed unregistrations."""

    def __init__(self, client: ClusterEgressClient, url: str) -> None:
        super().__init__(name=f"egress-replica-{url.rsplit('/', 1)[-1][:40]}", daemon=True)
        self.client, self.url = client, url
        self.down = False
        self.batch = True  # POST /v1/poll; an older replica (404): one GET per session

    def poll_many(self, regs: list[_Reg]) -> None:
        """One request for many sessions' decisions (under each one's lock for this replica)."""
        c = self.client
        again: list[_Reg] = []
        with contextlib.ExitStack() as held:
            live = []
            for reg in regs:
                held.enter_context(reg.lock(self.url))
                if not reg.closing:
                    live.append(reg)
            if not live:
                return
            try:
                reply = c._call("POST", "/v1/poll", {"sessions": {
                    r.session_id: _cursor_obj(r.streams.get(self.url)) for r in live}}, base=self.url)
            except ClusterEgressRefused as e:
                if e.status not in (404, 405):
                    raise
                self.batch = False
                return
            got = reply.get("sessions") or {}
            for reg in live:
                one = got.get(reg.session_id)
                if isinstance(one, dict):
                    _copy(reg, self.url, one)
                    one["draining"] = reply.get("draining")
                    if self._lacks(reg, one):
                        again.append(reg)
        for reg in again:
            with reg.lock(self.url):
                if not reg.closing:
                    self._put_again(reg)

    def _lacks(self, reg: _Reg, reply: dict[str, Any]) -> bool:
        """The replica does not know this live session (it restarted, is new, or was unreachable)."""
        return (reply.get("registered") is False and not reply.get("draining") and self.url not in reg.superseded
                and reg.until - time.monotonic() > 1)

    def _put_again(self, reg: _Reg) -> None:
        quiet = time.monotonic() - reg.refused_logged.get(self.url, -1e9) < _UNREGISTERED_LOG_EVERY_S
        if not quiet:
            log.warning("egress proxy replica %s does not know session %s (restarted or new?); registering its "
                        "pod there", self.url, reg.session_id)
        try:
            self.client._put(reg, self.url)
            reg.refused_logged.pop(self.url, None)
        except ClusterEgressRefused as e:
            if e.status == 409:  # its pod is gone, its address another session's: never put back there
                reg.superseded.add(self.url)
            if not quiet:  # (it is asked again every poll: said once a minute)
                log.warning("egress proxy replica %s refused session %s again: %s", self.url, reg.session_id, e)
                reg.refused_logged[self.url] = time.monotonic()

    def run(self) -> None:
        c = self.client
        while not c._closed.wait(MIRROR_POLL_S):
            try:
                regs = c._sessions()
                if self.batch:
                    for i in range(0, len(regs), POLL_MAX_SESSIONS):
                        self.poll_many(regs[i:i + POLL_MAX_SESSIONS])
                else:
                    for reg in regs:
                        self.poll(reg)
                self.repeat_unregistrations()
                if self.down:
                    log.info("egress proxy replica %s answers again", self.url)
                self.down = False
            except Exception as e:  # noqa: BLE001 - the thread goes on (a bug here must not stop the sync)
                if not isinstance(e, ClusterEgressError):
                    log.warning("egress proxy replica %s: %s while syncing", self.url, type(e).__name__)
                elif not self.down:
                    log.warning("egress proxy replica %s: %s", self.url, e)
                self.down = True
                if self.url not in c.endpoints():  # gone for good: nothing more will come from it
                    with c._lock:
                        c._syncs.pop(self.url, None)
                        c._pending.pop(self.url, None)
                    for reg in c._sessions():
                        reg.streams.pop(self.url, None)
                    return

    def poll(self, reg: _Reg) -> None:
        c = self.client
        path = f"/v1/sessions/{quote(reg.session_id, safe='')}/records"
        with reg.lock(self.url):
            if reg.closing:
                return
            reply = c._call("GET", f"{path}?{_cursor(reg.streams.get(self.url))}", base=self.url)
            _copy(reg, self.url, reply)
            if self._lacks(reg, reply):
                self._put_again(reg)

    def repeat_unregistrations(self) -> None:
        c = self.client
        with c._lock:
            owed = dict(c._pending.get(self.url, {}))
        for sid, until in owed.items():
            if until > time.monotonic():
                with contextlib.suppress(ClusterEgressRefused):
                    c._call("DELETE", f"/v1/sessions/{quote(sid, safe='')}", base=self.url)
            with c._lock:
                c._pending.get(self.url, {}).pop(sid, None)


class _MirrorFile:
    """The worker's local copy of one session's decisions (append only, one writer at a time)."""

    def __init__(self, session_id: str, path: Path) -> None:
        self.session_id, self.path = session_id, path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._f = open(path, "ab")  # noqa: SIM115 - closed by close()
        self._lock = threading.Lock()

    def append(self, reply: dict[str, Any], url: str) -> None:
        records = reply.get("records") or []
        with self._lock:
            if reply.get("lost"):
                log.warning("the egress proxy replica %s dropped decisions of session %s before they were fetched",
                            url, self.session_id)
            if records and not self._f.closed:
                self._f.write(b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records))
                self._f.flush()

    def close(self) -> None:
        with self._lock:
            self._f.close()


# ---------------------------------------------------------------- entry point


def admin_tls_context(cert_file: str | Path, key_file: str | Path) -> ssl.SSLContext:
    """The admin endpoint's server context (TLS 1.2+)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def _hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


async def serve(listen: tuple[str, int], admin: tuple[str, int], token: str, state_dir: Path,
                started: asyncio.Event | None = None, stop: asyncio.Event | None = None,
                credential_dirs: Sequence[str | Path] = (), allow_credential_commands: bool = False,
                credential_env_dir: str | Path | None = None, drain_s: float = 0.0, drain_fetch_s: float = 0.0,
                admin_tls: ssl.SSLContext | None = None) -> None:
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    audit_path = state_dir / AUDIT
    audit = SessionAuditLogs(audit_path)
    proxy = ClusterEgressProxy(audit=audit, credential_dirs=credential_dirs,
                               allow_credential_commands=allow_credential_commands,
                               credential_env_dir=credential_env_dir)
    admin_srv = AdminServer(proxy, token, audit_path)
    stop = stop or asyncio.Event()
    try:
        ph, pp = proxy.listen_tcp(*listen)
        ah, ap = await admin_srv.start(*admin, tls=admin_tls)
        log.info("egress proxy (cluster mode) on %s:%d, admin endpoint on %s:%d", ph, pp, ah, ap)
        if started is not None:
            started.set()
        await stop.wait()
        if drain_s > 0 or drain_fetch_s > 0:
            await proxy.drain(drain_s, drain_fetch_s)
    finally:
        await admin_srv.close()
        await proxy.close()
        audit.close()


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sandbox.egress.cluster", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--listen", default="0.0.0.0:3128", help="where sandbox pods connect (the Service's target port)")
    ap.add_argument("--admin-listen", default="0.0.0.0:3129", help="the registration endpoint (worker only)")
    ap.add_argument("--token-file", required=True, help="the admin token (a mounted Secret)")
    ap.add_argument("--state-dir", default="/var/lib/sandbox-egress", help="audit logs, one per session")
    ap.add_argument("--credential-dir", action="append", default=[], metavar="DIR",
                    help="policies' `file:` credential sources are read under this directory only (repeatable)")
    ap.add_argument("--credential-env-dir", metavar="DIR",
                    help="policies' `env: NAME` credential sources are read from the file DIR/NAME (a Secret's keys, "
                         "copied there) instead of this process's environment")
    ap.add_argument("--allow-credential-commands", action="store_true",
                    help="run policies' `command:` credential sources in this pod (off: refused at registration)")
    ap.add_argument("--admin-tls-cert", metavar="FILE",
                    help="serve the admin endpoint over TLS with this certificate chain (PEM; with --admin-tls-key): "
                         "registrations carry session CA keys")
    ap.add_argument("--admin-tls-key", metavar="FILE", help="the admin certificate's private key (PEM)")
    ap.add_argument("--allow-plain-admin", action="store_true",
                    help="serve the admin endpoint over plain HTTP on an address beyond loopback (off: refused without "
                         "--admin-tls-cert; only on a pod network that encrypts every packet itself)")
    ap.add_argument("--drain-seconds", type=float, default=5.0, metavar="S",
                    help="on SIGTERM, keep serving registered pods this long (the Service drops this replica meanwhile)")
    ap.add_argument("--drain-fetch-seconds", type=float, default=10.0, metavar="S",
                    help="then wait up to this long for the workers to fetch every session's last decisions")
    return ap


def _not_dumpable() -> None:
    """The proxy holds credential values and session CA keys: another process of its uid (a
    `kubectl exec` shell) must not read them through /proc/<pid>/mem or ptrace."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        token = read_token(args.token_file)
        listen, admin = _hostport(args.listen), _hostport(args.admin_listen)
    except (ClusterEgressError, ValueError) as e:
        print(f"egress proxy: {e}", file=sys.stderr)
        return 2
    admin_tls = None
    if bool(args.admin_tls_cert) != bool(args.admin_tls_key):
        print("egress proxy: --admin-tls-cert and --admin-tls-key go together", file=sys.stderr)
        return 2
    if args.admin_tls_cert:
        try:
            admin_tls = admin_tls_context(args.admin_tls_cert, args.admin_tls_key)
        except (OSError, ssl.SSLError) as e:
            print(f"egress proxy: cannot load the admin TLS certificate {args.admin_tls_cert} and key "
                  f"{args.admin_tls_key}: {getattr(e, 'strerror', None) or type(e).__name__}", file=sys.stderr)
            return 2
    if admin_tls is None and not args.allow_plain_admin and not _is_loopback(admin[0]):
        print(f"egress proxy: --admin-listen {args.admin_listen}: the admin endpoint takes the admin token and session "
              "CA keys; serve it with --admin-tls-cert/--admin-tls-key (`sandbox kube admin-tls` makes them), or "
              "pass --allow-plain-admin if the network encrypts this traffic itself", file=sys.stderr)
        return 2
    if listen[1] == admin[1] != 0:
        print("egress proxy: --listen and --admin-listen need different ports", file=sys.stderr)
        return 2
    for flag, d in [("--credential-dir", d) for d in args.credential_dir] + [("--credential-env-dir", args.credential_env_dir)]:
        if d is not None and (not os.path.isabs(d) or not os.path.isdir(d)):
            print(f"egress proxy: {flag} {d}: not an absolute path to a directory", file=sys.stderr)
            return 2
    _not_dumpable()

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(listen, admin, token, Path(args.state_dir), stop=stop, credential_dirs=args.credential_dir,
                    allow_credential_commands=args.allow_credential_commands, credential_env_dir=args.credential_env_dir,
                    drain_s=max(0.0, args.drain_seconds), drain_fetch_s=max(0.0, args.drain_fetch_seconds),
                    admin_tls=admin_tls)

    from sandbox.egress import evloop

    evloop.run(run())  # uvloop, as the host daemon (SANDBOX_EGRESS_LOOP=asyncio falls back)
    return 0


if __name__ == "__main__":
    sys.exit(main())
