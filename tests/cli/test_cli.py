"""The CLI: policy tools without Docker; Docker's conventions on `sandbox exec`; `--json` on
success and failure; output that is not a terminal; `sandbox ps`; a cheap `--help`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import version
from pathlib import Path

import pytest
from click.testing import CliRunner

from sandbox.cli import main

BAD = Path(__file__).resolve().parents[1] / "policy" / "bad"
SECRET = "sk-ant-api03-not-a-real-key-0123456789"


def run(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.output


def cli(*args: str, env: dict[str, str] | None = None, stdin: bytes | None = None, cwd: Path | None = None,
        timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """The real command line in a subprocess, stdout and stderr pipes (not a terminal)."""
    return subprocess.run([sys.executable, "-m", "sandbox", *args], capture_output=True, text=stdin is None,
                          input=stdin, timeout=timeout, cwd=cwd,
                          env={**os.environ, "COLUMNS": "80", **(env or {})})


def _exec(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return cli("exec", *args, **kw)  # type: ignore[arg-type]


def json_error(r: subprocess.CompletedProcess[str]) -> dict[str, object]:
    doc = json.loads(r.stdout)
    assert set(doc) == {"error"}, doc
    err = doc["error"]
    assert err["exit_code"] == r.returncode and err["message"], err
    return err


# ------------------------------------------------------------------ policy tools (no Docker)

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


def test_unknown_profile_with_json_is_a_json_error_on_stdout() -> None:
    r = cli("policy", "explain", "no-such-profile", "--json")
    assert r.returncode == 2
    err = json_error(r)
    assert err["kind"] == "policy" and "no such profile" in str(err["message"])
    assert "no such profile" in r.stderr


# ------------------------------------------------------------------ --help, --version, import cost

def test_help_lists_every_command_without_importing_the_worker_or_the_sdk(tmp_path: Path) -> None:
    mods = tmp_path / "modules.json"
    code = textwrap.dedent(f"""
        import json, sys
        sys.argv = ["sandbox", "--help"]
        from sandbox.cli import main
        try:
            main()
        finally:
            open({str(mods)!r}, "w").write(json.dumps(sorted(sys.modules)))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for name in ("exec", "ps", "policy", "audit", "worker", "session", "egress", "doctor", "gc", "images"):
        assert f"\n  {name} " in r.stdout, name
    loaded = set(json.loads(mods.read_text()))
    heavy = {m for m in loaded if m.split(".")[0] in ("anthropic", "pydantic", "docker", "rich", "httpx", "httpx2")
             or m.startswith(("sandbox.worker", "sandbox.runtime", "sandbox.audit", "sandbox.controlplane",
                              "sandbox.egress", "sandbox.policy", "sandbox.api"))}
    assert not heavy, sorted(heavy)


def test_subcommand_help_still_works_for_lazy_commands() -> None:
    code, out = run("egress", "--help")
    assert code == 0 and "log" in out


def test_version_is_the_package_version() -> None:
    r = cli("--version")
    assert r.returncode == 0 and r.stdout == f"sandbox {version('sandbox')}\n"
    import sandbox

    assert sandbox.__version__ == version("sandbox")


def test_import_sandbox_does_not_load_the_runtime() -> None:
    code = ("import sys, sandbox; assert 'sandbox.api' not in sys.modules and 'pydantic' not in sys.modules, 1; "
            "sandbox.open; assert 'sandbox.api' in sys.modules, 2; print(sandbox.SandboxError.__mro__[1].__name__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------ exec: parsing and validation (no Docker needed)

def test_unknown_option_before_the_command_is_a_usage_error() -> None:
    r = _exec("--no-such-flag", "true")
    assert r.returncode == 2 and "No such option" in r.stderr


def test_missing_command_with_json_is_a_json_usage_error() -> None:
    r = _exec("--json")
    assert r.returncode == 2
    assert json_error(r)["kind"] == "usage"


@pytest.mark.parametrize("argv", [["--", ""], [""], ["--json", "--", ""]])
def test_empty_command_name_is_a_clear_usage_error(argv: list[str]) -> None:
    r = _exec(*argv)
    assert r.returncode == 2
    assert "the command name is empty" in r.stderr and "Permission denied" not in r.stderr
    if "--json" in argv:
        assert json_error(r)["kind"] == "usage"


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "1e12", "86401", "0", "-1", "abc", ""])
def test_timeout_is_validated_as_the_policy_validates_call_s(value: str) -> None:
    r = _exec("--timeout", value, "--", "true")
    assert r.returncode == 2, (value, r)
    assert f"--timeout {value}:" in r.stderr
    r = _exec("--json", f"--timeout={value}", "--", "true")
    assert r.returncode == 2 and json_error(r)["kind"] == "timeout"


@pytest.mark.parametrize("assign", [f"ANTHROPIC_API_KEY={SECRET}", f"LD_PRELOAD=/tmp/{SECRET}.so",
                                    f"DOCKER_HOST=tcp://{SECRET}", f"1BAD={SECRET}", f"A-B={SECRET}"])
def test_env_flag_refuses_what_a_policy_refuses_without_echoing_the_value(assign: str) -> None:
    name = assign.partition("=")[0]
    r = _exec("-e", assign, "--", "true")
    assert r.returncode == 2, r
    assert f"-e {name}:" in r.stderr and repr(name) in r.stderr
    assert SECRET not in r.stderr and SECRET not in r.stdout
    r = _exec("--json", "--env", assign, "--", "true")
    assert r.returncode == 2 and json_error(r)["kind"] == "env" and SECRET not in r.stdout


def test_env_file_refusal_names_the_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "vars.env"
    f.write_text(f"# comment\n\nOK=1\nANTHROPIC_AUTH_TOKEN={SECRET}\n")
    r = _exec("--env-file", str(f), "--", "true")
    assert r.returncode == 2
    assert f"--env-file {f}:4:" in r.stderr and "ANTHROPIC_AUTH_TOKEN" in r.stderr and SECRET not in r.stderr


def test_env_passthrough_of_a_refused_name_from_the_host_is_refused() -> None:
    r = _exec("-e", "ANTHROPIC_API_KEY", "--", "true", env={"ANTHROPIC_API_KEY": SECRET})
    assert r.returncode == 2 and "ANTHROPIC_API_KEY" in r.stderr and SECRET not in r.stderr + r.stdout


def test_unreadable_env_file_is_named() -> None:
    r = _exec("--env-file", "/no/such/file.env", "--", "true")
    assert r.returncode == 2 and "--env-file /no/such/file.env: cannot read" in r.stderr


def test_missing_workspace_is_named_as_typed(tmp_path: Path) -> None:
    r = _exec("-w", "no-such-dir/sub", "--", "true", cwd=tmp_path)
    assert r.returncode == 240 and "workspace no-such-dir/sub: no such directory" in r.stderr
    r = _exec("--json", "-w", "no-such-dir/sub", "--", "true", cwd=tmp_path)
    err = json_error(r)
    assert err["kind"] == "workspace" and "no-such-dir/sub" in str(err["message"])


def test_workspace_that_is_a_file_is_named_as_typed(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    r = _exec("-w", "./afile", "--", "true", cwd=tmp_path)
    assert r.returncode == 240 and "workspace ./afile: not a directory" in r.stderr


def test_exec_refuses_dangerous_workspace() -> None:
    r = _exec("-w", "/etc", "--", "true")
    assert r.returncode == 240 and "/etc" in r.stderr and "never mounted" in r.stderr


def test_exit_codes_are_documented_in_help() -> None:
    code, out = run("exec", "--help")
    assert code == 0
    for status in ("2 ", "240", "241", "242", "243", "244", "245", "246"):
        assert status in out


# ------------------------------------------------------------------ exec with a real engine

@pytest.mark.docker
def test_exec_passes_status_and_streams(docker_client) -> None:
    r = _exec("--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert r.returncode == 7 and r.stdout == "out\n" and r.stderr == "err\n"


@pytest.mark.docker
def test_options_end_at_the_first_word_of_the_command(docker_client) -> None:
    r = _exec("echo", "-v", "hi")
    assert r.returncode == 0 and r.stdout == "-v hi\n", r
    r = _exec("sh", "-c", 'printf "%s|" "$@"', "sh", "-h", "--json", "-e", "X=1", "--timeout", "nan", "--", "-i")
    assert r.returncode == 0 and r.stdout == "-h|--json|-e|X=1|--timeout|nan|--|-i|", r


@pytest.mark.docker
def test_env_flags_reach_the_command_in_dockers_order(docker_client, tmp_path: Path) -> None:
    f = tmp_path / "vars.env"
    f.write_text("# comment\n\nFROM_FILE=file value  \nOVERRIDDEN=from file\nEQUALS=a=b\nPASSED\nUNSET_ON_HOST\n")
    r = _exec("--env-file", str(f), "-e", "OVERRIDDEN=from flag", "-e", "ALSO_PASSED", "--",
              "sh", "-c", 'printf "%s|" "$FROM_FILE" "$OVERRIDDEN" "$EQUALS" "$PASSED" "$ALSO_PASSED" '
                          '"${UNSET_ON_HOST-unset}"',
              env={"PASSED": "p1", "ALSO_PASSED": "p2"})
    assert r.returncode == 0, r.stderr
    assert r.stdout == "file value  |from flag|a=b|p1|p2|unset|"


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
    assert doc["limit_exit_code"] == 244 and doc["status"] == 244 and "output cap" in doc["limit_message"]


@pytest.mark.docker
def test_exec_json_success_is_one_document(docker_client) -> None:
    r = _exec("--json", "--", "sh", "-c", "echo hi; exit 3")
    assert r.returncode == 3
    doc = json.loads(r.stdout)
    assert doc["exit_code"] == 3 and doc["limit"] is None and doc["stdout"] == "hi\n"
    assert doc["profile"] == "default" and isinstance(doc["uid"], int) and doc["uid"] > 0


@pytest.mark.docker
def test_exec_memory_limit_status(docker_client) -> None:
    r = _exec("--", "python3", "-c", "x=[]\nwhile True: x.append(bytearray(1<<24))")
    assert r.returncode == 242, r
    assert "memory" in r.stderr


@pytest.mark.docker
def test_exec_workspace_dir_is_mounted(docker_client, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    ws.chmod(0o777)  # the sandbox's uid is allocated per sandbox
    r = _exec("-w", str(ws), "--", "sh", "-c", "echo hi > /workspace/f && cat /workspace/f")
    assert r.returncode == 0 and r.stdout == "hi\n", r.stderr
    assert (ws / "f").read_text() == "hi\n"


@pytest.mark.docker
def test_unwritable_workspace_is_said_with_the_sandbox_uid(docker_client, tmp_path: Path) -> None:
    ws = tmp_path / "ro"
    ws.mkdir()
    ws.chmod(0o755)  # owned by the test's user, which is not the sandbox's
    r = _exec("--json", "-w", str(ws), "--", "sh", "-c", "id -u; touch /workspace/x")
    doc = json.loads(r.stdout)
    uid = doc["uid"]
    assert doc["stdout"] == f"{uid}\n" and doc["exit_code"] != 0
    assert any(str(ws) in w and f"uid {uid}" in w and "not writable" in w for w in doc["warnings"]), doc
    assert "not writable" in r.stderr


@pytest.mark.docker
def test_stdin_reaches_the_command_only_with_interactive(docker_client) -> None:
    r = _exec("-i", "--", "sh", "-c", "cat; echo end", stdin=b"hi\n")
    assert r.returncode == 0 and r.stdout == b"hi\nend\n", r
    r = _exec("--", "sh", "-c", "cat; echo end", stdin=b"hi\n")
    assert r.returncode == 0 and r.stdout == b"end\n", r


@pytest.mark.docker
def test_large_stdin_streams_with_bounded_memory(docker_client) -> None:
    """200 MB piped through `exec -i` all arrive, while the CLI's peak RSS stays far below the input."""
    size = 200_000_000
    code = textwrap.dedent(f"""
        import resource, subprocess, sys
        src = subprocess.Popen(["head", "-c", "{size}", "/dev/zero"], stdout=subprocess.PIPE)
        r = subprocess.run([sys.executable, "-m", "sandbox", "exec", "-i", "--", "wc", "-c"],
                           stdin=src.stdout, capture_output=True, text=True)
        src.wait()
        print(r.returncode, r.stdout.strip(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.stderr[-500:])
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    status, count, maxrss_kb, *_ = r.stdout.split()
    assert status == "0" and count == str(size), r.stdout
    assert int(maxrss_kb) < 120_000, f"CLI peak RSS {maxrss_kb} KiB for a {size}-byte input"


# ------------------------------------------------------------------ ps and output that is not a terminal

@pytest.mark.docker
def test_ps_lists_a_live_sandbox_as_json_and_as_an_untruncated_table(docker_client) -> None:
    import sandbox

    session = "test_ps_" + "long-session-name-" * 6 + os.urandom(4).hex()
    with sandbox.open(session_id=session) as sb:
        r = cli("ps", "--json")
        assert r.returncode == 0, r.stderr
        rows = [x for x in json.loads(r.stdout)["sandboxes"] if x["session"] == session]
        assert len(rows) == 1, r.stdout
        row = rows[0]
        assert row["id"] == sb.id[:12] and row["profile"] == "default" and row["uid"] == sb.uid
        assert row["owner_pid"] == os.getpid() and row["owner_alive"] is True
        assert row["limits"] == {"memory_mb": 512, "cpus": 1.0, "pids": 128}
        assert row["policy_digest"] == sb.policy.digest()

        r = cli("ps")  # stdout is a pipe and COLUMNS=80: nothing cut, nothing wrapped
        assert r.returncode == 0, r.stderr
        header = next(line for line in r.stdout.splitlines() if "session" in line and "profile" in line)
        for col in ("id", "session", "profile", "uid", "age", "owner", "alive", "memory", "cpus", "pids", "runtime"):
            assert col in header
        line = next(line for line in r.stdout.splitlines() if sb.id[:12] in line)
        assert session in line and str(sb.uid) in line and "512 MiB" in line and "…" not in line
        assert len(line) > 200
