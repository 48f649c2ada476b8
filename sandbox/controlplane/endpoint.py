"""Where a running control plane can be found: its state directory and `endpoint.json`.

The state directory (`<state dir>/controlplane`, see sandbox/paths.py: /var/lib/sandbox
for root, else ~/.local/state/sandbox; `$SANDBOX_STATE_DIR` moves it) holds the database, the key files and
`endpoint.json` (`{"base_url", "environment_id"[, "advertise_url", "ca_file"]}`, no secrets), which the CLI
reads to talk to the control plane another process started.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from . import keys

ENDPOINT_FILE = "endpoint.json"
ADMIN_KEY_FILE = "admin.key"
ENV_KEY_FILE = "environment.key"
DB_FILE = "controlplane.db"
LOCK_FILE = "controlplane.lock"


class EndpointError(Exception):
    """No usable endpoint.json in the state directory."""


@dataclass(frozen=True)
class Endpoint:
    base_url: str  # for clients on this host (loopback when bound to all addresses)
    environment_id: str
    advertise_url: str | None = None  # for workers on other hosts (the work secret's api_base_url)
    ca_file: Path | None = None  # the generated CA's certificate, when the control plane serves TLS with one


def default_state_dir() -> Path:
    from sandbox.paths import controlplane_dir  # <state dir>/controlplane, the one layout

    return controlplane_dir()


def resolve_state_dir(explicit: str | os.PathLike[str] | None) -> Path:
    return Path(explicit).expanduser() if explicit else default_state_dir()


def write_endpoint(state_dir: Path, endpoint: Endpoint) -> None:
    tmp = state_dir / f".{ENDPOINT_FILE}.tmp"
    doc: dict[str, str] = {"base_url": endpoint.base_url, "environment_id": endpoint.environment_id}
    if endpoint.advertise_url:
        doc["advertise_url"] = endpoint.advertise_url
    if endpoint.ca_file is not None:
        doc["ca_file"] = str(endpoint.ca_file)
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, state_dir / ENDPOINT_FILE)


def remove_endpoint(state_dir: Path) -> None:
    try:
        (state_dir / ENDPOINT_FILE).unlink()
    except FileNotFoundError:
        pass


def read_endpoint(state_dir: Path) -> Endpoint:
    path = state_dir / ENDPOINT_FILE
    try:
        data = json.loads(path.read_text())
        ca = data.get("ca_file")
        return Endpoint(base_url=str(data["base_url"]), environment_id=str(data["environment_id"]),
                        advertise_url=str(data["advertise_url"]) if data.get("advertise_url") else None,
                        ca_file=Path(ca) if isinstance(ca, str) and ca else None)
    except FileNotFoundError:
        raise EndpointError(f"no control plane endpoint at {path} (start one with `sandbox control-plane`)") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise EndpointError(f"{path} is not a valid endpoint file") from None


def read_admin_key(state_dir: Path) -> str:
    return keys.read_key_file(state_dir / ADMIN_KEY_FILE, keys.ADMIN_KEY_PREFIX)


def read_environment_key(state_dir: Path) -> str:
    return keys.read_key_file(state_dir / ENV_KEY_FILE, keys.ENV_KEY_PREFIX)


# ------------------------------------------------------------------ a stable address

PORT_FILE = "port"  # the port this state directory's control plane listens on; kept across restarts
DEFAULT_PORT = 7787  # tried first when the state directory has no port yet


def read_port(state_dir: Path) -> int | None:
    """The port recorded by an earlier start (None if none or unreadable)."""
    try:
        value = int((state_dir / PORT_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    return value if 0 < value < 65536 else None


def write_port(state_dir: Path, port: int) -> None:
    tmp = state_dir / f".{PORT_FILE}.tmp"
    tmp.write_text(f"{port}\n")
    os.replace(tmp, state_dir / PORT_FILE)
