"""`sandbox worker` and `sandbox demo` (registered lazily by sandbox/cli.py)."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import click

if TYPE_CHECKING:
    from .credentials import EnvironmentKey


def _fail(msg: str, code: int = 2) -> NoReturn:
    """The CLI's one failure path: the message on stderr, and a JSON error object on stdout
    when the command was given --json (as on every command)."""
    from sandbox.cli import fail

    fail(msg, code)


def _default_worker_state_dir() -> Path:
    from sandbox.paths import worker_dir

    return worker_dir()


def default_session_store() -> Path:
    """Shared by every worker of this host by default, whatever their --state-dir."""
    from sandbox.paths import state_dir

    return state_dir() / "sessions"


@click.command("worker")
@click.option("--base-url", help="Control plane base URL (default: the embedded control plane's endpoint.json).")
@click.option("--environment-id", help="Environment to claim work from (required with --base-url).")
@click.option("--environment-key-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File holding the environment key (mode 0600). Default: $ANTHROPIC_ENVIRONMENT_KEY, or the "
                   "embedded control plane's key file.")
@click.option("--control-plane-state-dir", type=click.Path(file_okay=False, path_type=Path),
              help="State directory of the embedded control plane to use (default: its standard location).")
@click.option("--ca-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Trust this CA bundle (PEM) for an https control plane instead of the system's: the CA file "
                   "`sandbox control-plane --tls` prints. Verification is never turned off. Default: the embedded "
                   "control plane's own CA (from its endpoint.json) when it has one.")
@click.option("--profile", default="worker", show_default=True, help="Policy profile (name or path) for sandboxes.")
@click.option("--max-sessions", type=click.IntRange(1, 256), default=4, show_default=True,
              help="Sessions served at once.")
@click.option("--warm", type=click.IntRange(0, 64), default=0, show_default=True,
              help="Pre-started sandboxes kept ready for new sessions.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve /metrics and /healthz on 127.0.0.1:PORT, or --metrics-host:PORT (0: any free port).")
@click.option("--metrics-host", default="127.0.0.1", show_default=True,  # (CKPT)
              help="Address of /metrics and /healthz: loopback unless another is named (0.0.0.0 or :: for a "
                   "cluster's Prometheus, which scrapes pod IPs; no authentication, restrict it with a NetworkPolicy).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Worker state (lock, sandbox runtime, SDK work dir). Default: <sandbox state dir>/worker.")
@click.option("--max-idle", type=float, default=60.0, show_default=True,
              help="Seconds a session's run continues after its turn ended before its sandbox is removed.")
@click.option("--lease-ttl", type=click.IntRange(10, 600), default=30, show_default=True,
              help="Lease TTL asked for on heartbeats (a crashed worker's work returns after this).")
@click.option("--drain-timeout", type=float, default=20.0, show_default=True,
              help="On SIGTERM, how long in-flight tool calls may take before they are interrupted.")
@click.option("--session-store", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where sessions' workspaces, the call journal and audit trails live. Every worker of one "
                   "environment must be given the same path (workers with their own state dirs too): a session's "
                   "next run may land on any of them. Default: <sandbox state dir>/sessions.")
@click.option("--journal", type=click.Choice(["auto", "sqlite", "files"]), default="auto", show_default=True,
              help="The call journal's form in the session store: sqlite (workers of one host), files (a store on a "
                   "network filesystem shared by several hosts or pods: NFS, CephFS, a ReadWriteMany volume), or "
                   "auto (by the store's filesystem). The store keeps its first worker's choice; a worker asked for "
                   "the other one does not start.")
@click.option("--retention", type=click.FloatRange(min=60), default=24 * 3600.0, show_default=True,
              help="Seconds a session's workspace is kept after its last activity.")
@click.option("--keep-idle", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Seconds a session's sandbox is kept after its run went idle (0: stop it; files stay).")
@click.option("--log-format", type=click.Choice(["json", "text"]), default="json", show_default=True)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.option("--backend", type=click.Choice(["docker", "kubernetes"]), default=None,  # (CLUSTER)
              help="Where sandboxes run: this host's Docker engine, or a cluster's agent-sandbox warm pools "
                   "(configuration: $SANDBOX_KUBE_CONFIG). Default: $SANDBOX_BACKEND, else docker.")
@click.option("--archive-interval", type=click.FloatRange(min=0), default=60.0, show_default=True,  # (CKPT)
              help="Cluster backend: during a run, a session's sandbox archives its workspace into the session "
                   "store at most this often (seconds, after a tool call), so a pod that dies loses only what "
                   "changed since. 0: only when the run ends.")
def worker_cmd(base_url: str | None, environment_id: str | None, environment_key_file: Path | None,
               control_plane_state_dir: Path | None, ca_file: Path | None, profile: str, max_sessions: int, warm: int,
               metrics_port: int | None, state_dir: Path | None, max_idle: float, lease_ttl: int,
               drain_timeout: float, session_store: Path | None, retention: float, keep_idle: float,
               log_format: str, verbose: bool, backend: str | None = None, journal: str = "auto",
               archive_interval: float = 60.0, metrics_host: str = "127.0.0.1") -> None:
    """Claim work from a control plane and run each session's tool calls in its own sandbox."""
    from .credentials import CredentialError, check_no_org_key, load_environment_key, scrub_environment
    from .logs import setup_logging

    # First, before anything reads a credential: no organisation key on a worker host.
    try:
        check_no_org_key()
    except CredentialError as e:
        _fail(str(e))
    setup_logging(logging.DEBUG if verbose else logging.INFO, fmt=log_format)
    try:
        endpoint_dir = None
        if base_url:
            if not environment_id:
                _fail("--environment-id is required with --base-url")
            key = load_environment_key(environment_key_file)
        else:
            from sandbox.controlplane.endpoint import resolve_state_dir

            endpoint_dir = resolve_state_dir(control_plane_state_dir)
            base_url, environment_id, key, embedded_ca = _embedded_endpoint(control_plane_state_dir,
                                                                            environment_key_file, environment_id)
            ca_file = ca_file or embedded_ca
    except CredentialError as e:
        _fail(str(e))
    scrub_environment()
    _check_transport(base_url, ca_file)

    import anyio

    from .worker import Worker, WorkerConfig, WorkerError, loop_options

    config = WorkerConfig(
        base_url=base_url, environment_id=environment_id, state_dir=state_dir or _default_worker_state_dir(),
        profile=profile, max_sessions=max_sessions, warm=warm, metrics_port=metrics_port, max_idle=max_idle,
        lease_ttl=lease_ttl, drain_timeout=drain_timeout, store_dir=session_store or default_session_store(),
        retention_s=retention, keep_idle=keep_idle, endpoint_dir=endpoint_dir, ca_file=ca_file,
    )
    config.journal = journal
    config.archive_interval = archive_interval  # (CKPT)
    try:  # (CKPT) a bad address is said before anything starts
        from .metrics import check_metrics_host

        config.metrics_host = check_metrics_host(metrics_host)[0]
    except ValueError as e:
        _fail(str(e))
    try:  # (CLUSTER) the backend setting, checked before anything starts
        from sandbox.backend import backend_name

        config.backend = backend_name(backend)
    except ValueError as e:
        _fail(str(e))
    worker = Worker(config, key)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            async def on_signals() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        logging.getLogger("sandbox.worker").info("signal received; draining")
                        worker.request_stop()
                        return

            tg.start_soon(on_signals)
            await worker.run()
            tg.cancel_scope.cancel()

    try:
        anyio.run(main, backend_options=loop_options())  # uvloop (WPERF, issue 11)
    except WorkerError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        sys.exit(130)
    if worker.fatal_error:
        _fail(worker.fatal_error, code=1)


def _check_transport(base_url: str, ca_file: Path | None) -> None:
    """Refuse to send the environment key in clear off this host, or to a server whose certificate does
    not verify: one handshake now, so a wrong CA stops the start with the URL and the reason."""
    from urllib.parse import urlsplit

    from sandbox.controlplane.tls import TlsError, client_context, is_loopback_host, preflight

    try:
        parts = urlsplit(base_url)
        parts.port  # noqa: B018 - validates the port
    except ValueError as e:
        _fail(f"--base-url {base_url!r} is not a valid URL: {e}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        _fail(f"--base-url {base_url!r}: expected https://HOST[:PORT]")
    if parts.scheme == "http":
        if not is_loopback_host(parts.hostname):
            _fail(f"refusing to send the environment key in clear to {base_url}: a control plane on another host "
                  "is reached over https (`sandbox control-plane --tls`, then --ca-file here)")
        if ca_file is not None:
            _fail(f"--ca-file {ca_file} is for an https control plane, but the base URL is {base_url}")
        return
    try:
        ctx = client_context(ca_file) if ca_file is not None else None
        note = preflight(base_url, ctx, ca_file=ca_file)
    except TlsError as e:
        _fail(str(e))
    if note:
        logging.getLogger("sandbox.worker").warning("%s", note)


def _embedded_endpoint(cp_state_dir: Path | None, key_file: Path | None,
                       environment_id: str | None) -> tuple[str, str, EnvironmentKey, Path | None]:
    """The embedded control plane's URL, environment, key and CA file (same convention as its CLI)."""
    import os

    from sandbox.controlplane.endpoint import ENV_KEY_FILE, EndpointError, read_endpoint, resolve_state_dir

    from .credentials import ENV_KEY_FILE_VAR, ENV_KEY_VAR, EnvironmentKey, load_environment_key, read_key_file

    sd = resolve_state_dir(cp_state_dir)
    try:
        ep = read_endpoint(sd)
    except EndpointError as e:
        _fail(f"{e}; or pass --base-url and --environment-id")
    env_id = environment_id or ep.environment_id
    if key_file is not None or os.environ.get(ENV_KEY_VAR) or os.environ.get(ENV_KEY_FILE_VAR):
        return ep.base_url, env_id, load_environment_key(key_file), ep.ca_file
    path = sd / ENV_KEY_FILE
    return ep.base_url, env_id, EnvironmentKey(read_key_file(path), f"file:{path}"), ep.ca_file


@click.command("demo")
@click.option("--profile", default=None, help="Policy profile for the sandboxes (default: worker + egress to PyPI).")
@click.option("--keep", is_flag=True, help="Keep the demo's state directory (logs, outbox) afterwards.")
def demo_cmd(profile: str | None, keep: bool) -> None:
    """Run the main job on one machine: control plane, worker, one scripted session."""
    from rich.console import Console

    from .credentials import CredentialError, check_no_org_key
    from .demo import run_demo

    try:
        check_no_org_key()
    except CredentialError as e:
        _fail(str(e))
    ok = run_demo(Console(), profile=profile, keep=keep)
    sys.exit(0 if ok else 1)
