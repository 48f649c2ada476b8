"""`sandbox doctor` on this host: every row ok or warn (runc judged against the releases that
fixed its escapes, distribution backports included), and the attack canaries held."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

pytestmark = pytest.mark.docker


def test_doctor_passes_and_runs_the_canaries(docker_client) -> None:
    from sandbox.doctor import run_checks

    checks = {c.name: c for c in run_checks()}
    assert all(c.status in ("ok", "warn") for c in checks.values()), [c for c in checks.values() if c.status == "fail"]
    assert checks["self-test"].status == "ok"
    assert "oci-seccomp" in checks["gvisor"].detail
    for name in ("package", "state dir", "orphans", "runc", "engine"):
        assert name in checks, name


def test_doctor_names_the_engines_runc_and_the_fixes_it_carries(docker_client) -> None:
    from pathlib import Path

    from sandbox.doctor import RUNC_FIXES, parse_runc_version, runc_check, upstream_fixed

    info = docker_client.info()
    reported = (info.get("RuncCommit") or {}).get("ID")
    row = runc_check(info)
    assert reported and f"runc {reported}" in row.detail
    v = parse_runc_version(reported)
    assert v is not None
    for cve, _, _ in RUNC_FIXES:
        assert cve in row.detail, cve
    changelog = Path("/usr/share/doc/runc/changelog.Debian.gz")
    if "deb" in reported and changelog.is_file() and not upstream_fixed("CVE-2024-21626", v):
        # Debian patches without changing the upstream number: the changelog is the evidence.
        import gzip

        if "CVE-2024-21626" in gzip.open(changelog, "rt").read():
            assert "CVE-2024-21626 (backported)" in row.detail and str(changelog) in row.detail
    missing = [c for c, _, _ in RUNC_FIXES if f"{c} (" in row.detail.split("MISSING fixes for", 1)[-1]
               and "MISSING" in row.detail]
    assert (row.status == "ok") == (not missing), row


def test_doctor_json_is_one_document_with_every_row(docker_client) -> None:
    from sandbox.cli import main

    res = CliRunner().invoke(main, ["doctor", "--json", "--no-canaries"])
    doc = json.loads(res.stdout)
    assert doc["ok"] is (res.exit_code == 0) and doc["version"]
    rows = doc["checks"]
    names = {r["name"] for r in rows}
    assert {"engine", "runc", "state dir", "orphans", "package"} <= names
    assert all(set(r) >= {"name", "status", "detail", "fix"} for r in rows)


def test_doctor_reports_a_sandbox_whose_owner_is_gone(docker_client) -> None:
    import socket
    import uuid

    from sandbox import spec as specmod
    from sandbox.doctor import orphan_check
    from sandbox.images import recipes

    session = f"doctor-orphan-{uuid.uuid4().hex[:8]}"
    labels = {specmod.LABEL_MANAGED: "true", specmod.LABEL_HOST: socket.gethostname(),
              specmod.LABEL_SESSION: session, specmod.LABEL_OWNER: "pytest:999999999:1"}  # no such process
    c = docker_client.containers.run(recipes()[0].image_tag(), ["sleep", "120"], labels=labels, detach=True,
                                     network_mode="none", user="65534:65534", read_only=True, cap_drop=["ALL"])
    try:
        row = orphan_check(docker_client)
        assert row.status == "warn" and session in row.detail and "sandbox gc" in row.fix
    finally:
        c.remove(force=True)
    assert session not in orphan_check(docker_client).detail


def test_doctor_names_the_runsc_platform_of_the_engines_registration(docker_client) -> None:
    """The platform is read from the registration the engine reports, not assumed (issue 11:
    the platform is chosen by measurement, and doctor says which one is in use)."""
    from sandbox.doctor import run_checks, runsc_platform

    def info(args: list[str]) -> dict:
        return {"Runtimes": {"runsc": {"path": "/usr/bin/runsc", "runtimeArgs": args}}}

    assert runsc_platform(info(["--platform=kvm", "--oci-seccomp"])) == "kvm"
    assert runsc_platform(info(["--oci-seccomp", "--platform", "systrap"])) == "systrap"
    assert runsc_platform(info(["--oci-seccomp"])) == "default"
    assert runsc_platform({"Runtimes": {"runc": {"path": "runc"}}}) == "default"
    live = runsc_platform(docker_client.info())
    assert live != "default"  # ./run registers an explicit platform
    row = {c.name: c for c in run_checks(canaries=False)}["gvisor"]
    assert f"platform {live}" in row.detail, row.detail
