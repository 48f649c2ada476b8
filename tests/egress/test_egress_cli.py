"""`sandbox proxy` and `sandbox egress log/status`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from sandbox.egress.audit import AuditLog, AuditRecord
from sandbox.egress.cli import egress_group, load_rules
from tests.egress.egress_helpers import Target, parse_response, recv_all, wait_until

pytestmark = pytest.mark.timeout(30)


def _write_audit(state: Path) -> None:
    log = AuditLog(state / "audit.jsonl")
    log.write(AuditRecord(session="a", method="CONNECT", host="pypi.org", port=443, addr="151.101.0.223", decision="allow", rule="pypi.org:443", reason="allowed", code="allowed", bytes_up=10, bytes_down=20))
    log.write(AuditRecord(session="b", method="GET", host="evil.test", port=80, path="/x", decision="deny", reason="no egress rule allows host evil.test", code="no-matching-rule"))
    log.close()


def test_egress_log_as_one_json_document_and_table(tmp_path: Path) -> None:
    _write_audit(tmp_path)
    r = CliRunner().invoke(egress_group, ["log", "--json", "--state-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert [x["session"] for x in json.loads(r.output)] == ["a", "b"]
    r = CliRunner().invoke(egress_group, ["log", "--json", "--session", "b", "-n", "5", "--state-dir", str(tmp_path)])
    assert [x["host"] for x in json.loads(r.output)] == ["evil.test"]
    r = CliRunner().invoke(egress_group, ["log", "--state-dir", str(tmp_path)])
    assert r.exit_code == 0 and "evil.test" in r.output and "no-matching-rule" in r.output
    # redirected: never cut, whatever the width; hostile text is printed, not read as markup
    assert "no egress rule allows host evil.test" in r.output


def test_egress_log_prints_markup_in_records_literally(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.write(AuditRecord(session="s", method="GET", host="x.test", port=80, path="/[bold]x[/bold]", decision="deny",
                          reason="no rule for [red]x[/red]", code="no-matching-rule"))
    log.close()
    r = CliRunner().invoke(egress_group, ["log", "--state-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "/[bold]x[/bold]" in r.output and "[red]x[/red]" in r.output


def test_egress_status_when_no_daemon_runs(tmp_path: Path) -> None:
    r = CliRunner().invoke(egress_group, ["status", "--state-dir", str(tmp_path)])
    assert r.exit_code == 0 and "not running" in r.output


def test_rules_file_may_be_bare_or_a_profile_fragment(tmp_path: Path) -> None:
    bare = tmp_path / "bare.yaml"
    bare.write_text("rules:\n  - {host: PyPI.org, ports: [443]}\nbyte_budget: 1000\n")
    frag = tmp_path / "frag.yaml"
    frag.write_text("egress:\n  rules:\n    - {host: '*.example.com', ports: [443]}\n")
    assert load_rules(bare).rules[0].host == "pypi.org" and load_rules(bare).byte_budget == 1000
    assert load_rules(frag).rules[0].host == "*.example.com"


def test_proxy_command_serves_one_fixed_session_on_loopback(tmp_path: Path) -> None:
    t = Target("127.0.0.2").start()
    rules = tmp_path / "rules.yaml"
    rules.write_text("allow_cidrs: ['127.0.0.2/32']\nrules:\n  - {host: allowed.test, ports: [443]}\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = "from sandbox.egress.cli import proxy_cmd; proxy_cmd()"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "--profile-rules", str(rules), "--listen", f"127.0.0.1:{port}", "--state-dir", str(tmp_path / "st")],
        stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:

        def up() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return True
            except OSError:
                return False

        assert wait_until(up, 10)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(f"GET http://127.0.0.2:{t.port}/cli HTTP/1.1\r\nHost: 127.0.0.2:{t.port}\r\n\r\n".encode())
            ok = parse_response(recv_all(s))
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"CONNECT evil.test:443 HTTP/1.1\r\n\r\n")
            denied = parse_response(recv_all(s))
        assert ok.status == 200 and ok.body == b"ok:/cli"
        assert denied.status == 403
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
        t.close()
    assert b"evil.test" in err and b"deny" in err  # the live view of decisions
    recs = [json.loads(x) for x in (tmp_path / "st" / "audit.jsonl").read_text().splitlines()]
    assert [r["decision"] for r in recs] == ["allow", "deny"] and {r["session"] for r in recs} == {"proxy-cli"}


def test_proxy_command_refuses_a_non_loopback_listener(tmp_path: Path) -> None:
    from sandbox.egress.cli import proxy_cmd

    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: [{host: allowed.test, ports: [443]}]\n")
    r = CliRunner().invoke(proxy_cmd, ["--profile-rules", str(rules), "--listen", "0.0.0.0:8080", "--state-dir", str(tmp_path)])
    assert r.exit_code != 0 and "loopback" in r.output


def test_cli_reads_the_audit_log_where_the_runtime_puts_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from sandbox.egress.manager import default_state_dir
    from sandbox.runtime import default_state_dir as runtime_state_dir

    assert default_state_dir() == runtime_state_dir() / "egress"
    monkeypatch.setenv("SANDBOX_STATE_DIR", str(tmp_path))
    assert default_state_dir() == runtime_state_dir() / "egress" == tmp_path / "egress"


def test_proxy_command_names_a_missing_credential_without_a_traceback(tmp_path: Path, monkeypatch) -> None:
    from click.testing import CliRunner

    from sandbox.egress.cli import proxy_cmd

    monkeypatch.delenv("EGRESS_CLI_TOKEN", raising=False)
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - {host: api.example.com, ports: [443], credential: {name: gh}}\n"
                     "credentials:\n  gh: {env: EGRESS_CLI_TOKEN}\n")
    r = CliRunner().invoke(proxy_cmd, ["--profile-rules", str(rules), "--state-dir", str(tmp_path / "st")])
    assert r.exit_code == 1 and "credential 'gh' (env EGRESS_CLI_TOKEN)" in r.output and "not set" in r.output
    assert "Traceback" not in r.output
