"""The backend seam: where sandboxes come from, so the worker, the tools, the audit and the trail
do not know whether a session runs in a local container or in a cluster pod.

A backend prepares a policy (checks that what enforces it is in place), creates a sandbox for a
session and runs the agent channel to it (the hello line with a fresh per-sandbox key first,
then HMAC-authenticated frames both ways, :mod:`sandbox.channel`), destroys it, lists and reaps
what it made, reports (and, where it has one, sets) its warm-pool size, and checks its host or
cluster (doctor). Both backends hand back a :class:`sandbox.runtime.Sandbox`: the same
``exec``/``call``/``destroy`` over the same channel code, so nothing above this seam changes.

- :class:`DockerBackend`: the existing :class:`sandbox.runtime.Runtime`, unchanged.
- :class:`sandbox.kube.backend.KubeBackend`: agent-sandbox claims from a warm pool, the agent
  carried over the pod exec stream (``backend: kubernetes``).

:func:`open_backend` picks one by name (``SANDBOX_BACKEND`` or the caller's setting).

The contract between a :class:`sandbox.runtime.Sandbox` and whoever made it is
:class:`SandboxOwner`: a sandbox reports what happened to it (``log_event``) and hands its end
to its maker (``_teardown``). ``Runtime`` and ``KubeBackend`` both implement it; a new backend
must too, or its sandboxes cannot report a violation or be destroyed.

A backend also says whether its sandboxes can mount host paths (``mounts_host_paths``): the
worker's session store keeps mounted workspaces for Docker, and archives the sandbox writes
itself for a cluster (``sandbox/worker/store.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from sandbox.policy import Policy

if TYPE_CHECKING:
    from sandbox.runtime import Sandbox

BACKEND_ENV = "SANDBOX_BACKEND"
BACKENDS = ("docker", "kubernetes")


@dataclass(frozen=True)
class SandboxInfo:
    """One sandbox a backend manages, as list() reports it."""

    id: str
    session: str
    policy: str
    state: str
    owner: str = ""
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Prepared:
    """What prepare() found: the policy digest the backend will enforce and where."""

    backend: str
    policy: str
    digest: str
    detail: str = ""


@runtime_checkable
class SandboxOwner(Protocol):
    """What a :class:`sandbox.runtime.Sandbox` calls on the object it was made by (its ``runtime``).

    - ``log_event(what, sb)``: something happened to the sandbox that an operator must see (the
      session limit reached, a host-side timeout, a frame that failed authentication). Called from
      the sandbox's own threads; must not raise and must not block for long.
    - ``_teardown(sb, wait=True)``: called exactly once, by ``Sandbox.destroy()``, after the sandbox
      marked itself destroyed: close the channel, end whatever runs it (container, claim), and
      release what it held (uid lease, workspace, egress registration). ``wait=False``: the caller
      is a process about to exit; the owner may send the end without waiting for the answer where
      that loses nothing. Must not raise for a sandbox that is already gone."""

    def log_event(self, what: str, sb: "Sandbox") -> None: ...

    def _teardown(self, sb: "Sandbox", wait: bool = True) -> None: ...


@runtime_checkable
class Backend(Protocol):
    name: str
    mounts_host_paths: bool  # can create() take a host workspace and ro_mounts

    def prepare(self, policy: Policy) -> Prepared:
        """Check that this backend can enforce ``policy`` as it stands (image built; on a cluster:
        the compiled template applied with the same digest, every degradation accepted).
        Raises :class:`sandbox.runtime.SandboxError` naming what is missing."""
        ...

    def create(self, policy: Policy, session_id: str | None = None, **kw: Any) -> Any:
        """A ready sandbox for one session (a :class:`sandbox.runtime.Sandbox`): the agent
        channel is open, the hello sent, the agent's ``ready`` authenticated."""
        ...

    def destroy(self, sandbox: Any) -> None: ...

    def list(self) -> list[SandboxInfo]: ...

    def reap(self) -> list[str]:
        """Remove sandboxes whose owner is gone; returns their ids."""
        ...

    def warm_pool_size(self, policy: Policy, size: int | None = None) -> int:
        """The number of ready sandboxes kept for ``policy``; with ``size``, set it first."""
        ...

    def doctor(self) -> list[Any]:
        """Checks (:class:`sandbox.doctor.Check`) of what this backend relies on."""
        ...


class DockerBackend:
    """The local Docker engine through :class:`sandbox.runtime.Runtime` (no change to it)."""

    name = "docker"
    mounts_host_paths = True

    def __init__(self, runtime: Any = None, **runtime_kw: Any) -> None:
        if runtime is None:
            from sandbox.runtime import Runtime

            runtime = Runtime(**runtime_kw)
        self.runtime = runtime
        self._pool_sizes: dict[str, int] = {}

    def prepare(self, policy: Policy) -> Prepared:
        from sandbox import spec as specmod
        from sandbox.runtime import SandboxError

        # compiles the exact create body (a bad policy fails here, before any session)
        specmod.compile_spec(policy, "prepare", specmod.Binds(egress_dir="/nonexistent" if policy.egress.enabled else None,
                                                              workspace_dir="/nonexistent" if policy.workspace.backing == "disk" else None))
        try:
            from sandbox import images

            present = images.image_present(self.runtime.client, policy.image)
        except Exception as e:  # noqa: BLE001 - no engine: say so
            raise SandboxError(f"cannot reach the Docker engine: {e}") from None
        if not present:
            raise SandboxError(f"image {policy.image} is not built; run `sandbox images build`")
        return Prepared(self.name, policy.name, policy.digest(), f"image {policy.image}")

    def create(self, policy: Policy, session_id: str | None = None, **kw: Any) -> Any:
        return self.runtime.create(policy, session_id=session_id, **kw)

    def destroy(self, sandbox: Any) -> None:
        sandbox.destroy()

    def list(self) -> list[SandboxInfo]:
        from sandbox import spec as specmod

        out = []
        for c in self.runtime.list_managed():
            lab = c.get("Labels") or {}
            out.append(SandboxInfo(id=c["Id"][:12], session=lab.get(specmod.LABEL_SESSION, ""),
                                   policy=lab.get(specmod.LABEL_POLICY, ""), state=c.get("State", ""),
                                   owner=lab.get(specmod.LABEL_OWNER, "")))
        return out

    def reap(self) -> list[str]:
        return self.runtime.gc()

    def warm_pool_size(self, policy: Policy, size: int | None = None) -> int:
        # On one host the worker's own pool (sandbox.worker.pool.WarmPool) keeps ready sandboxes;
        # this records the size it should keep.
        if size is not None:
            if size < 0:
                raise ValueError("warm pool size must be >= 0")
            self._pool_sizes[policy.name] = size
        return self._pool_sizes.get(policy.name, 0)

    def doctor(self) -> list[Any]:
        from sandbox.doctor import run_checks

        return run_checks(canaries=False)


def backend_name(name: str | None = None) -> str:
    """The backend setting, normalised: ``name``, else ``$SANDBOX_BACKEND``, else ``docker``."""
    raw = name or os.environ.get(BACKEND_ENV) or "docker"
    norm = {"k8s": "kubernetes"}.get(raw.strip().lower(), raw.strip().lower())
    if norm not in BACKENDS:
        src = f"${BACKEND_ENV}" if not name else "backend"
        raise ValueError(f"unknown backend {raw!r} ({src}): docker or kubernetes")
    return norm


def open_backend(name: str | None = None, **kw: Any) -> Backend:
    """``docker`` (default) or ``kubernetes``; ``name`` None reads ``$SANDBOX_BACKEND``."""
    name = backend_name(name)
    if name == "docker":
        return DockerBackend(**kw)
    from sandbox.kube.backend import KubeBackend

    return KubeBackend(**kw)
