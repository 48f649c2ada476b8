"""The policy model: one validated object that fully describes a sandbox.

Profiles are YAML files under ``profiles/`` (or any path). A profile may
``extends:`` another; the child is deep-merged over its parent before
validation, so every policy that reaches the compiler is complete and strict:
unknown keys are errors, uid 0 is an error, dangerous host paths are errors.
Errors name the file, the key and the reason (:class:`PolicyError`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sandbox.egress.rules import EgressPolicy

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"  # shipped as package data

# Host paths that must never be mounted into a sandbox, nor anything that
# contains them (mounting "/" would expose all of them).
DANGEROUS_HOST_PATHS: tuple[str, ...] = (
    "/",
    "/etc",
    "/proc",
    "/sys",
    "/dev",
    "/boot",
    "/root",
    "/run",
    "/var/run",
    "/var/lib/docker",
    "/var/lib/containerd",
    "/run/containerd",
    "/var/run/docker.sock",
    "/run/docker.sock",
    "/home",
    "/usr",
    "/lib",
    "/bin",
    "/sbin",
)

# Container paths a mount must not shadow: replacing them would undo the hardening.
_RESERVED_TARGETS: tuple[str, ...] = ("/", "/proc", "/sys", "/dev", "/etc", "/usr", "/bin", "/lib", "/opt/sandbox-agent")

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Environment names that would let a policy pass a credential or redirect the loader.
_FORBIDDEN_ENV = re.compile(r"^(ANTHROPIC_.*|LD_PRELOAD|LD_LIBRARY_PATH|LD_AUDIT|DOCKER_.*)$")


def _container_path(v: str) -> str:
    p = PurePosixPath(v)
    if not p.is_absolute() or ".." in p.parts or str(p) != v.rstrip("/") or "\x00" in v:
        raise ValueError(f"{v!r} must be a normalised absolute path")
    return str(p)


def check_host_path(v: str) -> str:
    """Refuse host paths that are, contain, or resolve to a dangerous location."""
    if "\x00" in v or not os.path.isabs(v):
        raise ValueError(f"{v!r} must be an absolute host path")
    candidates = {os.path.normpath(v), os.path.realpath(v)}
    for c in candidates:
        for bad in DANGEROUS_HOST_PATHS:
            if c == bad or (bad != "/" and bad.startswith(c.rstrip("/") + "/")):
                raise ValueError(f"host path {v!r} is or contains {bad}, which is never mounted")
            if bad in ("/proc", "/sys", "/dev", "/var/run/docker.sock", "/run/docker.sock", "/var/lib/docker", "/var/lib/containerd", "/run/containerd", "/etc", "/root", "/boot") and c.startswith(bad + "/"):
                raise ValueError(f"host path {v!r} lies inside {bad}, which is never mounted")
        if c.endswith("docker.sock") or c.endswith("containerd.sock"):
            raise ValueError(f"host path {v!r} is a container engine socket")
    return v



class PolicyError(ValueError):
    """A profile is invalid. ``problems`` lists (file, key, reason) triples."""

    def __init__(self, problems: list[tuple[str, str, str]]):
        self.problems = problems
        lines = [f"{f}: {k}: {r}" for f, k, r in problems]
        super().__init__("invalid policy:\n  " + "\n  ".join(lines))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class User(_Strict):
    uid: int = Field(10001, ge=1, le=2**31 - 2)
    gid: int = Field(10001, ge=1, le=2**31 - 2)

    @field_validator("uid", "gid", mode="before")
    @classmethod
    def _not_root(cls, v: Any) -> Any:
        if v == 0:
            raise ValueError("must not be 0: sandboxes never run as root")
        return v


class Workspace(_Strict):
    path: str = "/workspace"
    backing: Literal["tmpfs", "disk"] = "tmpfs"
    size_mb: int = Field(256, ge=1, le=1024 * 1024)

    @field_validator("path")
    @classmethod
    def _abs(cls, v: str) -> str:
        return _container_path(v)


class Tmpfs(_Strict):
    path: str
    size_mb: int = Field(ge=1, le=1024 * 64)
    exec: bool = False

    @field_validator("path")
    @classmethod
    def _abs(cls, v: str) -> str:
        return _container_path(v)


class ReadOnlyMount(_Strict):
    source: str
    target: str

    @field_validator("source")
    @classmethod
    def _safe_source(cls, v: str) -> str:
        return check_host_path(v)

    @field_validator("target")
    @classmethod
    def _abs(cls, v: str) -> str:
        return _container_path(v)


class Limits(_Strict):
    memory_mb: int = Field(512, ge=16)
    cpus: float = Field(1.0, gt=0, le=256)
    pids: int = Field(128, ge=8, le=1 << 22)


class Rlimits(_Strict):
    nofile: int = Field(1024, ge=16, le=1 << 20)
    nproc: int = Field(256, ge=8, le=1 << 22)
    fsize_mb: int = Field(256, ge=1)
    core: Literal[0] = 0
    cpu_s: int = Field(600, ge=1)
    stack_mb: int = Field(8, ge=1, le=1024)


class Seccomp(_Strict):
    """Which syscall allowlist to load, plus per-policy adjustments."""

    profile: str = "default"
    extra_allow: list[str] = []
    extra_deny: list[str] = []
    default_action: Literal["errno", "kill_process", "log"] = "errno"


class Timeouts(_Strict):
    call_s: float = Field(120, gt=0, le=24 * 3600)
    session_s: float = Field(3600, gt=0, le=7 * 24 * 3600)


class Output(_Strict):
    max_bytes: int = Field(1024 * 1024, ge=1024, le=1 << 30)


class Policy(_Strict):
    name: str
    description: str = ""
    image: str = "sandbox-runtime:latest"
    runtime: Literal["runc", "runsc"] = "runc"
    user: User = User()
    workspace: Workspace = Workspace()
    tmpfs: list[Tmpfs] = [Tmpfs(path="/tmp", size_mb=64)]
    read_only_mounts: list[ReadOnlyMount] = []
    limits: Limits = Limits()
    rlimits: Rlimits = Rlimits()
    seccomp: Seccomp = Seccomp()
    egress: EgressPolicy = EgressPolicy()
    env: dict[str, str] = {}
    timeouts: Timeouts = Timeouts()
    output: Output = Output()

    @field_validator("env")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not _ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
            if _FORBIDDEN_ENV.match(name):
                raise ValueError(f"{name!r} may not be set in a sandbox (credential or loader variable)")
            if "\x00" in value:
                raise ValueError(f"{name!r} contains a NUL byte")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Policy":
        targets = [self.workspace.path] + [t.path for t in self.tmpfs] + [m.target for m in self.read_only_mounts]
        seen: set[str] = set()
        for t in targets:
            if t in seen:
                raise ValueError(f"two mounts target {t}")
            seen.add(t)
            for reserved in _RESERVED_TARGETS:
                if t == reserved or (reserved != "/" and t.startswith(reserved + "/")):
                    raise ValueError(f"mount target {t} would shadow {reserved}")
        in_memory = sum(t.size_mb for t in self.tmpfs) + (self.workspace.size_mb if self.workspace.backing == "tmpfs" else 0)
        if in_memory >= self.limits.memory_mb:
            # tmpfs pages are charged to the container's memory cgroup; with no swap a full
            # tmpfs would OOM-kill the sandbox instead of failing the write with ENOSPC.
            raise ValueError(
                f"tmpfs sizes ({in_memory} MiB incl. a tmpfs workspace) must stay below limits.memory_mb "
                f"({self.limits.memory_mb} MiB), or filling them kills the sandbox instead of ENOSPC"
            )
        return self

    def digest(self) -> str:
        """A stable hash of everything this policy enforces (for audit reports and trails)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


# ---------------------------------------------------------------- loading

def profile_search_path() -> list[Path]:
    """Where a profile name is looked up, first match wins: ``$SANDBOX_PROFILES``, ``./profiles``,
    ``$XDG_CONFIG_HOME/sandbox/profiles``, ``/etc/sandbox/profiles``, the shipped profiles
    (:func:`sandbox.paths.profile_dirs`)."""
    from sandbox.paths import profile_dirs

    return profile_dirs()


def resolve_profile(name_or_path: str) -> Path:
    """A profile name ("default") or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or "/" in name_or_path:
        if not p.is_file():
            raise PolicyError([(name_or_path, "-", "no such profile file")])
        return p.resolve()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name_or_path):
        raise PolicyError([(name_or_path, "-", "not a profile name or path")])
    for d in profile_search_path():
        cand = d / f"{name_or_path}.yaml"
        if cand.is_file():
            return cand.resolve()
    names = sorted({f.stem for d in profile_search_path() if d.is_dir() for f in d.glob("*.yaml")})
    searched = os.pathsep.join(str(d) for d in profile_search_path())
    raise PolicyError([(name_or_path, "-", f"no such profile; known: {', '.join(names) or 'none'} (searched {searched})")])


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise PolicyError([(str(path), "-", f"not valid YAML: {e}")]) from None
    except OSError as e:
        raise PolicyError([(str(path), "-", f"cannot read: {e.strerror}")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError([(str(path), "-", "a profile must be a YAML mapping")])
    return data


def _merge(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    out = dict(parent)
    for k, v in child.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _load_raw(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    if path in chain:
        raise PolicyError([(str(path), "extends", "circular extends: " + " -> ".join(str(c) for c in chain + (path,)))])
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise PolicyError([(str(path), "extends", "must be a profile name or path")])
    sibling = path.parent / f"{parent}.yaml"
    if "/" in parent and not os.path.isabs(parent):
        parent = str(path.parent / parent)
    elif "/" not in parent and sibling.is_file() and sibling != path:
        parent = str(sibling)  # a bare name means a profile beside this one first
    try:
        parent_path = resolve_profile(parent)
    except PolicyError as e:
        raise PolicyError([(str(path), "extends", r) for _, _, r in e.problems]) from None
    base = _load_raw(parent_path, chain + (path,))
    base.pop("name", None)
    base.pop("description", None)
    return _merge(base, data)


def load_policy(name_or_path: str) -> Policy:
    """Load, merge (``extends``) and validate a profile into a :class:`Policy`."""
    path = resolve_profile(name_or_path)
    data = _load_raw(path, ())
    data.setdefault("name", path.stem)
    return policy_from_dict(data, source=str(path))


def policy_from_dict(data: dict[str, Any], source: str = "<dict>") -> Policy:
    try:
        policy = Policy.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(x) for x in err["loc"]) or "-"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            msg = msg.removeprefix("Value error, ")
            problems.append((source, key, msg))
        raise PolicyError(problems) from None
    from sandbox.seccomp import compile_filter  # here: seccomp imports this module

    try:
        compile_filter(policy.seccomp)  # syscall names are checked against libseccomp at load
    except PolicyError as e:
        raise PolicyError([(f if k == "allow" else source, k, r) for f, k, r in e.problems]) from None
    return policy
