"""The Python API (`import sandbox`): the context manager leaves no container behind, whatever
happens in the block; commands, files, environment and timeouts; one exception type per failure."""

from __future__ import annotations

import io
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import sandbox
from sandbox import api

pytestmark = pytest.mark.docker


@pytest.fixture(autouse=True)
def _engine(docker_client) -> Iterator[None]:
    yield
    for rt in list(api._runtimes.values()):
        rt.gc(mine=True)  # only this process's sandboxes, whatever a failed test left


def container_gone(docker_client, cid: str, wait_s: float = 30.0) -> bool:
    """The engine no longer lists the container (AutoRemove runs shortly after the kill)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if not docker_client.api.containers(all=True, filters={"id": cid}):  # no per-container inspect race
            return True
        time.sleep(0.2)
    return False


def running(docker_client, cid: str) -> bool:
    return bool(docker_client.api.containers(filters={"id": cid, "status": "running"}))


def test_context_manager_leaves_no_container_after_the_block(docker_client) -> None:
    with sandbox.open(profile="default") as sb:
        cid = sb.id
        assert running(docker_client, cid)
        assert sb.exec(["true"]).exit_code == 0
    assert not sb.alive
    assert container_gone(docker_client, cid)


def test_context_manager_leaves_no_container_after_an_exception(docker_client) -> None:
    cid = ""
    with pytest.raises(ZeroDivisionError):
        with sandbox.open() as sb:
            cid = sb.id
            assert running(docker_client, cid)
            1 / 0  # noqa: B018
    assert cid and container_gone(docker_client, cid)


def test_create_and_close_without_a_with_block(docker_client) -> None:
    sb = sandbox.Sandbox.create(profile="default", session_id=f"test_api_{uuid.uuid4().hex[:8]}")
    try:
        assert sb.exec("echo $((6 * 7))").text == "42\n"
    finally:
        sb.close()
    sb.close()  # idempotent
    assert container_gone(docker_client, sb.id)
    with pytest.raises(sandbox.SandboxStopped):
        sb.exec(["true"])


def test_commands_run_as_the_sandbox_uid_with_results(docker_client) -> None:
    with sandbox.open() as sb:
        assert isinstance(sb.uid, int) and sb.uid > 0
        r = sb.exec(["sh", "-c", "id -u; id -g; echo err >&2; exit 5"])
        assert r.stdout == f"{sb.uid}\n{sb.gid}\n".encode() and r.stderr == b"err\n"
        assert r.exit_code == 5 and not r.ok and r.limit is None and r.status == 5
        with pytest.raises(sandbox.CommandFailed) as ei:
            sb.exec(["sh", "-c", "exit 5"], check=True)
        assert ei.value.result.exit_code == 5
        assert sb.exec(["sh", "-c", "printf %s \"$1\"", "sh", "a b; $(x)"]).stdout == b"a b; $(x)"


def test_limits_are_in_the_result_and_raise_with_check(docker_client) -> None:
    with sandbox.open(timeout=30) as sb:
        r = sb.exec(["sleep", "30"], timeout=1)
        assert r.limit == "timeout" and r.status == 241 and "time limit" in (r.limit_message or "")
        with pytest.raises(sandbox.LimitExceeded) as ei:
            sb.exec(["sleep", "30"], timeout=1, check=True)
        assert ei.value.limit == "timeout"


def test_stdin_as_bytes_str_and_streamed_file(docker_client, tmp_path: Path) -> None:
    with sandbox.open() as sb:
        assert sb.exec(["cat"], stdin=b"\x00bytes").stdout == b"\x00bytes"
        assert sb.exec(["cat"], stdin="text").stdout == b"text"
        big = tmp_path / "big"
        big.write_bytes(os.urandom(1 << 20) * 24)  # 24 MiB: more than one channel frame
        with big.open("rb") as f:
            r = sb.exec(["sha256sum"], stdin=f)
        import hashlib

        assert r.stdout.split()[0].decode() == hashlib.sha256(big.read_bytes()).hexdigest()
        assert sb.exec(["cat"]).stdout == b""  # no stdin: /dev/null


def test_files_round_trip_as_bytes(docker_client) -> None:
    blob = bytes(range(256)) * 4096  # 1 MiB, every byte value
    with sandbox.open() as sb:
        sb.write_file("sub.bin", blob)
        assert sb.read_file("sub.bin") == blob
        assert sb.read_file("/workspace/sub.bin") == blob
        sb.write_file("from_file", io.BytesIO(b"streamed"))
        sb.write_file("text", "héllo")
        assert sb.exec(["cat", "from_file", "text"]).stdout == "streamedhéllo".encode()
        with pytest.raises(sandbox.SandboxError):
            sb.read_file("sub.bin", max_bytes=1000)


def test_file_errors_are_the_usual_oserrors(docker_client) -> None:
    with sandbox.open() as sb:
        with pytest.raises(FileNotFoundError):
            sb.read_file("no-such-file")
        with pytest.raises(IsADirectoryError):
            sb.read_file("/workspace")
        with pytest.raises(PermissionError):
            sb.read_file("/etc/shadow")
        with pytest.raises(FileNotFoundError):
            sb.write_file("no-such-dir/f", b"x")
        with pytest.raises(OSError) as ei:
            sb.write_file("/etc/passwd", b"root::0:0::/:/bin/sh\n")  # read-only root filesystem
        assert not isinstance(ei.value, FileNotFoundError)
        assert "root::0:0" not in sb.exec(["cat", "/etc/passwd"]).text


def test_env_and_timeout_pass_the_policy_rules(docker_client) -> None:
    with sandbox.open(env={"FROM_OPEN": "1"}) as sb:
        assert sb.exec("echo $FROM_OPEN$PER_CALL", env={"PER_CALL": "2"}).text == "12\n"
        for bad in ({"LD_PRELOAD": "/x.so"}, {"ANTHROPIC_API_KEY": "k"}, {"1X": "y"}, {"A": "nul\x00"}):
            with pytest.raises(sandbox.PolicyError):
                sb.exec(["true"], env=bad)
        for t in (float("nan"), float("inf"), 1e12, 0, -1):
            with pytest.raises(sandbox.PolicyError) as ei:
                sb.exec(["true"], timeout=t)
            assert "timeouts.call_s" in str(ei.value)
    with pytest.raises(sandbox.PolicyError):
        sandbox.open(env={"LD_PRELOAD": "/x.so"})
    with pytest.raises(sandbox.PolicyError):
        sandbox.open(timeout=float("nan"))


def test_empty_commands_are_refused(docker_client) -> None:
    with sandbox.open() as sb:
        for argv in ([], [""], "", "   "):
            with pytest.raises(ValueError):
                sb.exec(argv)


def test_workspace_is_mounted_and_checked(docker_client, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    ws.chmod(0o777)
    with sandbox.open(workspace=ws) as sb:
        sb.write_file("made-inside", b"x")
        assert not sb.warnings
    assert (ws / "made-inside").read_bytes() == b"x"
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o755)
    with sandbox.open(workspace=ro) as sb:
        assert any("not writable" in w and str(sb.uid) in w for w in sb.warnings)
    with pytest.raises(sandbox.WorkspaceError, match="no such directory"):
        sandbox.open(workspace=tmp_path / "missing")
    with pytest.raises(sandbox.WorkspaceError, match="never mounted"):
        sandbox.open(workspace="/etc")


def test_each_failure_class_has_its_exception(docker_client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(sandbox.PolicyError, match="no such profile"):
        sandbox.open(profile="no-such-profile")
    prof = tmp_path / "noimage.yaml"
    prof.write_text("extends: default\nimage: sandbox-no-such-image:latest\n")
    with pytest.raises(sandbox.ImageMissing):
        sandbox.open(profile=str(prof))
    monkeypatch.setattr(api, "_runtimes", {})
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    with pytest.raises(sandbox.EngineUnavailable):
        sandbox.open()
    for cls in (sandbox.PolicyError, sandbox.ImageMissing, sandbox.EngineUnavailable, sandbox.WorkspaceError,
                sandbox.SandboxStopped, sandbox.LimitExceeded, sandbox.CommandFailed):
        assert issubclass(cls, sandbox.SandboxError)
