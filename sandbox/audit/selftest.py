"""Startup self-test: a few of the audit's canaries in a real sandbox, failing closed.

Before a worker serves work (and in `sandbox doctor`) it proves, on this host,
with this policy, that the sandbox still holds: non-root, no capabilities,
no_new_privs, seccomp refusing mount/unshare/ptrace, a read-only root and no
network. A host change (an engine upgrade, runsc registered without
--oci-seccomp, a rebuilt image) that silently weakens any of them stops the
worker with the check's name instead of running untrusted code under it.

    from sandbox.audit.selftest import require_canaries, SelfTestFailed
    require_canaries(runtime, policy)        # raises SelfTestFailed; returns the rows when all pass
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from sandbox.audit import checks as chk
from sandbox.audit.catalog import result
from sandbox.audit.model import CheckResult
from sandbox.audit.runner import parse_probe_output, probe_argv, probe_config
from sandbox.audit.syscalls import sample_table

CANARY_PROBES = ("identity", "caps", "nnp", "seccomp", "syscalls", "rootfs", "network")
CANARY_SYSCALLS = ("mount", "unshare", "ptrace", "setns", "bpf", "keyctl")
CANARY_IDS = ("inside.user", "inside.caps", "inside.no_new_privs", "inside.seccomp_mode", "inside.seccomp_blocked",
              "inside.rootfs_read_only", "inside.no_route", "inside.metadata")
CANARY_TIMEOUT_S = 60.0


class SelfTestFailed(RuntimeError):
    """A canary saw an attack succeed (or the self-test could not run): do not serve work."""

    def __init__(self, message: str, failures: list[CheckResult] | None = None):
        super().__init__(message)
        self.failures = failures or []

    @property
    def check_ids(self) -> list[str]:
        return [f.id for f in self.failures]


def run_canaries(runtime: Any, policy: Any, *, timeout: float = CANARY_TIMEOUT_S) -> list[CheckResult]:
    """Run the canaries in a fresh sandbox of ``policy``; one row per canary (pass or fail).

    Raises what ``runtime.create`` raises when no sandbox can be started."""
    sb = runtime.create(policy, session_id=f"selftest_{uuid.uuid4().hex[:10]}")
    try:
        cfg = probe_config(CANARY_PROBES)
        cfg["syscalls"] = sample_table(list(CANARY_SYSCALLS))
        res = sb.exec(probe_argv(cfg), timeout=timeout)
    finally:
        sb.destroy()
    probe = parse_probe_output(res.stdout)
    if probe is None:
        why = f"no probe output (exit {res.exit_code}{', ' + res.error[:120] if res.error else ''})"
        return [result(i, "fail", why) for i in CANARY_IDS]
    rows = chk.evaluate_inside(probe, chk.Expectations.from_policy(policy), only=CANARY_IDS)
    # Fail closed: a canary that could not run is not a canary that passed.
    return [result(r.id, "fail", r.observed) if r.status == "skip" else r for r in rows]


def require_canaries(runtime: Any, policy: Any, *, timeout: float = CANARY_TIMEOUT_S) -> list[CheckResult]:
    """Raise :class:`SelfTestFailed` naming every failing canary; return the rows when all pass."""
    return require_rows(lambda: run_canaries(runtime, policy, timeout=timeout), policy)


def require_rows(run: Callable[[], list[CheckResult]], policy: Any, where: str = "") -> list[CheckResult]:
    """The rows ``run()`` returns when every canary passed; else :class:`SelfTestFailed` naming each
    failure (a self-test that could not run did not pass). ``where``: e.g. " in a cluster sandbox"."""
    try:
        rows = run()
    except Exception as e:  # noqa: BLE001 - any failure to run the self-test refuses service
        raise SelfTestFailed(f"sandbox self-test could not run{where} under policy {policy.name!r}: "
                             f"{type(e).__name__}: {str(e)[:300]}") from None
    bad = [r for r in rows if r.status not in ("pass", "info")]
    if bad:
        detail = "; ".join(f"{r.id} ({r.title}): {r.observed[:160]}" for r in bad)
        raise SelfTestFailed(f"sandbox self-test failed under policy {policy.name!r}: {detail}", bad)
    return rows
