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
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO

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
    ) -> None:
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
            allowed_hosts = LOOPBACK_HOST_NAMES | {self.host.lower()} if _is_loopback(self.host) else None
            server = self._bind(allowed_hosts)
            bound_host, bound_port = str(server.server_address[0]), int(server.server_address[1])
            url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
            self._base_url = f"http://{url_host}:{bound_port}"
            server.api = Api(
                db=db,
                work=work,
                sessions=sessions,
                environments=environments,
                auth=Authenticator(self._admin_key, environments, work),
                base_url=self._base_url,
                sse_ping_interval=self._ping,
                skills=skills,
            )
            self._server = server
        except (keys.KeyFileError, SkillError) as e:
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
        write_endpoint(self.state_dir, Endpoint(self._base_url, self._environment_id))
        if not _is_loopback(self.host):
            log.warning("control plane listening on non-loopback address %s; anyone who can reach it can try keys", self.host)
        log.info(
            "control plane listening on %s environment_id=%s environment_key=%s admin_key=%s",
            self._base_url,
            self._environment_id,
            keys.fingerprint(self._environment_key),
            keys.fingerprint(self._admin_key),
        )

    def _bind(self, allowed_hosts: frozenset[str] | None) -> ControlPlaneHTTPServer:
        """`port=None`: come back where this state directory's control plane was (its `port` file), so
        workers and CLIs find it again after a restart; else the default port; else any free port."""
        if self.port is not None:
            return ControlPlaneHTTPServer((self.host, self.port), None, self._max_body, allowed_hosts)
        recorded = read_port(self.state_dir)
        candidates = [p for p in (recorded, DEFAULT_PORT) if p] + [0]
        last: OSError | None = None
        for i, port in enumerate(candidates):
            # The recorded port may still be in TIME_WAIT or held by a dying predecessor: retry it briefly.
            tries = 20 if port == recorded else 1
            for _ in range(tries):
                try:
                    return ControlPlaneHTTPServer((self.host, port), None, self._max_body, allowed_hosts)
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
