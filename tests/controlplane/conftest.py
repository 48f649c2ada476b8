"""Fixtures: a real control plane on 127.0.0.1:0 in a temp state dir, and clients for it.

No mocks: the official SDK talks HTTP to the real server.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.controlplane import ControlPlane, LocalAdmin

from .helpers import ManualClock, http


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's real key must never be picked up (or sent to the local server).
    for var in (
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_AUTH_TOKEN",
        "ANTHROPIC_BASE_URL",
        "ANTHROPIC_PROFILE",
        "ANTHROPIC_ENVIRONMENT_KEY",
        "ANTHROPIC_CONFIG_DIR",
    ):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ControlPlane]:
    with ControlPlane(tmp_path / "cp", sse_ping_interval=0.3) as plane:
        yield plane


@pytest.fixture
def cp_clocked(tmp_path: Path, clock: ManualClock) -> Iterator[ControlPlane]:
    with ControlPlane(tmp_path / "cp", sse_ping_interval=0.3, clock=clock) as plane:
        yield plane


@pytest.fixture
def admin(cp: ControlPlane) -> Iterator[LocalAdmin]:
    with LocalAdmin(cp.base_url, cp.admin_key, http_client=http()) as a:
        yield a
