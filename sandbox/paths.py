"""Where sandbox keeps its state and finds its configuration: one layout for every part.

State (``state_dir()``; ``SANDBOX_STATE_DIR`` moves all of it)::

    /var/lib/sandbox                    root; others: $XDG_STATE_HOME/sandbox (~/.local/state/sandbox)
      workspaces/                       disk-backed workspaces (runtime)
      egress/                           egress proxy daemon: control socket, per-session sockets, audit.jsonl
      worker/                           environment worker: lock, SDK work dir
      sessions/                         the worker's session store: workspaces, checkpoints, call journal,
                                        audit trails, egress cursors
      policies/                         compiled-policy cache (0700; HMAC'd entries, .key) for a fast exec
      controlplane/                     embedded control plane: database, keys, endpoint.json
      cache/rootfs/                     only when SANDBOX_STATE_DIR is set (see ``rootfs_cache_dir``)

Two things live elsewhere on purpose: the uid/gid leases of live sandboxes are host-wide
(``uid_leases_dir``: /run/sandbox/uids for root, a tmpfs a reboot clears), so two runtimes
with different state dirs never hand out one uid; and the rootfs cache is a cache
(/var/cache/sandbox for root) unless ``SANDBOX_STATE_DIR`` or ``SANDBOX_ROOTFS_CACHE`` say otherwise.

The runtime's own state directory is the top of the layout (``runtime_dir()``): it
places ``workspaces/`` and ``egress/`` below itself, so a ``Runtime`` given another
directory (tests, the worker) keeps everything it owns together.

Configuration (profiles, seccomp allowlists), first match wins::

    $SANDBOX_PROFILES (os.pathsep-separated), ./profiles, $XDG_CONFIG_HOME/sandbox/profiles
    (~/.config/sandbox/profiles), /etc/sandbox/profiles, then the profiles shipped in the package;
    seccomp allowlists: the ``seccomp/`` subdirectory of each.

Only the standard library is imported here: every command, however small, may call this.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
SHIPPED_PROFILES_DIR = PACKAGE_DIR / "profiles"
SHIPPED_RECIPES_DIR = PACKAGE_DIR / "recipes"
SYSTEM_STATE_DIR = Path("/var/lib/sandbox")
SYSTEM_CACHE_DIR = Path("/var/cache/sandbox")
SYSTEM_CONFIG_DIR = Path("/etc/sandbox")

# Every environment variable sandbox reads for its layout (documented in README.md).
ENV_STATE_DIR = "SANDBOX_STATE_DIR"
ENV_PROFILES = "SANDBOX_PROFILES"
ENV_ROOTFS_CACHE = "SANDBOX_ROOTFS_CACHE"
ENV_UID_LEASES = "SANDBOX_UID_LEASES"


def _xdg(var: str, default: str) -> Path:
    """An XDG base directory: the variable when it holds an absolute path (the spec says to
    ignore relative ones), else ``~/<default>``."""
    v = os.environ.get(var, "")
    return Path(v) if v and os.path.isabs(v) else Path.home() / default


def _is_root() -> bool:
    return os.geteuid() == 0


# ---------------------------------------------------------------- state

def state_dir() -> Path:
    """The top of all state: ``$SANDBOX_STATE_DIR``; else /var/lib/sandbox for root; else
    ``$XDG_STATE_HOME/sandbox`` (``~/.local/state/sandbox``)."""
    env = os.environ.get(ENV_STATE_DIR)
    if env:
        return Path(env).expanduser()
    if _is_root():
        return SYSTEM_STATE_DIR
    return _xdg("XDG_STATE_HOME", ".local/state") / "sandbox"


default_state_dir = state_dir  # the name the runtime, worker and egress modules use


def runtime_dir() -> Path:
    """The runtime's state directory (``Runtime(state_dir=None)``): the top of the layout."""
    return state_dir()


def workspaces_dir() -> Path:
    return runtime_dir() / "workspaces"


def egress_dir() -> Path:
    return state_dir() / "egress"


def worker_dir() -> Path:
    return state_dir() / "worker"


def sessions_dir() -> Path:
    return state_dir() / "sessions"


def controlplane_dir() -> Path:
    return state_dir() / "controlplane"


def uid_leases_dir() -> Path:
    """Host-wide, not per state dir (see the module docstring): ``$SANDBOX_UID_LEASES``; else
    /run/sandbox/uids for root; else ``$XDG_RUNTIME_DIR/sandbox-uids`` or /tmp/sandbox-uids-UID."""
    env = os.environ.get(ENV_UID_LEASES)
    if env:
        return Path(env)
    if _is_root():
        return Path("/run/sandbox/uids")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "sandbox-uids" if runtime else Path(f"/tmp/sandbox-uids-{os.getuid()}")


def rootfs_cache_dir() -> Path:
    """Debootstrapped root filesystems, reused between image builds: ``$SANDBOX_ROOTFS_CACHE``;
    else ``$SANDBOX_STATE_DIR/cache/rootfs`` when that is set; else /var/cache/sandbox/rootfs for
    root and ``$XDG_CACHE_HOME/sandbox/rootfs`` (``~/.cache/sandbox/rootfs``) for others."""
    env = os.environ.get(ENV_ROOTFS_CACHE)
    if env:
        return Path(env).expanduser()
    if os.environ.get(ENV_STATE_DIR):
        return state_dir() / "cache" / "rootfs"
    if _is_root():
        return SYSTEM_CACHE_DIR / "rootfs"
    return _xdg("XDG_CACHE_HOME", ".cache") / "sandbox" / "rootfs"


# ---------------------------------------------------------------- configuration

def profile_dirs() -> list[Path]:
    """Directories searched for a profile name, first match wins (see the module docstring)."""
    dirs: list[Path] = []
    extra = os.environ.get(ENV_PROFILES)
    if extra:
        dirs += [Path(d).expanduser() for d in extra.split(os.pathsep) if d]
    try:
        dirs.append(Path.cwd() / "profiles")  # the current directory at the time of the lookup
    except OSError:  # the current directory was removed: nothing to find there
        pass
    dirs.append(_xdg("XDG_CONFIG_HOME", ".config") / "sandbox" / "profiles")
    dirs.append(SYSTEM_CONFIG_DIR / "profiles")
    dirs.append(SHIPPED_PROFILES_DIR)
    out: list[Path] = []
    for d in dirs:  # the same directory twice (./profiles inside the package) would list twice
        if d not in out:
            out.append(d)
    return out


def seccomp_dirs() -> list[Path]:
    """Directories searched for a seccomp allowlist name: ``seccomp/`` in each profile directory."""
    return [d / "seccomp" for d in profile_dirs()]
