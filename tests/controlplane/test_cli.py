"""CLI: `sandbox control-plane` (foreground server) and `sandbox session ...` (admin side)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from sandbox.controlplane import ControlPlane, LocalAdmin
from sandbox.controlplane.cli import control_plane_cmd, parse_tool_calls, session_group

from .helpers import http


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_control_plane_command_runs_until_sigterm_and_never_prints_keys(tmp_path: Path, runner: CliRunner) -> None:
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-c", "from sandbox.controlplane.cli import control_plane_cmd; control_plane_cmd()", "--state-dir", str(state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        lines = [proc.stdout.readline() for _ in range(5)]  # type: ignore[union-attr]
        base_url = lines[0].split()[-1]
        assert base_url.startswith("http://127.0.0.1:")
        endpoint = json.loads((state / "endpoint.json").read_text())
        assert endpoint["base_url"] == base_url and endpoint["environment_id"] in lines[1]
        assert str(state / "environment.key") in lines[3] and str(state / "admin.key") in lines[4]
        assert http().get(f"{base_url}/local/v1/health").status_code == 200
        # the session commands find it through the state dir
        res = runner.invoke(session_group, ["new", "--state-dir", str(state)])
        assert res.exit_code == 0, res.output
        assert res.output.strip().startswith("session_")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    printed = "".join(lines) + out + err
    for key_file in ("environment.key", "admin.key"):
        assert (state / key_file).read_text().strip() not in printed
    assert "sk-ant-" not in printed
    assert not (state / "endpoint.json").exists()


def test_session_commands(tmp_path: Path, runner: CliRunner) -> None:
    state = tmp_path / "state"
    with ControlPlane(state) as cp:
        sd = ["--state-dir", str(state)]
        res = runner.invoke(session_group, ["new", *sd])
        assert res.exit_code == 0, res.output
        sid = res.output.strip()
        calls = tmp_path / "calls.jsonl"
        calls.write_text('{"name": "bash", "input": {"command": "ls"}}\n\n{"name": "read", "input": {"file_path": "/w/x"}}\n')
        res = runner.invoke(session_group, ["send", sid, str(calls), *sd])
        assert res.exit_code == 0, res.output
        ids = res.output.split()
        assert len(ids) == 2 and all(i.startswith("sevt_") for i in ids)
        res = runner.invoke(session_group, ["events", sid, "--json", *sd])
        assert res.exit_code == 0, res.output
        events = json.loads(res.output)
        assert [e["id"] for e in events if e["type"] == "agent.tool_use"] == ids
        res = runner.invoke(session_group, ["events", sid, *sd])
        assert res.exit_code == 0 and "agent.tool_use" in res.output and "bash" in res.output

        def later() -> None:
            time.sleep(0.4)
            with LocalAdmin(cp.base_url, cp.admin_key, http_client=http()) as admin:
                admin.send_tool_use(sid, "bash", {"command": "watched"})
                http().post(
                    f"{cp.base_url}/v1/sessions/{sid}/events",
                    json={"events": [{"type": "user.tool_result", "tool_use_id": ids[0], "content": [{"type": "text", "text": "out"}]}]},
                    headers={"Authorization": f"Bearer {cp.environment_key}", "anthropic-version": "2023-06-01", "anthropic-beta": "managed-agents-2026-04-01"},
                )
                admin.terminate(sid)

        threading.Thread(target=later, daemon=True).start()
        res = runner.invoke(session_group, ["watch", sid, *sd])  # returns when the session terminates
        assert res.exit_code == 0, res.output
        assert "agent.tool_use" in res.output and "watched" in res.output
        assert "user.tool_result" in res.output and "out" in res.output
        assert "session.status_terminated" in res.output
        res = runner.invoke(session_group, ["watch", sid, "--json", *sd])  # terminated: replays the end
        assert res.exit_code == 0 and json.loads(res.output.splitlines()[-1])["type"] == "session.status_terminated"
        res = runner.invoke(session_group, ["send", sid, str(calls), *sd])
        assert res.exit_code == 1 and "terminated" in res.output


def test_session_commands_without_a_control_plane(tmp_path: Path, runner: CliRunner) -> None:
    res = runner.invoke(session_group, ["new", "--state-dir", str(tmp_path)])
    assert res.exit_code == 2 and "sandbox control-plane" in res.output


def test_state_dir_defaults_to_sandbox_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox.controlplane.endpoint import resolve_state_dir
    from sandbox.paths import state_dir

    monkeypatch.setenv("SANDBOX_STATE_DIR", str(tmp_path))
    assert resolve_state_dir(None) == tmp_path / "controlplane"
    monkeypatch.delenv("SANDBOX_STATE_DIR")
    assert resolve_state_dir(None) == state_dir() / "controlplane"  # /var/lib/sandbox as root, like the runtime
    assert resolve_state_dir("~/x") == Path.home() / "x"


def test_parse_tool_calls() -> None:
    assert parse_tool_calls('{"name": "bash", "input": {"command": "ls"}}') == [
        {"name": "bash", "input": {"command": "ls"}, "evaluated_permission": None}
    ]
    assert [c["name"] for c in parse_tool_calls('[{"name": "a"}, {"name": "b", "evaluated_permission": "ask"}]')] == ["a", "b"]
    assert len(parse_tool_calls('{"name": "a"}\n{"name": "b"}\n')) == 2
    for bad in ("", "[]", '{"input": {}}', '{"name": "a", "input": []}', "{not json}\n", "[1]"):
        with pytest.raises(click.BadParameter):
            parse_tool_calls(bad)


def test_commands_are_click_commands() -> None:
    assert isinstance(control_plane_cmd, click.Command) and control_plane_cmd.name == "control-plane"
    assert isinstance(session_group, click.Group)
    assert {"new", "send", "watch", "events", "idle", "terminate"} <= set(session_group.commands)
    assert os.environ.get("ANTHROPIC_API_KEY") is None
