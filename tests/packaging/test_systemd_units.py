"""deploy/systemd: the units parse, their command lines are ones the CLI accepts, and the worker's
environment file (it holds the environment key) is refused unless only root can read it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
UNIT_FILES = sorted(UNITS.glob("*.service"))
EXAMPLE_ENV = {"SANDBOX_CONTROL_PLANE_URL": "http://127.0.0.1:7787", "SANDBOX_ENVIRONMENT_ID": "env_0123"}


def _directives(unit: Path, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in unit.read_text().splitlines() if line.startswith(key + "=")]


def _unescape(cmd: str) -> str:
    """What systemd runs: $$ is a literal $, %% a literal %, ${VAR} from the environment."""
    cmd = re.sub(r"\$\{(\w+)\}", lambda m: EXAMPLE_ENV[m.group(1)], cmd)
    return cmd.replace("$$", "$").replace("%%", "%")


def test_there_is_a_unit_for_the_control_plane_and_the_worker() -> None:
    assert {u.name for u in UNIT_FILES} == {"sandbox-control-plane.service", "sandbox-worker.service"}


@pytest.mark.parametrize("unit", UNIT_FILES, ids=lambda u: u.name)
def test_unit_command_line_is_accepted_by_the_cli(unit: Path) -> None:
    (cmd,) = _directives(unit, "ExecStart")
    args = _unescape(cmd).split()
    assert args[0] == "/opt/sandbox/bin/sandbox"
    # --help after the unit's options: click rejects an unknown option before it prints help.
    p = subprocess.run([sys.executable, "-m", "sandbox", *args[1:], "--help"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr


# Directives that give the unit its own mount namespace (systemd's exec_needs_mount_namespace()).
MOUNT_NAMESPACE_DIRECTIVES = ("ProtectSystem=", "ProtectHome=", "PrivateTmp=", "PrivateDevices=", "PrivateMounts=",
                              "ProtectKernelTunables=", "ProtectKernelModules=", "ProtectKernelLogs=",
                              "ProtectControlGroups=", "ProtectProc=", "ProcSubset=", "ReadWritePaths=",
                              "ReadOnlyPaths=", "InaccessiblePaths=", "BindPaths=", "BindReadOnlyPaths=",
                              "TemporaryFileSystem=", "RootDirectory=", "PrivateIPC=", "MountFlags=")


@pytest.mark.parametrize("unit", UNIT_FILES, ids=lambda u: u.name)
def test_unit_carries_the_hardening_directives(unit: Path) -> None:
    text = unit.read_text()
    for d in ("NoNewPrivileges=yes", "RestrictAddressFamilies=", "SystemCallFilter=@system-service",
              "CapabilityBoundingSet=", "RestrictNamespaces=yes", "RestrictSUIDSGID=yes", "LockPersonality=yes",
              "DevicePolicy=closed", "Environment=SANDBOX_STATE_DIR=/var/lib/sandbox"):
        assert d in text, f"{unit.name} lacks {d}"


def test_control_plane_is_confined_to_its_state_directory_and_loopback() -> None:
    text = (UNITS / "sandbox-control-plane.service").read_text()
    for d in ("ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes", "PrivateDevices=yes",
              "CapabilityBoundingSet=\n", "IPAddressDeny=any", "IPAddressAllow=localhost",
              "StateDirectory=sandbox sandbox/controlplane", "MemoryDenyWriteExecute=yes"):
        assert d in text, d


def test_worker_has_no_mount_namespace_so_dockerd_sees_its_workspace_mounts() -> None:
    """The worker loop-mounts session workspaces that dockerd bind-mounts into sandboxes. In a
    unit mount namespace those mounts never reach dockerd (propagation is made slave first), and
    a sandbox would write to the uncapped directory underneath."""
    lines = (UNITS / "sandbox-worker.service").read_text().splitlines()
    found = [line for line in lines for d in MOUNT_NAMESPACE_DIRECTIVES if line.startswith(d)]
    assert not found, found


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_units_verify_with_systemd_analyze(tmp_path: Path) -> None:
    for unit in UNIT_FILES:  # the binary is not installed here: point the units at one that is
        (tmp_path / unit.name).write_text(unit.read_text().replace("/opt/sandbox/bin/sandbox", "/bin/true"))
    p = subprocess.run(["systemd-analyze", "verify", *map(str, sorted(tmp_path.glob("*.service")))],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and not p.stderr.strip(), p.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the check wants root:root ownership; needs root to create it")
@pytest.mark.parametrize("mode,ok", [(0o600, True), (0o400, True), (0o640, False), (0o644, False), (0o604, False)])
def test_worker_refuses_an_environment_file_others_can_read(tmp_path: Path, mode: int, ok: bool) -> None:
    unit = UNITS / "sandbox-worker.service"
    assert _directives(unit, "EnvironmentFile") == ["/etc/sandbox/worker.env"]
    (pre,) = _directives(unit, "ExecStartPre")
    env_file = tmp_path / "worker.env"
    env_file.write_text("ANTHROPIC_ENVIRONMENT_KEY=not-a-real-key\n")
    env_file.chmod(mode)
    cmd = _unescape(pre).replace("/etc/sandbox/worker.env", str(env_file))
    m = re.fullmatch(r"/bin/sh -c '(.*)'", cmd)
    assert m, cmd
    p = subprocess.run(["/bin/sh", "-c", m.group(1)], capture_output=True, text=True, timeout=30)
    assert (p.returncode == 0) == ok, (oct(mode), p.stderr)
    if not ok:
        assert str(env_file) in p.stderr and "not-a-real-key" not in p.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_worker_refuses_an_environment_file_owned_by_another_user(tmp_path: Path) -> None:
    (pre,) = _directives(UNITS / "sandbox-worker.service", "ExecStartPre")
    env_file = tmp_path / "worker.env"
    env_file.write_text("ANTHROPIC_ENVIRONMENT_KEY=x\n")
    env_file.chmod(0o600)
    os.chown(env_file, 65534, 65534)
    m = re.fullmatch(r"/bin/sh -c '(.*)'", _unescape(pre).replace("/etc/sandbox/worker.env", str(env_file)))
    assert m
    p = subprocess.run(["/bin/sh", "-c", m.group(1)], capture_output=True, text=True, timeout=30)
    assert p.returncode != 0 and "root:root" in p.stderr
