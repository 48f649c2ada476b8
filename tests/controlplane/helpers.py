"""Helpers shared by the control plane tests (clients, a manual clock, token extraction)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

import anthropic
import httpx2 as httpx  # what anthropic ships; httpx is not a dependency
import httpx2

from sandbox.controlplane import ControlPlane

T = TypeVar("T")


class ManualClock:
    """The server's injectable "now": lease expiry without sleeping through a TTL."""

    def __init__(self) -> None:
        self._now = time.time()
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


# Building an HTTP client costs ~0.1 s (TLS context), so the tests share one of each.
_shared: dict[str, object] = {}


def http() -> httpx.Client:
    """For raw requests the SDK would never send."""
    client = _shared.get("httpx")
    if client is None:
        client = _shared["httpx"] = httpx.Client(timeout=10)
    return client  # type: ignore[return-value]


def _sdk_http() -> httpx2.Client:
    client = _shared.get("httpx2")
    if client is None:
        client = _shared["httpx2"] = httpx2.Client(timeout=10)
    return client  # type: ignore[return-value]


def env_client(plane: ControlPlane, token: str | None = None) -> anthropic.Anthropic:
    """The client a worker holds: Bearer environment key (or a sessions token), no API key."""
    return anthropic.Anthropic(
        base_url=plane.base_url,
        auth_token=token or plane.environment_key,
        api_key=None,
        max_retries=0,
        timeout=10,
        http_client=_sdk_http(),
    )


def admin_client(plane: ControlPlane) -> anthropic.Anthropic:
    """The client an operator holds: the (local) organisation key as `api_key`."""
    return anthropic.Anthropic(base_url=plane.base_url, api_key=plane.admin_key, max_retries=0, timeout=10, http_client=_sdk_http())


def sessions_token(secret: str | None) -> str:
    """Decode a work item's secret exactly as the SDK worker does."""
    from anthropic.lib.environments._worker import _sessions_token_from_secret

    token = _sessions_token_from_secret(secret)
    assert token is not None
    return token


def wait_for(fn: Callable[[], T | None], timeout: float = 10.0, interval: float = 0.02) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)
