"""Client side of the egress daemon: what the runtime calls. Nobody starts the proxy by hand.

    mgr = EgressManager(default_state_dir())
    host_dir = mgr.register(session_id, policy.egress)   # bind-mount host_dir at /run/sandbox-egress
    ...
    mgr.unregister(session_id)                          # the daemon exits once idle

Every request holds ``manager.lock`` from "is the daemon there?" to its answer, and
the daemon takes the same lock before it exits for idleness, so a request can never
land on a daemon that is on its way out, and two runtimes cannot start two daemons.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import sandbox
from sandbox.egress import daemon as _d
from sandbox.egress.audit import read_records
from sandbox.egress.credentials import CredentialError
from sandbox.egress.credentials import resolve as resolve_material
from sandbox.egress.rules import EgressPolicy
from sandbox.egress.unixsock import connect_unix

MOUNT_POINT = "/run/sandbox-egress"
PROXY_URL = "http://127.0.0.1:3128"


class EgressError(RuntimeError):
    pass


def default_state_dir() -> Path:
    """``<state dir>/egress`` (:mod:`sandbox.paths`, stdlib only), so the CLI reads the audit
    log the runtime's daemon writes."""
    from sandbox.paths import egress_dir

    return egress_dir()


# Every variable through which common clients take a CA bundle (curl, OpenSSL/Python, requests,
# pip, git's libcurl-gnutls, AWS, cargo, Nix): all name the complete bundle (the host's roots plus
# the session CA), because most of them REPLACE the default store. Node's is additive.
CA_BUNDLE = f"{MOUNT_POINT}/ca-bundle.pem"
CA_ENV_VARS = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "PIP_CERT", "GIT_SSL_CAINFO",
               "AWS_CA_BUNDLE", "CARGO_HTTP_CAINFO", "NIX_SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS")


def ca_env() -> dict[str, str]:
    """The CA variables of a sandbox with egress (the bundle is always written, so they are safe to set)."""
    return {k: CA_BUNDLE for k in CA_ENV_VARS}


def proxy_env() -> dict[str, str]:
    """The environment a sandbox with egress needs (the forwarder listens on 3128)."""
    env = {k: PROXY_URL for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")}
    env.update({"NO_PROXY": "localhost,127.0.0.1", "no_proxy": "localhost,127.0.0.1"})
    env.update(ca_env())
    return env


class EgressManager:
    def __init__(
        self,
        state_dir: Path | None = None,
        *,
        idle_exit_s: float = 30.0,
        drop_uid: int = 65534,
        drop_gid: int = 65534,
        python: str = sys.executable,
        timeout_s: float = 10.0,
    ) -> None:
        self.state_dir = Path(state_dir or default_state_dir()).resolve()
        self.idle_exit_s = idle_exit_s
        self.drop_uid, self.drop_gid = drop_uid, drop_gid
        self.python = python
        self.timeout_s = timeout_s

    @property
    def audit_path(self) -> Path:
        return self.state_dir / _d.AUDIT

    # ------------------------------------------------------------ the runtime's API

    def register(self, session_id: str, policy: EgressPolicy) -> Path:
        """Start (or reuse) the daemon and give ``session_id`` its own proxy socket.
        Returns the host directory to bind-mount at /run/sandbox-egress (it holds proxy.sock).
        Registering a live session again replaces its policy and returns the same directory."""
        if not policy.enabled:
            raise EgressError("policy allows no egress: give the sandbox no proxy socket at all")
        if not _d.SESSION_ID.match(session_id):
            raise EgressError(f"invalid session id {session_id!r} (letters, digits, '_.-', at most 64)")
        try:
            # Credentials are read HERE, by the process that owns the sandbox (its environment,
            # its files, its commands), and travel only over the owner-only control socket.
            material = resolve_material(policy)
        except CredentialError as e:
            raise EgressError(f"egress credentials: {e}") from None
        msg = {"op": "add_session", "session": session_id, "policy": policy.model_dump(mode="json"), "material": material.to_wire()}
        reply = self._request(msg, start=True)
        assert reply is not None
        return Path(reply["dir"])

    def unregister(self, session_id: str) -> None:
        """Close the session's socket and connections. A no-op when the daemon is gone."""
        self._request({"op": "remove_session", "session": session_id}, start=False)

    def status(self) -> dict[str, Any] | None:
        """The daemon's status, or None when it is not running (never starts it)."""
        return self._request({"op": "status"}, start=False)

    def sessions(self) -> list[str]:
        st = self.status()
        return [s["session"] for s in st["sessions"]] if st else []

    def prune(self, keep: Iterable[str]) -> list[str]:
        """Unregister every session not in ``keep`` (for the runtime's orphan reaper)."""
        keep_set = set(keep)
        gone = [s for s in self.sessions() if s not in keep_set]
        for s in gone:
            self.unregister(s)
        return gone

    def records(self, session: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Recent audit records, optionally of one session."""
        return read_records(self.audit_path, session=session, limit=limit)

    # ------------------------------------------------------------ plumbing

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.state_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
        fd = os.open(self.state_dir / _d.MANAGER_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _request(self, msg: dict[str, Any], *, start: bool) -> dict[str, Any] | None:
        with self._locked():
            try:
                return self._send(msg)
            except (FileNotFoundError, ConnectionRefusedError):
                if not start:
                    return None
            self._spawn()
            return self._send(msg)

    def _send(self, msg: dict[str, Any]) -> dict[str, Any]:
        sock = connect_unix(self.state_dir / _d.CONTROL, timeout=self.timeout_s)
        with sock:
            sock.sendall((json.dumps(msg) + "\n").encode())
            buf = b""
            while not buf.endswith(b"\n"):
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    raise EgressError("egress daemon did not answer in time") from None
                if not data:
                    raise EgressError("egress daemon closed the control connection")
                buf += data
        reply: dict[str, Any] = json.loads(buf)
        if not reply.get("ok"):
            raise EgressError(f"egress daemon refused {msg.get('op')}: {reply.get('error')}")
        return reply

    def _spawn(self) -> None:
        """Run the daemon detached; it returns once its control socket listens."""
        pkg_parent = str(Path(sandbox.__file__).resolve().parent.parent)
        # A minimal environment: the runtime's may hold API keys the proxy has no use for.
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": pkg_parent, "LANG": "C.UTF-8"}
        if os.environ.get("SANDBOX_EGRESS_LOOP"):  # the event loop choice (evloop.py), never a secret
            env["SANDBOX_EGRESS_LOOP"] = os.environ["SANDBOX_EGRESS_LOOP"]
        log_path = self.state_dir / "daemon.log"
        cmd = [
            self.python, "-m", "sandbox.egress.daemon",
            "--state-dir", str(self.state_dir),
            "--idle-exit", str(self.idle_exit_s),
            "--uid", str(self.drop_uid), "--gid", str(self.drop_gid),
            "--detach",
        ]  # fmt: skip
        with open(log_path, "ab") as log:
            os.chmod(log_path, 0o600)
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd="/", timeout=self.timeout_s, check=False, close_fds=True)
        if proc.returncode != 0:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise EgressError(f"egress daemon failed to start (exit {proc.returncode}):\n{tail}")
