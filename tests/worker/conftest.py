"""Fixtures for the worker: a real control plane on loopback, a real worker, real sandboxes.

Docker-backed fixtures go through `docker_client` (tests/conftest.py), so they
fail, never skip, under CI=true.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.controlplane import ControlPlane, LocalAdmin
from sandbox.worker import EnvironmentKey, Worker, WorkerConfig
from sandbox.worker.logs import setup_logging
from sandbox.worker.runner import BackgroundWorker

from .helpers import LogCapture, free_port


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL", "ANTHROPIC_ENVIRONMENT_KEY",
                "ANTHROPIC_ENVIRONMENT_KEY_FILE", "ANTHROPIC_PROFILE", "ANTHROPIC_CONFIG_DIR"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(autouse=True)
def _unmount_workspaces(tmp_path: Path) -> Iterator[None]:
    """Session stores loop-mount workspaces; whatever a test leaves mounted under its tmp dir goes after it
    (runs after the worker fixtures' teardown: this fixture is set up first)."""
    yield
    root = str(tmp_path.resolve()) + "/"
    with open("/proc/self/mounts") as f:
        mounts = [line.split()[1].replace("\\040", " ") for line in f]
    for mnt in sorted((m for m in mounts if m.startswith(root)), reverse=True):
        subprocess.run(["umount", "-l", mnt], capture_output=True)


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ControlPlane]:
    with ControlPlane(tmp_path / "cp", port=free_port(), sse_ping_interval=0.5) as plane:
        yield plane


@pytest.fixture
def admin(cp: ControlPlane) -> Iterator[LocalAdmin]:
    with LocalAdmin(cp.base_url, cp.admin_key) as a:
        yield a


@pytest.fixture
def worker_logs() -> Iterator[LogCapture]:
    cap = LogCapture()
    handler = setup_logging(logging.INFO, stream=cap.stream)
    yield cap
    logging.getLogger().removeHandler(handler)


@pytest.fixture
def start_worker(docker_client: Any, cp: ControlPlane, tmp_path: Path,
                 worker_logs: LogCapture) -> Iterator[Callable[..., Worker]]:
    """Start in-process workers against `cp`; all are stopped (sandboxes destroyed) after the test."""
    running: list[BackgroundWorker] = []

    def start(**overrides: Any) -> Worker:
        cfg: dict[str, Any] = dict(base_url=cp.base_url, environment_id=cp.environment_id,
                                   state_dir=tmp_path / f"worker{len(running)}", store_dir=tmp_path / "sessions",
                                   max_sessions=4, warm=0,
                                   lease_ttl=10, max_idle=30.0, park_grace=60.0, metrics_port=0)
        cfg.update(overrides)
        worker = Worker(WorkerConfig(**cfg), EnvironmentKey(cp.environment_key, "test"))
        running.append(BackgroundWorker(worker).start())
        return worker

    yield start
    for bw in reversed(running):
        bw.stop(timeout=90)




@pytest.fixture
def worker_process(cp: ControlPlane, tmp_path: Path,
                   docker_client: Any) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """`sandbox worker` as a real process (so it can be killed -9); log in <tmp>/<name>.log.
    All of them share the session store <tmp>/sessions unless told otherwise."""
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(name: str, *extra: str, base_url: str | None = None) -> subprocess.Popen[bytes]:
        key_file = tmp_path / "env.key"
        key_file.write_text(cp.environment_key)
        key_file.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC_")}
        log = open(tmp_path / f"{name}.log", "ab")  # noqa: SIM115 - owned by the process
        p = subprocess.Popen(
            [sys.executable, "-m", "sandbox.cli", "worker", "--base-url", base_url or cp.base_url,
             "--environment-id", cp.environment_id, "--environment-key-file", str(key_file),
             "--state-dir", str(tmp_path / f"state-{name}"), "--session-store", str(tmp_path / "sessions"),
             "--lease-ttl", "10", "--max-idle", "30", *extra],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        procs.append(p)
        return p

    yield spawn
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(40)
        except subprocess.TimeoutExpired:
            p.kill()
