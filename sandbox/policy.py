"""The policy model: one validated object that fully describes a sandbox.

Profiles are YAML files under ``profiles/`` (or any path). A profile may
``extends:`` another; the child is deep-merged over its parent before
validation, so every policy that reaches the compiler is complete and strict:
unknown keys and keys given twice are errors, uid 0 is an error, dangerous host
paths are errors, and anything weaker than the shipped baseline (see
:func:`find_weakenings`) is an error unless the profile accepts it in writing
under ``unsafe:``. Errors name the file (of the ``extends`` chain) that set the
key, the key and the reason (:class:`PolicyError`). :meth:`Policy.digest` covers
every setting and the resolved seccomp filter.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from sandbox import seccomp as _seccomp
from sandbox.egress.rules import EgressPolicy
from sandbox.policy_base import PROFILES_DIR, PolicyError, Seccomp, Weakening, _Strict, read_yaml

__all__ = ["PROFILES_DIR", "Policy", "PolicyError", "Seccomp", "Weakening", "check_host_path", "find_weakenings",
           "load_policy", "policy_from_dict", "profile_search_path", "resolve_profile"]

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
_UNSAFE_ID = re.compile(r"^[a-z_]+(\.[A-Za-z0-9_:/.-]+)+$")
_MIN_REASON = 8
_DEFER_UNSAFE = "sandbox.defer_unsafe_check"
_ORIGINS_ATTR = "_sandbox_origins"  # kept out of the model: not a setting, not in the digest
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



class User(_Strict):
    """The sandbox's identity. ``auto`` (the default): the runtime allocates a uid/gid pair that no
    other live sandbox on the host holds (see :mod:`sandbox.identity`). A pinned number is granted
    only while no other live sandbox holds it, so per-uid kernel limits stay per sandbox."""

    uid: int | Literal["auto"] = "auto"
    gid: int | Literal["auto"] = "auto"

    @field_validator("uid", "gid", mode="before")
    @classmethod
    def _not_root(cls, v: Any) -> Any:
        if v == 0:
            raise ValueError("must not be 0: sandboxes never run as root")
        if isinstance(v, bool) or (isinstance(v, int) and not 1 <= v <= 2**31 - 2):
            raise ValueError("must be 'auto' or an integer from 1 to 2147483646")
        return v

    @model_validator(mode="after")
    def _both_or_neither(self) -> "User":
        if (self.uid == "auto") != (self.gid == "auto"):
            raise ValueError("uid and gid must both be 'auto' or both be numbers")
        return self


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
    # Weakenings from the shipped baseline this profile accepts, each with a written reason:
    # {"seccomp.allow.ptrace": "debugger sessions"}. A profile that extends another can
    # withdraw an inherited entry with null. See find_weakenings() for the ids.
    unsafe: dict[str, str] = {}

    @field_validator("unsafe", mode="before")
    @classmethod
    def _unsafe_reasons(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v  # the type check reports it
        out = {}
        for wid, reason in v.items():
            if reason is None:
                continue  # withdrawn by an extending profile
            if not isinstance(wid, str) or not _UNSAFE_ID.match(wid):
                raise ValueError(f"{wid!r} is not a weakening id (like seccomp.allow.ptrace)")
            if not isinstance(reason, str) or len(reason.strip()) < _MIN_REASON:
                raise ValueError(f"{wid}: needs a written reason (at least {_MIN_REASON} characters)")
            out[wid] = reason.strip()
        return out

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

    @model_validator(mode="after")
    def _weakenings_declared(self, info: ValidationInfo) -> "Policy":
        if (info.context or {}).get(_DEFER_UNSAFE):
            return self  # policy_from_dict checks it itself, naming files
        problems = _unsafe_problems(self, {}, "policy")
        if problems:
            raise ValueError("; ".join(f"{k}: {r}" for _, k, r in problems))
        return self

    def seccomp_filter(self) -> "_seccomp.CompiledFilter":
        """The filter this policy loads into its sandboxes (allowlist resolved, runtime adjusted)."""
        return _seccomp.for_runtime(_seccomp.compile_filter(self.seccomp), self.runtime)

    def digest(self) -> str:
        """One hash over everything this policy enforces: every setting, the image reference and
        runtime, and the resolved seccomp filter itself (default action, allowed, argument-checked
        and errno calls), so editing an allowlist file changes it. Labels, audit reports and
        trails carry it."""
        doc = {"policy": self.model_dump(mode="json"), "seccomp_filter": self.seccomp_filter().canonical()}
        blob = json.dumps(doc, sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()

    def weakenings(self) -> list[Weakening]:
        """The weakenings from the shipped baseline this policy makes, each with its declared
        reason (a policy that loaded declares all of them)."""
        return [dataclasses.replace(w, reason=self.unsafe.get(w.id, "")) for w in find_weakenings(self)]

    def origin(self, key: str) -> str | None:
        """The profile file (of the ``extends`` chain) that set ``key`` ("limits.pids"), or None
        for a built-in default or a policy not loaded from files."""
        origins: dict[str, str] = self.__dict__.get(_ORIGINS_ATTR) or {}
        return _lookup_origin(origins, key)


# ---------------------------------------------------------------- weakenings

def find_weakenings(p: Policy) -> list[Weakening]:
    """Every way ``p`` is weaker than the shipped baseline, declared or not (reasons empty).

    The baseline: the shipped seccomp allowlist and its argument checks, default action errno
    (or kill_process), no dangerous syscall in any form (:mod:`sandbox.seccomp` has the
    details), and the egress proxy refusing every non-public address. Ids:
    ``seccomp.allow.<syscall>``, ``seccomp.default_action.<action>``, ``egress.allow_cidrs.<cidr>``,
    and per egress rule ``egress.sni_off.<host>``, ``egress.sni_missing.<host>``,
    ``egress.allow_ech.<host>``, ``egress.upstream_ca.<host>``.
    """
    out = list(_seccomp.weakenings(p.seccomp))
    for c in p.egress.allow_cidrs:
        out.append(Weakening(f"egress.allow_cidrs.{c}",
                             f"non-public addresses in {c} (private, loopback, link-local, cloud metadata) "
                             "reachable through the proxy, IP literals in it on any port",
                             "policy", "egress.allow_cidrs"))
    for i, r in enumerate(p.egress.rules):
        key = f"egress.rules.{i}"
        if r.sni == "off":
            out.append(Weakening(f"egress.sni_off.{r.host}", f"tunnels to {r.host} carry any TLS server name or "
                                 "none (domain fronting through it)", "policy", f"{key}.sni"))
        elif r.sni == "allow-missing":
            out.append(Weakening(f"egress.sni_missing.{r.host}", f"tunnels to {r.host} may omit the TLS server name",
                                 "policy", f"{key}.sni"))
        if r.allow_ech:
            out.append(Weakening(f"egress.allow_ech.{r.host}", f"tunnels to {r.host} may hide their server name "
                                 "(Encrypted ClientHello)", "policy", f"{key}.allow_ech"))
        if r.upstream_ca is not None:
            out.append(Weakening(f"egress.upstream_ca.{r.host}", f"the proxy trusts {r.upstream_ca} besides the "
                                 f"host's trust store for {r.host}, and sends it the credential", "policy",
                                 f"{key}.upstream_ca"))
    return out


def _unsafe_problems(p: Policy, origins: dict[str, str], source: str) -> list[tuple[str, str, str]]:
    """Undeclared weakenings and declarations of weakenings the policy does not make."""
    problems: list[tuple[str, str, str]] = []
    found = find_weakenings(p)
    for w in found:
        if w.id in p.unsafe:
            continue
        reason = (f"allows {w.allows}: weaker than the shipped baseline; remove it, or accept it in writing "
                  f"with unsafe: {{{w.id}: <reason>}}")
        if w.file == "policy":
            file = _lookup_origin(origins, w.key) or source
            problems.append((file, w.key, reason + (f" (loading {source})" if file != source else "")))
        else:  # the allowlist file itself allows it
            problems.append((w.file, w.key, f"{reason} in the profile using this allowlist ({source})"))
    ids = {w.id for w in found}
    for wid in p.unsafe:
        if wid not in ids:
            problems.append((_lookup_origin(origins, f"unsafe.{wid}") or source, f"unsafe.{wid}",
                             "declares a weakening this policy does not make; remove it "
                             "(a profile that extends this one withdraws it with null)"))
    return problems


def _lookup_origin(origins: dict[str, str], key: str) -> str | None:
    k = key
    while k:
        for cand in (k, k + "."):
            if cand in origins:
                return origins[cand]
        k = k.rpartition(".")[0]
    return None


# ---------------------------------------------------------------- loading

def profile_search_path() -> list[Path]:
    """Where a profile name is looked up, first match wins: ``$SANDBOX_PROFILES``, ``./profiles``,
    ``$XDG_CONFIG_HOME/sandbox/profiles``, ``/etc/sandbox/profiles``, the shipped profiles
    (:func:`sandbox.paths.profile_dirs`)."""
    from sandbox.paths import profile_dirs

    return profile_dirs()


def resolve_profile(name_or_path: str, after: Path | None = None) -> Path:
    """A profile name ("default") or a path to a YAML file.

    ``after``: a profile file; only matches later on the search path count (a user's
    ``default.yaml`` that says ``extends: default`` means the next ``default`` down the path)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or "/" in name_or_path:
        if not p.is_file():
            raise PolicyError([(name_or_path, "-", "no such profile file")])
        return p.resolve()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name_or_path):
        raise PolicyError([(name_or_path, "-", "not a profile name or path")])
    found = [c.resolve() for d in profile_search_path() if (c := d / f"{name_or_path}.yaml").is_file()]
    if after is not None and after.resolve() in found:
        found = found[found.index(after.resolve()) + 1:]
    if found:
        return found[0]
    names = sorted({f.stem for d in profile_search_path() if d.is_dir() for f in d.glob("*.yaml")})
    searched = os.pathsep.join(str(d) for d in profile_search_path())
    raise PolicyError([(name_or_path, "-", f"no such profile; known: {', '.join(names) or 'none'} (searched {searched})")])


def _read_yaml(path: Path) -> dict[str, Any]:
    data = read_yaml(path)  # strict: a key given twice is an error naming both lines
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


def _origins_of(data: dict[str, Any], file: str, prefix: str = "") -> dict[str, str]:
    """Dotted key -> file for every value ``data`` sets, down to the leaves; a mapping is also
    recorded as ``key.`` (the last file that wrote into it)."""
    out: dict[str, str] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out[key + "."] = file
            out.update(_origins_of(v, file, key + "."))
        else:
            out[key] = file
    return out


def _merge_origins(parent: dict[str, str], child: dict[str, str]) -> dict[str, str]:
    # a child leaf replaces everything the parent set below it (a mapping replaced by a list, say)
    # and a child mapping replaces a parent's leaf of the same key (an empty mapping, say)
    leaves = [c for c in child if not c.endswith(".")]
    maps = {c[:-1] for c in child if c.endswith(".")}
    out = {k: f for k, f in parent.items() if k not in maps and not any(k.startswith(c + ".") for c in leaves)}
    out.update(child)
    return out


def _load_raw(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    return _load_raw_with_origins(path, chain)[0]


def _load_raw_with_origins(path: Path, chain: tuple[Path, ...]) -> tuple[dict[str, Any], dict[str, str]]:
    """The merged profile and, for each dotted key, the file of the ``extends`` chain that set it."""
    if path in chain:
        raise PolicyError([(str(path), "extends", "circular extends: " + " -> ".join(str(c) for c in chain + (path,)))])
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    origins = _origins_of(data, str(path))
    if parent is None:
        return data, origins
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
    base, base_origins = _load_raw_with_origins(parent_path, chain + (path,))
    for k in ("name", "description"):
        base.pop(k, None)
        base_origins.pop(k, None)
    return _merge(base, data), _merge_origins(base_origins, origins)


def load_policy(name_or_path: str) -> Policy:
    """Load, merge (``extends``) and validate a profile into a :class:`Policy`."""
    path = resolve_profile(name_or_path)
    data, origins = _load_raw_with_origins(path, ())
    data.setdefault("name", path.stem)
    return policy_from_dict(data, source=str(path), origins=origins)


def policy_from_dict(data: dict[str, Any], source: str = "<dict>", origins: dict[str, str] | None = None) -> Policy:
    """Validate a merged profile. ``origins`` (dotted key -> file) lets errors name the file of the
    ``extends`` chain that set the key; without it they name ``source``."""
    origins = origins or {}

    def where(key: str) -> str:
        return _lookup_origin(origins, key) or source

    try:
        policy = Policy.model_validate(data, context={_DEFER_UNSAFE: True})
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(x) for x in err["loc"]) or "-"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            msg = msg.removeprefix("Value error, ")
            problems.append((where(key), key, msg))
        raise PolicyError(problems) from None
    try:
        _seccomp.compile_filter(policy.seccomp)  # syscall names are checked against libseccomp at load
    except PolicyError as e:
        raise PolicyError([(f if f != "policy" else where(k), k, r) for f, k, r in e.problems]) from None
    problems = _unsafe_problems(policy, origins, source)
    if problems:
        raise PolicyError(problems)
    object.__setattr__(policy, _ORIGINS_ATTR, dict(origins))
    return policy
