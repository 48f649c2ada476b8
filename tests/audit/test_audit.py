"""The audit end to end: it passes on every shipped profile, fails row by row on a
deliberately weak container, and the startup self-test fails closed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from sandbox.audit.catalog import INSIDE_IDS
from sandbox.audit.egress import EGRESS_IDS
from sandbox.audit.runner import audit_container, audit_policy
from sandbox.audit.selftest import (
    CANARY_IDS,
    SelfTestFailed,
    require_canaries,
    run_canaries,
)
from sandbox.audit.shell_probe import SH_UNAVAILABLE
from sandbox.policy import PROFILES_DIR, load_policy, policy_from_dict
from tests.audit.weak import load_fixture, weak_container

pytestmark = [pytest.mark.docker, pytest.mark.timeout(240)]

PROFILES = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


@pytest.fixture(scope="module")
def weak(docker_client, tmp_path_factory: pytest.TempPathFactory):
    with weak_container(tmp_path_factory.mktemp("weak")) as cid:
        yield cid


@pytest.mark.parametrize("profile", PROFILES)
def test_audit_passes_on_every_shipped_profile(runtime, docker_client, profile: str) -> None:
    policy = load_policy(profile)
    if policy.runtime == "runsc" and "runsc" not in (docker_client.info().get("Runtimes") or {}):
        pytest.fail("runsc is not registered with the engine (./run setup registers it)")
    report = audit_policy(policy, runtime)
    failed = {c.id: c.observed for c in report.failures}
    assert report.ok, failed
    rows = report.by_id()
    assert set(INSIDE_IDS) <= set(rows), "every inside check reported"
    assert not [c.id for c in report.checks if c.status == "skip"], "nothing left unchecked on a shipped profile"
    assert report.header["policy_hash"] == policy.digest() and report.header["image_id"].startswith("sha256:")
    assert report.header["runtime"] == policy.runtime and report.header["kernel"]
    assert report.header["runtime_version"].startswith(policy.runtime) and report.header["package_version"]
    # Issue 8's guarantees, attacked from inside this very sandbox (needs the agent as a non-dumpable PID 1)
    # and checked from outside (its uid against every other live container and a second sandbox of the policy).
    for i in ("inside.agent_channel", "inside.agent_memory", "inside.agent_signals", "inside.host_facts",
              "outside.uid_unique"):
        if policy.runtime == "runsc" and i.startswith("inside.agent"):
            # gVisor's /proc checks only the uid and it delivers same-uid signals to PID 1 (SECURITY.md):
            # reachable, but a forged result is refused and only the sandbox's own session can end.
            assert rows[i].status in ("pass", "warn") and (rows[i].status == "pass" or "gVisor" in rows[i].observed)
            continue
        assert rows[i].status == "pass", (i, rows[i].observed)
    forged = rows["inside.agent_channel"].observed
    assert "forged result frames" in forged and ("real exit 7" in forged or "authentication" in forged), forged
    assert rows["outside.declared_weakenings"].status == "pass", "shipped profiles declare no weakening"
    assert rows["outside.exec_seccomp"].status == ("info" if policy.runtime == "runsc" else "pass")
    if policy.runtime == "runsc":
        # Honest gVisor differences: cgroupfs is hidden inside (checked host-side instead), and
        # the fork test may end the sandbox through a host cgroup limit rather than fail a fork.
        assert {rows[i].status for i in ("inside.limit_pids", "inside.limit_memory", "inside.limit_cpu")} == {"info"}
        assert rows["outside.host_cgroup"].status == "pass"
        assert rows["inside.fork_bounded"].status in ("pass", "warn")
    else:
        assert rows["inside.fork_bounded"].status == "pass", rows["inside.fork_bounded"]
        judged = [i for i in INSIDE_IDS if i not in EGRESS_IDS]
        assert all(rows[i].status == "pass" for i in judged), {i: rows[i].observed for i in judged
                                                               if rows[i].status != "pass"}
    egress_rows = {i: rows[i].status for i in EGRESS_IDS}
    if policy.egress.enabled:  # the proxy's socket dir is mounted, and still no route and no engine socket
        assert rows["inside.no_route"].status == rows["inside.engine_socket"].status == "pass"
        # No credential configured; the bundle is the host's roots only; PyPI is not probed live
        # (the proxy would connect to it before reading the ClientHello): pinned by configuration.
        assert egress_rows == {"inside.egress_secrets": "info", "inside.egress_trust_store": "pass",
                               "inside.egress_sni": "info"}, {i: rows[i].observed for i in EGRESS_IDS}
        assert "not probed live" in rows["inside.egress_sni"].observed
    else:
        assert egress_rows == dict.fromkeys(EGRESS_IDS, "info"), {i: rows[i].observed for i in EGRESS_IDS}


def test_weak_container_fails_the_audit_row_by_row(docker_client, weak: str) -> None:
    report = audit_container(docker_client, weak, probe=True)
    rows = report.by_id()
    must_fail = load_fixture()["must_fail"]
    not_failed = {i: (rows[i].status, rows[i].observed) for i in must_fail if rows[i].status != "fail"}
    assert not_failed == {}
    assert not report.ok and report.header["probe"] == "python3"
    text = json.dumps(report.to_dict())
    assert "not-a-real-key" not in text and "sk-ant-fake" not in text, "secret values never reach the report"


def test_cli_exits_nonzero_on_the_weak_container_with_json_and_junit(weak: str, tmp_path: Path) -> None:
    from sandbox.cli import main

    junit = tmp_path / "audit.xml"
    res = CliRunner().invoke(main, ["audit", "--container", weak, "--probe", "--json", "-", "--junit", str(junit)])
    assert res.exit_code == 1, res.output[-2000:]
    data = json.loads(res.output)
    assert data["ok"] is False and data["counts"]["fail"] >= len(load_fixture()["must_fail"])
    assert "<failure" in junit.read_text()


def test_weak_container_sh_subset_says_what_could_not_run(docker_client, weak: str) -> None:
    report = audit_container(docker_client, weak, probe=True, force_shell=True)
    rows = report.by_id()
    for i in SH_UNAVAILABLE:
        assert rows[i].status == "skip" and "python3" in rows[i].observed, rows[i]
    for i in ("inside.user", "inside.caps", "inside.no_new_privs", "inside.seccomp_mode", "inside.rootfs_read_only",
              "inside.core_pattern", "inside.engine_socket", "inside.no_route", "inside.env_secrets", "inside.setid_files",
              "inside.agent_channel", "inside.agent_memory", "inside.host_facts"):
        assert rows[i].status == "fail", rows[i]
    assert report.notes and "could not run" in report.notes[0]


def test_without_probe_no_code_runs_in_the_container(docker_client, weak: str) -> None:
    before = docker_client.api.inspect_container(weak).get("ExecIDs") or []
    report = audit_container(docker_client, weak, probe=False)
    after = docker_client.api.inspect_container(weak).get("ExecIDs") or []
    assert after == before, "an audit without --probe must not exec anything"
    rows = report.by_id()
    assert all(rows[i].status == "skip" and "--probe" in rows[i].observed for i in INSIDE_IDS)
    assert rows["outside.capabilities"].status == "fail" and not report.ok


def test_a_managed_sandbox_is_audited_against_its_own_policy(docker_client, make_sandbox) -> None:
    sb = make_sandbox("default")
    report = audit_container(docker_client, sb.id, probe=True)
    assert report.header["policy"] == "default" and report.header["policy_hash"] == load_policy("default").digest()
    assert report.ok, {c.id: c.observed for c in report.failures}
    assert report.by_id()["outside.spec_matches_policy"].status == "pass"


def test_cli_profile_audit_writes_a_signed_report_json_and_junit_from_one_real_audit(tmp_path: Path) -> None:
    """The documents a security team signs, rendered from a real audit of a shipped profile."""
    from sandbox.audit.catalog import CIS_BENCHMARK
    from sandbox.audit.model import report_from_dict
    from sandbox.audit.report import to_markdown
    from sandbox.cli import main

    html, out, junit = tmp_path / "a.html", tmp_path / "a.json", tmp_path / "a.xml"
    res = CliRunner().invoke(main, ["audit", "--profile", "default", "--format", "html", "--output", str(html),
                                    "--json", str(out), "--junit", str(junit)])
    assert res.exit_code == 0, res.output[-3000:]
    assert "PASSED" in res.output and f"written to {html}" in res.output
    doc = json.loads(out.read_text())
    assert doc["ok"] is True and 'failures="0"' in junit.read_text()
    h = doc["header"]
    policy = load_policy("default")
    md = to_markdown(report_from_dict(doc))
    for text in (html.read_text(), md):
        for needle in (h["image"], h["image_id"], policy.digest(), "none declared", h["kernel"].split()[0],
                       h["runtime_version"], f"Docker {docker_version()}", h["package_version"],
                       CIS_BENCHMARK.split(" (")[0], doc["started_at"]):
            assert needle in text, needle
        for c in doc["checks"]:  # every check, with its evidence (escaped the same way in both)
            assert c["id"] in text
        assert "Signature" in text
    assert "<script" not in html.read_text().lower()


def docker_version() -> str:
    import docker

    return str(docker.from_env().version().get("Version"))


def test_container_audit_without_probe_says_configuration_only(weak: str) -> None:
    from sandbox.cli import main

    res = CliRunner().invoke(main, ["audit", "--container", weak, "--format", "md"])
    assert res.exit_code == 1, res.output[-2000:]  # its configuration alone fails
    assert "CONFIGURATION ONLY" in res.output and "configuration only" in res.output
    assert "PASSED" not in res.output


def test_weak_container_markdown_report_keeps_its_failures_and_escapes_them(weak: str, tmp_path: Path) -> None:
    from sandbox.cli import main

    md = tmp_path / "weak.md"
    res = CliRunner().invoke(main, ["audit", "--container", weak, "--probe", "-f", "md", "-o", str(md)])
    assert res.exit_code == 1, res.output[-2000:]
    text = md.read_text()
    assert "## Failures" in text
    for i in load_fixture()["must_fail"]:
        assert f"`{i}`" in text, i
    assert "not-a-real-key" not in text and "sk-ant-fake" not in text


def test_cli_audit_of_a_missing_container_is_an_error_not_a_pass() -> None:
    from sandbox.cli import main

    res = CliRunner().invoke(main, ["audit", "--container", "no-such-container-audit-test"])
    assert res.exit_code == 3 and "no such container" in res.output


@pytest.mark.parametrize("profile", ["default", "gvisor"])
def test_self_test_canaries_hold_on_shipped_profiles(runtime, profile: str) -> None:
    rows = require_canaries(runtime, load_policy(profile))
    assert [r.id for r in rows] == list(CANARY_IDS) and all(r.status == "pass" for r in rows)


def test_self_test_fails_closed_naming_the_check_when_seccomp_is_weakened(runtime) -> None:
    weak_policy = policy_from_dict({"name": "canary-weak", "seccomp": {"extra_allow": ["unshare", "setns", "ptrace"]},
                                    "unsafe": {f"seccomp.allow.{n}": "the self-test must catch this"
                                               for n in ("unshare", "setns", "ptrace")}})
    rows = {r.id: r for r in run_canaries(runtime, weak_policy)}
    assert rows["inside.seccomp_blocked"].status == "fail" and "unshare" in rows["inside.seccomp_blocked"].observed
    with pytest.raises(SelfTestFailed) as err:
        require_canaries(runtime, weak_policy)
    assert err.value.check_ids == ["inside.seccomp_blocked"]
    assert "inside.seccomp_blocked" in str(err.value) and "canary-weak" in str(err.value)


def test_self_test_fails_closed_when_no_sandbox_starts() -> None:
    class Broken:
        def create(self, *a: object, **k: object) -> None:
            raise RuntimeError("engine gone")

    with pytest.raises(SelfTestFailed, match="could not run.*engine gone"):
        require_canaries(Broken(), load_policy("default"))


def test_gvisor_container_audit_says_docker_exec_runs_without_the_seccomp_filter(docker_client, make_sandbox) -> None:
    """The row's statement, shown from inside: the probe enters by `docker exec` and finds no filter."""
    if "runsc" not in (docker_client.info().get("Runtimes") or {}):
        pytest.fail("runsc is not registered with the engine (./run setup registers it)")
    sb = make_sandbox("gvisor")
    report = audit_container(docker_client, sb.id, probe=True, fork_test=False)
    rows = report.by_id()
    assert rows["outside.exec_seccomp"].status == "warn"
    assert "without the OCI seccomp filter" in rows["outside.exec_seccomp"].observed
    assert rows["inside.seccomp_mode"].status == "fail", rows["inside.seccomp_mode"].observed  # Seccomp: 0
    assert rows["inside.agent_signals"].status == "skip", "never signal a sandbox the audit did not start"
    res = sb.exec(["sh", "-c", "grep Seccomp: /proc/self/status"])  # through the agent: filtered
    assert b"Seccomp:\t2" in res.stdout
