"""`sandbox doctor` on this host: every row ok or warn, and the attack canaries held."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.docker


def test_doctor_passes_and_runs_the_canaries(docker_client) -> None:
    from sandbox.doctor import run_checks

    checks = {c.name: c for c in run_checks()}
    assert all(c.status in ("ok", "warn") for c in checks.values()), [c for c in checks.values() if c.status == "fail"]
    assert checks["self-test"].status == "ok"
    assert "oci-seccomp" in checks["gvisor"].detail
