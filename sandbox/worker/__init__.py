"""The environment worker: claims work from a control plane with the official
`anthropic` SDK and runs each session's tool calls in that session's sandbox.

Modules: `credentials` (environment key only, org keys refused), `outbox`
(durable record of every call), `pool` (session sandboxes and the warm pool),
`admission` (host headroom), `metrics` (Prometheus and health), `middleware`
(what we add to the SDK's requests), `toolctx` (which tool call is running),
`tools` (sandbox-backed tools with the reference schemas), `worker` (the
loop), `runner` (run one in a background thread), `cli` and `demo`;
`store` (each session's workspace for its whole life, shared by the workers
using the store), `checkpoints` (a workspace checkpoint when a run goes idle,
restorable byte for byte).

Inside a session's sandbox: `/workspace` is the session's workspace (kept
across runs, size-capped), `/mnt/skills/<name>/` its agent's skills
(read-only; the SDK extracts them into a size- and inode-capped tmpfs; on Kubernetes the worker
copies them into the pod, read-only by mode only).
"""

from __future__ import annotations

from .credentials import CredentialError, EnvironmentKey, load_environment_key
from .worker import Worker, WorkerConfig, WorkerError

__all__ = ["CredentialError", "EnvironmentKey", "Worker", "WorkerConfig", "WorkerError", "load_environment_key"]
