"""Reports a security team signs, comparisons of audits and policies, the new rows' rules on
hostile probe data, exit codes, and the doctor's runc verdicts. No Docker: the end-to-end
versions (a real audit rendered to Markdown and HTML) are in test_audit.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from sandbox.audit.catalog import CIS_BENCHMARK, INSIDE_IDS, result
from sandbox.audit.checks import Expectations, evaluate_inside
from sandbox.audit.diff import diff_reports, load_report
from sandbox.audit.model import AuditReport
from sandbox.audit.report import md_escape, to_html, to_markdown
from sandbox.audit.runner import exec_seccomp_row, uid_row

FIX = Path(__file__).with_name("fixtures")
HOSTILE = '<script>alert("x")</script> | **bold** [link](http://evil) & `tick`\nline2'


def _cli():  # noqa: ANN202
    from sandbox.cli import main

    return main


def _report(observed: str = "ok") -> AuditReport:
    r = AuditReport(target="profile default", header={
        "policy": "default", "policy_hash": "sha256:" + "a" * 64, "weakenings": ["seccomp.allow.ptrace: trace (declared: x)"],
        "image": "sandbox-runtime:latest", "image_id": "sha256:" + "1" * 64, "image_digests": [], "runtime": "runc",
        "runtime_version": "runc 1.1.5+ds1-1+deb12u1", "kernel": "6.1.0", "engine": "Docker 20.10.24",
        "host": "h", "package_version": "0.1.0", "cis_benchmark": CIS_BENCHMARK})
    r.checks = [result("inside.user", "fail", observed), result("outside.privileged", "pass", "Privileged=False")]
    return r


# ---------------------------------------------------------------- documents

def test_html_report_escapes_evidence_from_inside_the_sandbox() -> None:
    doc = to_html(_report(HOSTILE))
    assert "<script>" not in doc and "&lt;script&gt;" in doc
    assert "<a " not in doc and "http-equiv=\"Content-Security-Policy\"" in doc
    assert "<script" not in doc.lower(), "no script of any kind: the report is a static document"


def test_markdown_report_neutralises_html_links_and_table_breaks() -> None:
    doc = to_markdown(_report(HOSTILE))
    row = next(line for line in doc.splitlines() if line.startswith("| `inside.user`"))
    assert "<script>" not in doc and "&lt;script&gt;" in row
    assert "\\|" in row and len(re.findall(r"(?<!\\)\|", row)) == 7, "an evidence pipe must not add a column"
    assert "[link]" not in row and "\\*\\*bold" in row
    assert "line2" in row, "newlines in evidence stay inside the row"
    assert md_escape("a|b") == "a\\|b"


@pytest.mark.parametrize("render", [to_markdown, to_html])
def test_report_documents_name_what_a_reviewer_signs_for(render) -> None:  # noqa: ANN001
    doc = render(_report())
    for needle in ("sandbox-runtime:latest", "sha256:" + "1" * 64, "sha256:" + "a" * 64, "seccomp.allow.ptrace",
                   "runc 1.1.5+ds1-1+deb12u1", "Docker 20.10.24", "6.1.0", "0.1.0", "CIS Docker Benchmark v1.2.0",
                   "profile default", "inside.user", "outside.privileged", "5.4", "Privileged=False", "FAIL",
                   "Report digest", "Signature"):
        assert needle in doc, needle
    assert _report().started_at[:10] in doc


def test_a_configuration_only_audit_never_reads_as_a_plain_pass() -> None:
    r = AuditReport(target="container x", scope="configuration")
    r.checks = [result("outside.privileged", "pass", "Privileged=False")]
    assert r.summary().startswith("PASSED (CONFIGURATION ONLY")
    assert "configuration only" in to_markdown(r) and "configuration only" in to_html(r)


# ---------------------------------------------------------------- audit diff

def test_audit_diff_names_what_got_worse() -> None:
    d = diff_reports(load_report(str(FIX / "audit_old.json")), load_report(str(FIX / "audit_new.json")))
    assert d.worse
    assert {c.id: (c.old, c.new, c.worse) for c in d.changed} == {
        "inside.seccomp_blocked": ("pass", "fail", True), "engine.userns_remap": ("warn", "info", False)}
    assert [(c.id, c.worse) for c in d.added] == [("inside.agent_channel", True)]
    assert [(c.id, c.worse) for c in d.removed] == [("inside.keyring", True)], "a check that held is gone"
    assert [c.id for c in d.evidence] == ["inside.user"]
    assert set(d.header) == {"policy_hash", "runtime_version"}


def test_audit_diff_cli_exit_codes_and_one_json_document(tmp_path: Path) -> None:
    old, new = str(FIX / "audit_old.json"), str(FIX / "audit_new.json")
    res = CliRunner().invoke(_cli(), ["audit", "diff", old, new, "--json"])
    assert res.exit_code == 1
    doc = json.loads(res.stdout)
    assert doc["worse"] is True and doc["header"]["policy_hash"]["new"] == "sha256:" + "b" * 64
    assert CliRunner().invoke(_cli(), ["audit", "diff", old, old]).exit_code == 0
    res = CliRunner().invoke(_cli(), ["audit", "diff", old, new])
    assert "WORSE inside.seccomp_blocked" in res.stdout and "verdict: WORSE" in res.stdout
    bad = tmp_path / "bad.json"
    bad.write_text('{"checks": [{"id": "x", "status": "maybe"}]}')
    res = CliRunner().invoke(_cli(), ["audit", "diff", old, str(bad), "--json"])
    assert res.exit_code == 3 and json.loads(res.stdout)["error"]["exit_code"] == 3
    assert "checks[0]" in res.stderr


# ---------------------------------------------------------------- policy diff

def test_policy_diff_lists_both_directions_on_fixtures() -> None:
    from sandbox.policy import load_policy
    from sandbox.policydiff import diff_policies

    a = load_policy(str(FIX / "policy_strict.yaml"))
    b = load_policy(str(FIX / "policy_loose.yaml"))
    got = {(d.area, d.setting): d.more for d in diff_policies(a, b)}
    assert got == {
        ("syscalls", "ptrace"): "b", ("mounts", "tmpfs /scratch"): "b", ("mounts", "tmpfs /tmp exec"): "b",
        ("limits", "memory_mb"): "b", ("limits", "cpus"): "b", ("limits", "pids"): "b",
        ("timeouts", "call_s"): "b", ("egress", "destination"): "b", ("env", "EXTRA"): "b", ("env", "MODE"): None,
        ("weakenings", "declared (unsafe:)"): "b", ("rlimits", "nofile"): "a"}
    back = {(d.area, d.setting): d.more for d in diff_policies(b, a)}
    assert back == {k: {"a": "b", "b": "a"}.get(v) if v else None for k, v in got.items()}, "symmetric"


def test_policy_diff_cli_json_and_exit_codes() -> None:
    strict, loose = str(FIX / "policy_strict.yaml"), str(FIX / "policy_loose.yaml")
    res = CliRunner().invoke(_cli(), ["policy", "diff", strict, loose, "--json"])
    assert res.exit_code == 1, res.output
    doc = json.loads(res.stdout)
    assert {d["setting"] for d in doc["only_b"]} >= {"ptrace", "memory_mb", "destination"}
    assert [d["setting"] for d in doc["only_a"]] == ["nofile"]
    assert doc["a"]["digest"].startswith("sha256:") and doc["a"]["digest"] != doc["b"]["digest"]
    assert CliRunner().invoke(_cli(), ["policy", "diff", "default", "default"]).exit_code == 0
    assert CliRunner().invoke(_cli(), ["policy", "diff", "default", "no-such-profile-x"]).exit_code == 2


def test_policy_diff_sees_a_changed_allowlist_file_not_just_the_profile_text(tmp_path: Path) -> None:
    from sandbox.policy import load_policy
    from sandbox.policydiff import diff_policies

    base = load_policy("default")
    other = base.model_copy(update={"seccomp": base.seccomp.model_copy(update={"default_action": "log"})})
    d = {(x.area, x.setting): x for x in diff_policies(base, other)}
    assert d[("syscalls", "default action (calls not listed)")].more == "b"


# ---------------------------------------------------------------- audit CLI: exit codes, outputs

@pytest.fixture
def no_audit(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record any attempt to start an audit: these tests must fail before one starts."""
    import sandbox.audit.runner as runner

    started: list[str] = []
    monkeypatch.setattr(runner, "audit_policy", lambda *a, **k: started.append("policy"))
    monkeypatch.setattr(runner, "audit_container", lambda *a, **k: started.append("container"))
    return started


@pytest.mark.parametrize("flag", ["--junit", "--output", "--json"])
def test_unwritable_output_fails_before_any_sandbox_starts(no_audit: list[str], flag: str) -> None:
    res = CliRunner().invoke(_cli(), ["audit", "-p", "default", flag, "/no/such/dir/x.out"])
    assert res.exit_code == 2, res.output
    assert "/no/such/dir" in res.stderr and "does not exist" in res.stderr
    assert no_audit == []


def test_output_that_is_a_directory_fails_with_json_error(no_audit: list[str], tmp_path: Path) -> None:
    res = CliRunner().invoke(_cli(), ["audit", "-p", "default", "--json", "--junit", str(tmp_path)])
    assert res.exit_code == 2 and no_audit == []
    assert json.loads(res.stdout)["error"]["kind"] == "usage" and "is a directory" in res.stderr


def test_missing_profile_exits_3_as_documented(no_audit: list[str]) -> None:
    res = CliRunner().invoke(_cli(), ["audit", "-p", "no-such-profile-x", "--json"])
    assert res.exit_code == 3 and "no such profile" in res.stderr
    assert json.loads(res.stdout)["error"]["exit_code"] == 3
    assert no_audit == []


def test_audit_help_documents_every_exit_code_and_format() -> None:
    res = CliRunner().invoke(_cli(), ["audit", "--help"])
    for needle in ("0  every check passed", "1  at least one check failed", "2  usage", "3  the audit could not run",
                   "md", "html", "junit", "--output"):
        assert needle in res.output, needle


# ---------------------------------------------------------------- new rows on probe data

def _agent(**over: object) -> dict:
    a = {"pid1": {"name": "python3", "uid": ["2000001"]}, "proc_owner": 0,
         "fd_open": {"/proc/1/fd/0": "EACCES", "/proc/1/fd/1": "EACCES"}, "fd_list": "EACCES",
         "mem": "EACCES", "environ": "EACCES", "process_vm_readv": "EPERM"}
    a.update(over)
    return {"agent": a}


def _rows(probe: dict, **exp: object) -> dict:
    return {r.id: r for r in evaluate_inside(probe, Expectations(**exp))}  # type: ignore[arg-type]


def test_agent_rows_pass_only_when_nothing_of_pid1_opens() -> None:
    rows = _rows(_agent())
    assert rows["inside.agent_channel"].status == rows["inside.agent_memory"].status == "pass"
    assert "not dumpable" in rows["inside.agent_memory"].observed


@pytest.mark.parametrize(("over", "row"), [
    ({"fd_open": {"/proc/1/fd/0": "EACCES", "/proc/1/fd/1": "opened"}}, "inside.agent_channel"),
    ({"fd_open": {"/proc/1/fd/0": "opened", "/proc/1/fd/1": "EACCES"}}, "inside.agent_channel"),
    ({"fd_open": {}}, "inside.agent_channel"),
    ({"mem": "opened"}, "inside.agent_memory"),
    ({"environ": "opened"}, "inside.agent_memory"),
    ({"process_vm_readv": "EFAULT"}, "inside.agent_memory"),
    ({"proc_owner": 2000001}, "inside.agent_memory"),  # /proc/1 owned by its uid: dumpable
    ({"mem": None}, "inside.agent_memory"),
])
def test_each_way_to_reach_the_agent_fails_its_row(over: dict, row: str) -> None:
    assert _rows(_agent(**over))[row].status == "fail"


REFUSED = {"host": "refused", "detail": "the host ended the sandbox: a frame failed authentication"}
ACCEPTED = {"host": "ACCEPTED", "detail": "the host reported exit 0 and the forged output"}
OPEN = {"/proc/1/fd/0": "opened", "/proc/1/fd/1": "opened"}


@pytest.mark.parametrize(("runtime", "forge", "status"), [
    ("runsc", REFUSED, "warn"),    # gVisor's documented weakness, forgery refused by authentication
    ("runc", REFUSED, "fail"),     # under runc the descriptors must not even open
    ("runsc", ACCEPTED, "fail"),
    ("runsc", None, "fail"),       # reachable and nobody tried: no benefit of the doubt
])
def test_a_reachable_channel_is_only_a_warning_under_gvisor_when_forgery_is_refused(
        runtime: str, forge: dict | None, status: str) -> None:
    probe = _agent(fd_open=OPEN, **({"forge": forge} if forge else {}))
    assert _rows(probe, runtime=runtime)["inside.agent_channel"].status == status


def test_agent_memory_under_gvisor_tolerates_environ_only() -> None:
    assert _rows(_agent(environ="opened"), runtime="runsc")["inside.agent_memory"].status == "warn"
    assert _rows(_agent(environ="opened"), runtime="runc")["inside.agent_memory"].status == "fail"
    assert _rows(_agent(environ="opened", mem="opened"), runtime="runsc")["inside.agent_memory"].status == "fail"


def test_a_killed_agent_is_a_failure_under_runc_and_a_warning_under_gvisor() -> None:
    ended = {"signals": {"ended": "no answer after signals to PID 1"}}
    assert _rows(ended, runtime="runc")["inside.agent_signals"].status == "fail"
    assert _rows(ended, runtime="runsc")["inside.agent_signals"].status == "warn"


def test_signals_row_fails_when_pid1_stops_dies_or_is_replaced() -> None:
    ok = {"before": ["S", 100], **{s: {"kill": "delivered to the kernel", "after": ["S", 100]}
                                   for s in ("SIGSTOP", "SIGTERM", "SIGKILL")}}
    assert _rows({"signals": ok})["inside.agent_signals"].status == "pass"
    for name, after in (("SIGSTOP", ["T", 100]), ("SIGTERM", None), ("SIGKILL", ["S", 999]), ("SIGTERM", ["Z", 100])):
        bad = json.loads(json.dumps(ok))
        bad[name]["after"] = after
        assert _rows({"signals": bad})["inside.agent_signals"].status == "fail", (name, after)


def test_host_facts_row() -> None:
    good = {"host_facts": {"required": {"/sys/kernel/vmcoreinfo": "masked", "/proc/config.gz": "absent",
                                        "/proc/cmdline": "empty"}, "other": {}}}
    assert _rows(good)["inside.host_facts"].status == "pass"
    leak = json.loads(json.dumps(good))
    leak["host_facts"]["required"]["/proc/cmdline"] = "readable"
    assert _rows(leak)["inside.host_facts"].status == "fail"
    assert _rows(leak, runtime="runsc")["inside.host_facts"].status == "pass", "gVisor's own /proc/cmdline"
    leak["host_facts"]["required"]["/proc/config.gz"] = "readable"
    assert _rows(leak, runtime="runsc")["inside.host_facts"].status == "fail"
    assert _rows({"host_facts": {}})["inside.host_facts"].status == "fail"


def test_every_inside_row_has_a_rule_and_no_probe_output_is_no_pass() -> None:
    rows = evaluate_inside({}, Expectations())
    assert {r.id for r in rows} == set(INSIDE_IDS) and all(r.status == "skip" for r in rows)


class _FakeAPI:
    def __init__(self, others: dict[str, str]):
        self.others = others

    def containers(self, quiet: bool = True) -> list[dict]:
        return [{"Id": k} for k in [*self.others, "me"]]

    def inspect_container(self, cid: str) -> dict:
        return {"Id": cid, "Name": "/" + cid, "Config": {"User": self.others.get(cid, ""), "Labels": {}}}


class _FakeClient:
    def __init__(self, others: dict[str, str]):
        self.api = _FakeAPI(others)


def _me(user: str, labels: dict | None = None) -> dict:
    return {"Id": "me", "Config": {"User": user, "Labels": labels or {}}}


def test_uid_row_fails_on_a_shared_or_root_uid_and_on_a_peer_with_the_same_ids() -> None:
    assert uid_row(_FakeClient({"a": "2000002:2000002"}), _me("2000001:2000001"),
                   peer=(2000003, 2000003)).status == "pass"
    shared = uid_row(_FakeClient({"other-sb": "2000001:2000001"}), _me("2000001:2000001"))
    assert shared.status == "fail" and "other-sb" in shared.observed
    assert uid_row(_FakeClient({}), _me("0:0")).status == "fail"
    assert uid_row(_FakeClient({}), _me("")).status == "fail", "no User: the image's default, root"
    assert uid_row(_FakeClient({}), _me("nobody")).status == "fail"
    assert uid_row(_FakeClient({}), _me("2000001:2000001"), peer=(2000001, 2000001)).status == "fail"
    assert uid_row(_FakeClient({}), _me("2000001:2000001"), peer="IdentityError: uid 10001 in use").status == "pass"
    lie = _me("2000001:2000001", {"org.sandbox.uid": "2000009", "org.sandbox.gid": "2000009"})
    assert uid_row(_FakeClient({}), lie).status == "fail"


def test_gvisor_docker_exec_row_says_the_filter_is_missing() -> None:
    row = exec_seccomp_row("runsc", audited_by_exec=True, exec_ids=["x"])
    assert row.status == "warn" and "without the OCI seccomp filter" in row.observed and "docker exec" in row.observed
    assert exec_seccomp_row("runsc", audited_by_exec=False).status == "info"
    assert exec_seccomp_row("runc", audited_by_exec=True).status == "pass"


# ---------------------------------------------------------------- doctor

@pytest.mark.parametrize(("version", "missing"), [
    ("1.1.5", {"CVE-2024-21626", "CVE-2025-31133", "CVE-2025-52565", "CVE-2025-52881"}),
    ("1.1.12", {"CVE-2025-31133", "CVE-2025-52565", "CVE-2025-52881"}),
    ("1.2.7", {"CVE-2025-31133", "CVE-2025-52565", "CVE-2025-52881"}),
    ("1.2.8", set()), ("1.3.2", {"CVE-2025-31133", "CVE-2025-52565", "CVE-2025-52881"}), ("1.3.3", set()),
    ("v1.4.0-rc.2", {"CVE-2025-31133", "CVE-2025-52565", "CVE-2025-52881"}), ("1.4.0-rc.3", set()),
    ("1.4.0", set()), ("1.5.1", set()), ("1.0.3", {"CVE-2024-21626", "CVE-2025-31133", "CVE-2025-52565",
                                                     "CVE-2025-52881"}),
])
def test_runc_versions_against_the_releases_that_fixed_each_escape(version: str, missing: set[str]) -> None:
    from sandbox.doctor import RUNC_FIXES, parse_runc_version, upstream_fixed

    v = parse_runc_version(version)
    assert v is not None
    assert {c for c, _, _ in RUNC_FIXES if not upstream_fixed(c, v)} == missing


def test_debian_backport_counts_only_for_the_cves_its_changelog_names(monkeypatch: pytest.MonkeyPatch) -> None:
    import sandbox.doctor as doc

    facts = doc.RuncFacts("1.1.5+ds1-1+deb12u1", "/usr/sbin/runc", "runc 1.1.5+ds1-1+deb12u1",
                          "/usr/share/doc/runc/changelog.Debian.gz", ("CVE-2024-21626",))
    monkeypatch.setattr(doc, "runc_facts", lambda info: facts)
    row = doc.runc_check({})
    assert row.status == "warn" and "CVE-2024-21626 (backported)" in row.detail
    assert "MISSING fixes for CVE-2025-31133" in row.detail and "1.2.8" in row.fix
    unpatched = doc.RuncFacts("1.1.5", "/usr/local/bin/runc", None, None, ())
    monkeypatch.setattr(doc, "runc_facts", lambda info: unpatched)
    row = doc.runc_check({})
    assert row.status == "fail" and "MISSING fixes for CVE-2024-21626" in row.detail, "exec escape: a failure"


def test_engine_error_is_named_in_words_with_a_fix_that_exists(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    import sandbox.doctor as doc

    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    rows = {c.name: c for c in doc.run_checks(canaries=False)}
    eng = rows["engine"]
    assert eng.status == "fail" and "not running" in eng.detail and "no-docker.sock" in eng.detail
    assert "Exception" not in eng.detail and ".ci/setup" not in eng.fix and "systemctl start docker" in eng.fix
    assert rows["package"].detail.startswith("sandbox ") and "state dir" in rows


def test_selftest_does_not_import_doctor() -> None:
    import ast

    import sandbox.audit.selftest as st

    tree = ast.parse(Path(st.__file__).read_text())
    mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "sandbox.doctor" not in mods


def test_declared_weakenings_are_listed_with_their_reason() -> None:
    from sandbox.audit.runner import policy_header, weakenings_row
    from sandbox.policy import load_policy

    loose = load_policy(str(FIX / "policy_loose.yaml"))
    row = weakenings_row(loose)
    assert row.status == "warn" and "seccomp.allow.ptrace" in row.observed and "a debugger profile" in row.observed
    assert weakenings_row(load_policy("default")).status == "pass"
    assert weakenings_row(None).status == "info"
    r = _report()
    r.header.update(policy_header(loose))
    assert "seccomp.allow.ptrace" in to_markdown(r) and r.header["policy_hash"] == loose.digest()
