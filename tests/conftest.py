"""Shared fixtures. Docker-backed tests fail, never skip, under CI=true:
a skipped security test would report a guarantee nobody checked."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _docker_unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"Docker is required under CI=true and is unavailable: {reason}", pytrace=False)
    pytest.skip(f"Docker unavailable (not CI): {reason}")


@pytest.fixture(scope="session")
def docker_client():
    try:
        import docker

        client = docker.from_env(timeout=120)
        client.ping()
    except Exception as e:  # noqa: BLE001
        _docker_unavailable(f"{type(e).__name__}: {e}")
    from sandbox import images

    for r in images.recipes():
        if not images.image_present(client, r.image_tag()):
            _docker_unavailable(f"image {r.image_tag()} not built (run `sandbox images build`)")
    return client


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sandbox-state")


@pytest.fixture(scope="session")
def runtime(docker_client, state_dir: Path):
    from sandbox.runtime import Runtime

    rt = Runtime(client=docker_client, state_dir=state_dir, owner_kind="pytest")
    yield rt
    rt.gc(mine=True)  # never another test run's sandboxes


@pytest.fixture
def make_sandbox(runtime) -> Iterator:
    """Create sandboxes that are destroyed after the test, whatever happens."""
    from sandbox.policy import load_policy, policy_from_dict

    made = []

    def make(profile: str | dict = "default", **kw):
        pol = policy_from_dict(profile) if isinstance(profile, dict) else load_policy(profile)
        sb = runtime.create(pol, session_id=kw.pop("session_id", f"test_{uuid.uuid4().hex[:8]}"), **kw)
        made.append(sb)
        return sb

    yield make
    for sb in made:
        sb.destroy()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The neighbour bombs run last: they raise the host's load average for a minute or more,
    and the worker's admission control (rightly) refuses work under that load."""
    last = [i for i in items if i.get_closest_marker("neighbours")]
    if last:
        items[:] = [i for i in items if not i.get_closest_marker("neighbours")] + last
