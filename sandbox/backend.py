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
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from sandbox.policy import Policy

BACKEND_ENV = "SANDBOX_BACKEND"


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
class Backend(Protocol):
    name: str

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


def open_backend(name: str | None = None, **kw: Any) -> Backend:
    """``docker`` (default) or ``kubernetes``; ``name`` None reads ``$SANDBOX_BACKEND``."""
    name = name or os.environ.get(BACKEND_ENV) or "docker"
    if name == "docker":
        return DockerBackend(**kw)
    if name in ("kubernetes", "k8s"):
        from sandbox.kube.backend import KubeBackend

        return KubeBackend(**kw)
    raise ValueError(f"unknown backend {name!r}: docker or kubernetes")
