"""The CLI: policy tools without Docker; `sandbox exec` statuses with a real engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from sandbox.cli import main

BAD = Path(__file__).resolve().parents[1] / "policy" / "bad"


def run(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.output


def test_lint_names_file_key_and_reason_and_fails() -> None:
    code, out = run("policy", "lint", str(BAD / "root_uid.yaml"), "default")
    assert code == 1
    assert f"{BAD / 'root_uid.yaml'}: user.uid: " in out and "must not be 0" in out
    assert "default: ok" in out


def test_explain_names_dangerous_syscalls_and_network() -> None:
    code, out = run("policy", "explain", "default", "--json")
    assert code == 0
    doc = json.loads(out)
    values = {r["setting"]: r["value"] for r in doc["rows"]}
    assert "mount" in values["dangerous denied"] and values["dangerous ALLOWED"] == "none"
    assert values["egress"].startswith("none")
    assert doc["digest"].startswith("sha256:")


def test_seccomp_exports_oci_and_pfc() -> None:
    code, out = run("policy", "seccomp", "default", "--format", "oci")
    assert code == 0 and json.loads(out)["defaultAction"] == "SCMP_ACT_ERRNO"
    code, out = run("policy", "seccomp", "default", "--format", "pfc")
    assert code == 0 and "pseudo filter code" in out


def test_unknown_profile_is_a_clear_error() -> None:
    code, out = run("policy", "explain", "no-such-profile")
    assert code == 2 and "no such profile; known:" in out


def _exec(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sandbox.cli", "exec", *args], capture_output=True, text=True,
                          timeout=180, env={**os.environ, **(env or {})})


@pytest.mark.docker
def test_exec_passes_status_and_streams(docker_client) -> None:
    r = _exec("--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert r.returncode == 7 and r.stdout == "out\n" and r.stderr == "err\n"


@pytest.mark.docker
def test_exec_timeout_has_its_own_status_and_words(docker_client) -> None:
    r = _exec("--timeout", "1", "--", "sleep", "30")
    assert r.returncode == 241, r
    assert "limit hit: timeout" in r.stderr


@pytest.mark.docker
def test_exec_json_reports_output_cap(docker_client, tmp_path: Path) -> None:
    prof = tmp_path / "small-output.yaml"
    prof.write_text("extends: default\noutput: {max_bytes: 4096}\n")
    r = _exec("--json", "-p", str(prof), "--", "sh", "-c", "yes | head -c 100000000")
    assert r.returncode == 244, r.stderr
    doc = json.loads(r.stdout)
    assert doc["limit"] == "output" and doc["truncated"] and len(doc["stdout"]) <= 4096


@pytest.mark.docker
def test_exec_memory_limit_status(docker_client) -> None:
    r = _exec("--", "python3", "-c", "x=[]\nwhile True: x.append(bytearray(1<<24))")
    assert r.returncode == 242, r
    assert "memory" in r.stderr


@pytest.mark.docker
def test_exec_workspace_dir_is_mounted(docker_client, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    os.chown(ws, 10001, 10001) if os.geteuid() == 0 else None
    r = _exec("-w", str(ws), "--", "sh", "-c", "echo hi > /workspace/f && cat /workspace/f")
    assert r.returncode == 0 and r.stdout == "hi\n", r.stderr
    assert (ws / "f").read_text() == "hi\n"


def test_exec_refuses_dangerous_workspace() -> None:
    r = _exec("-w", "/etc", "--", "true")
    assert r.returncode == 240 and "/etc" in r.stderr
