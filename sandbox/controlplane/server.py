"""`ControlPlane`: the embedded local stand-in for Anthropic's environments/sessions service.

    with ControlPlane(Path("~/.local/state/sandbox/controlplane").expanduser()) as cp:
        client = anthropic.AsyncAnthropic(base_url=cp.base_url, auth_token=cp.environment_key)
        worker = EnvironmentWorker(client, environment_id=cp.environment_id, environment_key=cp.environment_key)

The official SDK talks to it unchanged; only `base_url` differs. State (SQLite,
WAL) and keys (0600 files) live in `state_dir`; one control plane per state
directory (an exclusive lock enforces it). Keys are exposed as properties for
in-process callers and never logged, printed, or shown in `repr`.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import socket
import ssl
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO
from urllib.parse import urlsplit

from . import keys
from .api import Api
from .auth import Authenticator
from .clock import Clock, system_clock
from .db import Database
from .endpoint import (
    ADMIN_KEY_FILE,
    DB_FILE,
    DEFAULT_PORT,
    LOCK_FILE,
    Endpoint,
    read_port,
    remove_endpoint,
    write_endpoint,
    write_port,
)
from .environments import Environments
from .http import DEFAULT_MAX_BODY, LOOPBACK_HOST_NAMES, ControlPlaneHTTPServer
from .sessions import Sessions
from .skills import SkillError, Skills
from .tls import (
    LOOPBACK_NAMES,
    ServerTls,
    TlsError,
    ensure_generated,
    is_wildcard_host,
    server_context,
    url_host,
    validate_advertise_url,
)
from .work import WorkQueue

log = logging.getLogger("sandbox.controlplane")


class _RedactingFilter(logging.Filter):
    """Defence in depth: no record from this package leaves with a key in it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format is still logged, just unformatted
            return True
        redacted = keys.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            # Formatters reuse exc_text when set, so the traceback is redacted too.
            record.exc_text = keys.redact(logging.Formatter().formatException(record.exc_info))
        return True


if not any(isinstance(f, _RedactingFilter) for f in log.filters):
    log.addFilter(_RedactingFilter())


class ControlPlaneError(Exception):
    """The control plane cannot start (state directory in use, insecure key file, ...)."""


class ControlPlane:
    def __init__(
        self,
        state_dir: Path,
        host: str = "127.0.0.1",
        port: int | None = 0,
        *,
        sse_ping_interval: float = 15.0,
        max_body_bytes: int = DEFAULT_MAX_BODY,
        clock: Clock | None = None,
        skills: list[Path] | None = None,
        tls: ServerTls | None = None,
        advertise_url: str | None = None,
    ) -> None:
        """`tls`: serve HTTPS (required for a non-loopback `host`): `ServerTls()` for a CA and certificate made
        under `<state_dir>/tls/`, `ServerTls(cert, key)` for the operator's. `advertise_url`: the URL workers on
        other hosts use (https://HOST:PORT); it goes into each work secret as `api_base_url`."""
        self._tls = tls
        self._advertise_arg = advertise_url
        self._advertise_url: str | None = None
        self._ca_file: Path | None = None
        self._skill_files = [Path(p) for p in (skills or [])]
        self.skill_ids: dict[str, str] = {}  # archive path -> skill id, for the skills given here
        self.state_dir = Path(state_dir).expanduser()
        self.host = host
        self.port = port
        self._ping = sse_ping_interval
        self._max_body = max_body_bytes
        self._clock = clock or system_clock
        self._lock_file: IO[bytes] | None = None
        self._db: Database | None = None
        self._server: ControlPlaneHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._base_url: str | None = None
        self._environment_id: str | None = None
        self._environment_key: str | None = None
        self._admin_key: str | None = None
        self._environments: Environments | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._server is not None:
            raise ControlPlaneError("control plane already started")
        if self._tls is None and not _is_loopback(self.host):
            raise ControlPlaneError(
                f"refusing to listen on {self.host} without TLS: environment keys and sessions tokens would cross "
                "the network in clear. Serve TLS (`--tls` for a generated CA, or `--tls-cert/--tls-key`), or keep "
                "--host on loopback")
        try:
            advertise = validate_advertise_url(self._advertise_arg, tls=self._tls is not None) \
                if self._advertise_arg else None
        except TlsError as e:
            raise ControlPlaneError(str(e)) from None
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._take_lock()
        try:
            self._admin_key, _ = keys.load_or_create_key(
                self.state_dir / ADMIN_KEY_FILE, keys.ADMIN_KEY_PREFIX, keys.new_admin_key
            )
            db = self._db = Database(self.state_dir / DB_FILE)
            environments = self._environments = Environments(db, self._clock, self.state_dir)
            self._environment_id, self._environment_key = environments.ensure_default()
            work = WorkQueue(db, self._clock)
            sessions = Sessions(db, self._clock, work)
            skills = Skills(self.state_dir)
            for path in self._skill_files:
                self.skill_ids[str(path)] = skills.add(path)
            ssl_context = self._ssl_context(advertise)
            allowed_hosts = None
            if _is_loopback(self.host):
                allowed_hosts = LOOPBACK_HOST_NAMES | {self.host.lower()}
                if advertise:  # e.g. a TLS-terminating proxy on this host forwards the advertised name
                    allowed_hosts |= {str(urlsplit(advertise).hostname).lower()}
            server = self._bind(allowed_hosts, ssl_context)
            bound_host, bound_port = str(server.server_address[0]), int(server.server_address[1])
            if is_wildcard_host(bound_host):  # this host's own clients (CLI, a local worker) use loopback
                bound_host = "::1" if ":" in bound_host else "127.0.0.1"
            scheme = "https" if ssl_context is not None else "http"
            self._base_url = f"{scheme}://{url_host(bound_host)}:{bound_port}"
            if advertise is None and not _is_loopback(self.host):
                advertise = f"https://{url_host(self._default_advertise_host())}:{bound_port}"
            self._advertise_url = advertise or self._base_url
            server.api = Api(
                db=db,
                work=work,
                sessions=sessions,
                environments=environments,
                auth=Authenticator(self._admin_key, environments, work),
                base_url=self._advertise_url,  # the api_base_url of each work secret
                sse_ping_interval=self._ping,
                skills=skills,
            )
            self._server = server
        except (keys.KeyFileError, SkillError, TlsError) as e:
            self._teardown()
            raise ControlPlaneError(str(e)) from None
        except BaseException:
            self._teardown()
            raise
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="controlplane-http", daemon=True
        )
        self._thread.start()
        write_port(self.state_dir, bound_port)
        write_endpoint(self.state_dir, Endpoint(self._base_url, self._environment_id,
                                                advertise_url=self._advertise_url, ca_file=self._ca_file))
        if not _is_loopback(self.host):
            log.warning("control plane listening on non-loopback address %s (TLS); anyone who can reach it can "
                        "try keys", self.host)
        log.info(
            "control plane listening on %s advertised as %s environment_id=%s environment_key=%s admin_key=%s",
            self._base_url,
            self._advertise_url,
            self._environment_id,
            keys.fingerprint(self._environment_key),
            keys.fingerprint(self._admin_key),
        )

    def _default_advertise_host(self) -> str:
        return socket.gethostname() if is_wildcard_host(self.host) else self.host

    def _ssl_context(self, advertise: str | None) -> ssl.SSLContext | None:
        """The server's TLS context (None: plain HTTP, loopback only); makes or renews the generated certificate."""
        tls = self._tls
        if tls is None:
            return None
        adv_host = urlsplit(advertise).hostname if advertise else None
        if tls.cert_file is None or tls.key_file is None:
            hosts = [h for h in (adv_host, *LOOPBACK_NAMES, self._default_advertise_host()) if h]
            cert, key, self._ca_file = ensure_generated(self.state_dir, hosts)
            return server_context(cert, key)
        return server_context(tls.cert_file, tls.key_file, must_cover=[adv_host] if adv_host else [])

    def _bind(self, allowed_hosts: frozenset[str] | None,
              ssl_context: ssl.SSLContext | None = None) -> ControlPlaneHTTPServer:
        """`port=None`: come back where this state directory's control plane was (its `port` file), so
        workers and CLIs find it again after a restart; else the default port; else any free port."""
        if self.port is not None:
            return ControlPlaneHTTPServer((self.host, self.port), None, self._max_body, allowed_hosts, ssl_context)
        recorded = read_port(self.state_dir)
        candidates = [p for p in (recorded, DEFAULT_PORT) if p] + [0]
        last: OSError | None = None
        for i, port in enumerate(candidates):
            # The recorded port may still be in TIME_WAIT or held by a dying predecessor: retry it briefly.
            tries = 20 if port == recorded else 1
            for _ in range(tries):
                try:
                    return ControlPlaneHTTPServer((self.host, port), None, self._max_body, allowed_hosts, ssl_context)
                except OSError as e:
                    last = e
                    if tries > 1:
                        time.sleep(0.25)
            if port == recorded:
                log.warning("control plane port %s (recorded in %s) is taken; listening elsewhere, workers "
                            "re-read endpoint.json", port, self.state_dir)
        raise last or OSError("no port to bind")

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        if self._db is not None:
            self._db.begin_close()  # long-polls and event streams return now
        server.shutdown()
        server.close_connections()
        server.server_close()
        if thread is not None:
            thread.join(5.0)
        remove_endpoint(self.state_dir)
        self._teardown()
        log.info("control plane stopped")

    def _teardown(self) -> None:
        self._server = None
        self._thread = None
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock_file is not None:
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            finally:
                self._lock_file.close()
                self._lock_file = None

    def _take_lock(self) -> None:
        fd = os.open(self.state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        f = os.fdopen(fd, "r+b")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise ControlPlaneError(f"another control plane is using {self.state_dir}") from None
        self._lock_file = f

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"base_url={self._base_url!r}" if self._server is not None else "stopped"
        return f"ControlPlane(state_dir={str(self.state_dir)!r}, {state}, environment_id={self._environment_id!r})"

    # ----------------------------------------------------------- properties

    def _require(self, value: str | None, name: str) -> str:
        if value is None:
            raise ControlPlaneError(f"{name} is available after start()")
        return value

    @property
    def base_url(self) -> str:
        return self._require(self._base_url, "base_url")

    @property
    def advertise_url(self) -> str:
        """The URL workers on other hosts use (the work secret's `api_base_url`); `base_url` if none was given."""
        return self._require(self._advertise_url, "advertise_url")

    @property
    def ca_file(self) -> Path | None:
        """The generated CA's certificate (give it to workers: `--ca-file`); None without a generated CA."""
        return self._ca_file

    @property
    def environment_id(self) -> str:
        return self._require(self._environment_id, "environment_id")

    @property
    def environment_key(self) -> str:
        return self._require(self._environment_key, "environment_key")

    @property
    def admin_key(self) -> str:
        return self._require(self._admin_key, "admin_key")

    @property
    def admin_key_path(self) -> Path:
        return self.state_dir / ADMIN_KEY_FILE

    def environment_key_path(self, environment_id: str | None = None) -> Path:
        """Where the key of `environment_id` (default: the default environment) is kept."""
        envs = self._environments
        if envs is None:
            raise ControlPlaneError("environment keys are available after start()")
        return envs.key_path(environment_id or self.environment_id)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
