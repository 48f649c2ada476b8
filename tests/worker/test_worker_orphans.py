"""A killed worker leaves no sandbox behind, with no other worker or `gc` around to reap it.

The worker's sandboxes (the session's, mid-call, and the warm pool's) are bound to
the worker process: their agents exit when its end of the channel closes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sandbox.controlplane import ControlPlane, LocalAdmin

from .helpers import wait_for

pytestmark = pytest.mark.docker


def _owned(docker_client: Any, pid: int) -> list[Any]:
    # the low-level list: no per-container inspect that races AutoRemove (404 mid-list)
    rows = docker_client.api.containers(all=True, filters={"label": "org.sandbox.managed=true"})
    return [c["Id"] for c in rows if (c.get("Labels") or {}).get("org.sandbox.owner", "").split(":")[1:2] == [str(pid)]]


def _tool_started(log: Path, tool_use_id: str) -> bool:
    for line in log.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == "tool_exec" and rec.get("tool_use_id") == tool_use_id:
            return True
    return False


def test_kill_9_of_a_worker_mid_call_leaves_no_sandbox(cp: ControlPlane, admin: LocalAdmin, tmp_path: Path,
                                                       docker_client: Any) -> None:
    key_file = tmp_path / "env.key"
    key_file.write_text(cp.environment_key)
    key_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC_")}
    log = tmp_path / "w.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sandbox.cli", "worker", "--base-url", cp.base_url, "--environment-id",
             cp.environment_id, "--environment-key-file", str(key_file), "--state-dir", str(tmp_path / "wstate"),
             "--session-store", str(tmp_path / "sessions"), "--warm", "1", "--lease-ttl", "10"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        sid = admin.create_session(cp.environment_id)
        call = admin.send_tool_use(sid, "bash", {"command": "sleep 120; echo never"})
        wait_for(lambda: _tool_started(log, call), timeout=90, what="the worker to start the call")
        wait_for(lambda: len(_owned(docker_client, proc.pid)) >= 2, timeout=60,
                 what="the session's sandbox and a warm one")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        t0 = time.monotonic()
        wait_for(lambda: not _owned(docker_client, proc.pid), timeout=10,
                 what="the killed worker's sandboxes to go by themselves")
        assert time.monotonic() - t0 < 10
    finally:
        if proc.poll() is None:
            proc.kill()
        for cid in _owned(docker_client, proc.pid):
            try:
                docker_client.api.kill(cid)
            except Exception:  # noqa: BLE001 - already gone
                pass
