"""Hardened local sandboxes for the tool calls of AI agents.

The Python API (see :mod:`sandbox.api` and the README)::

    import sandbox

    with sandbox.open(profile="default", workspace="./project") as sb:
        r = sb.exec(["python3", "-c", "print(6 * 7)"])
        print(r.exit_code, r.stdout)

``import sandbox`` stays cheap: the API and everything behind it (Docker client,
pydantic models) is imported on first use of one of the names below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sandbox.api import (
        CommandFailed,
        EngineUnavailable,
        ImageMissing,
        LimitExceeded,
        PolicyError,
        Result,
        Sandbox,
        SandboxError,
        SandboxStopped,
        WorkspaceError,
        open,
    )

__all__ = [
    "__version__",
    "open",
    "Sandbox",
    "Result",
    "SandboxError",
    "PolicyError",
    "EngineUnavailable",
    "ImageMissing",
    "WorkspaceError",
    "SandboxStopped",
    "LimitExceeded",
    "CommandFailed",
]

_API_NAMES = frozenset(__all__) - {"__version__"}


def _version() -> str:
    """The installed distribution's version; in a source tree without metadata, pyproject's."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sandbox")
    except PackageNotFoundError:
        pass
    import re
    from pathlib import Path

    try:
        text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    except OSError:
        return "0+unknown"
    m = re.search(r'(?m)^version\s*=\s*"([^"]+)"', text)
    return f"{m.group(1)}+source" if m else "0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        v = _version()
        globals()["__version__"] = v
        return v
    if name in _API_NAMES:
        from sandbox import api

        value = getattr(api, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sandbox' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
