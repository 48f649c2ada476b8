"""Embedded local control plane: serves the Environments Work API and the Sessions
API the official `anthropic` SDK worker uses, backed by SQLite, on loopback.

`ControlPlane` (server.py) runs it; `LocalAdmin` (client.py) plays the model and
the user against it; cli.py holds the `sandbox control-plane` / `sandbox session`
commands.
"""

from __future__ import annotations

from .client import LocalAdmin, LocalAdminError
from .server import ControlPlane, ControlPlaneError

__all__ = ["ControlPlane", "ControlPlaneError", "LocalAdmin", "LocalAdminError"]
