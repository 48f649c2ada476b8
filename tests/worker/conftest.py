"""Fixtures for the worker: a real control plane on loopback, a real worker, real sandboxes.

Docker-backed fixtures go through `docker_client` (tests/conftest.py), so they
fail, never skip, under CI=true.
"""

from __future__ import annotations

import logging
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
                                   state_dir=tmp_path / f"worker{len(running)}", max_sessions=4, warm=0,
                                   lease_ttl=10, max_idle=30.0, park_grace=60.0, metrics_port=0)
        cfg.update(overrides)
        worker = Worker(WorkerConfig(**cfg), EnvironmentKey(cp.environment_key, "test"))
        running.append(BackgroundWorker(worker).start())
        return worker

    yield start
    for bw in reversed(running):
        bw.stop(timeout=90)


