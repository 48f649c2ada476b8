"""A control plane killed -9 with calls queued and running comes back where it was; every result is
posted exactly once, and each call ran once (a counter file in the workspace)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.controlplane import LocalAdmin
from sandbox.controlplane.endpoint import read_admin_key, read_endpoint, read_environment_key
from sandbox.worker import EnvironmentKey, Worker, WorkerConfig
from sandbox.worker.runner import BackgroundWorker

from .helpers import free_port, results, text_of, wait_for, wait_result

pytestmark = pytest.mark.docker


class _Plane:
    """`sandbox control-plane` as a process, so it can be killed -9 and restarted on its state dir."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str) -> str:
        (self.state_dir / "endpoint.json").unlink(missing_ok=True)
        log = open(self.state_dir.parent / "cp.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen([sys.executable, "-m", "sandbox.cli", "control-plane", "--state-dir",
                                      str(self.state_dir), *extra], stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        ep = wait_for(lambda: _endpoint(self.state_dir), timeout=30, what="the control plane's endpoint.json")
        return str(ep.base_url)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _endpoint(state_dir: Path) -> Any:
    try:
        return read_endpoint(state_dir)
    except Exception:  # noqa: BLE001 - not written yet
        return None


@pytest.fixture
def plane(tmp_path: Path, docker_client: Any) -> Iterator[_Plane]:
    (tmp_path / "cp").mkdir(mode=0o700)
    p = _Plane(tmp_path / "cp")
    yield p
    p.stop()


def _worker(tmp_path: Path, plane: _Plane, base_url: str) -> BackgroundWorker:
    ep = read_endpoint(plane.state_dir)
    cfg = WorkerConfig(base_url=base_url, environment_id=ep.environment_id, state_dir=tmp_path / "w",
                       store_dir=tmp_path / "sessions", lease_ttl=10, max_idle=60.0, endpoint_dir=plane.state_dir,
                       selftest=False)
    return BackgroundWorker(Worker(cfg, EnvironmentKey(read_environment_key(plane.state_dir), "test"))).start()


def _run_through_a_kill(tmp_path: Path, plane: _Plane, base_url: str, restart: Any) -> None:
    bw = _worker(tmp_path, plane, base_url)
    try:
        with LocalAdmin(base_url, read_admin_key(plane.state_dir)) as admin:
            sid = admin.create_session(read_endpoint(plane.state_dir).environment_id)
            warm = admin.send_tool_use(sid, "bash", {"command": "echo warm >> count"})
            wait_result(admin, sid, warm, timeout=60)
            running = admin.send_tool_use(sid, "bash", {"command": "echo running >> count; sleep 3; echo slow"})
            wait_for(lambda: (rec := bw.worker.outbox.get(running)) is not None and rec.state == "running",  # type: ignore[union-attr]
                     what="the slow call to start")
            queued = [admin.send_tool_use(sid, "bash", {"command": f"echo q{i} >> count; echo q{i}"}) for i in range(4)]
        plane.kill9()  # calls running and queued; the worker keeps running them while the plane is gone
        new_url = restart()
        with LocalAdmin(new_url, read_admin_key(plane.state_dir)) as admin:
            for tid in [running, *queued]:
                wait_result(admin, sid, tid, timeout=90)
            got = Counter(ev["tool_use_id"] for ev in results(admin, sid))
            assert got == Counter({t: 1 for t in [warm, running, *queued]}), got  # every result posted once
            assert bw.worker.config.base_url == new_url  # same address, or followed through endpoint.json
            check = admin.send_tool_use(sid, "bash", {"command": "sort count | uniq -c | awk '{print $1}' | sort -u"})
            assert text_of(wait_result(admin, sid, check, timeout=60)) == "1"  # every call ran exactly once
            lines = admin.send_tool_use(sid, "bash", {"command": "wc -l < count"})
            assert text_of(wait_result(admin, sid, lines, timeout=60)) == "6"
            admin.terminate(sid)
    finally:
        bw.stop(timeout=90)


def test_kill_9_of_the_control_plane_it_comes_back_on_its_port_and_every_result_is_posted_once(
        tmp_path: Path, plane: _Plane) -> None:
    base_url = plane.start("--port", str(free_port()))
    assert json.loads((plane.state_dir / "endpoint.json").read_text())["base_url"] == base_url

    def restart() -> str:
        url = plane.start()  # no --port: the port recorded in its state dir
        assert url == base_url
        return url

    _run_through_a_kill(tmp_path, plane, base_url, restart)


def test_a_control_plane_that_cannot_have_its_port_back_is_followed_through_endpoint_json(
        tmp_path: Path, plane: _Plane) -> None:
    base_url = plane.start("--port", str(free_port()))
    port = int(base_url.rsplit(":", 1)[1])
    squatter = socket.socket()

    def restart() -> str:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))  # bound, not listening: the old address refuses connections
        url = plane.start("--port", str(free_port()))  # elsewhere
        assert url != base_url
        return url

    try:
        _run_through_a_kill(tmp_path, plane, base_url, restart)
    finally:
        squatter.close()
    assert os.path.exists(plane.state_dir / "port")


def test_a_control_plane_stopped_for_90s_loses_nothing_and_runs_nothing_twice(tmp_path: Path, plane: _Plane) -> None:
    import time

    base_url = plane.start("--port", str(free_port()))
    bw = _worker(tmp_path, plane, base_url)
    try:
        with LocalAdmin(base_url, read_admin_key(plane.state_dir), timeout=120) as admin:
            sid = admin.create_session(read_endpoint(plane.state_dir).environment_id)
            first = admin.send_tool_use(sid, "write", {"file_path": "kept.txt", "content": "kept"})
            wait_result(admin, sid, first, timeout=60)
            running = admin.send_tool_use(sid, "bash", {"command": "echo running >> count; sleep 2; echo slow"})
            wait_for(lambda: bw.worker.outbox.get(running) is not None,  # type: ignore[union-attr]
                     what="the call to start")
            queued = [admin.send_tool_use(sid, "bash", {"command": f"echo q{i} >> count"}) for i in range(3)]
            assert plane.proc is not None
            plane.proc.send_signal(signal.SIGSTOP)  # hangs every connection; longer than any lease
            try:
                time.sleep(90)
            finally:
                plane.proc.send_signal(signal.SIGCONT)
            for tid in [running, *queued]:
                wait_result(admin, sid, tid, timeout=120)
            check = admin.send_tool_use(sid, "bash", {"command": "cat kept.txt; echo; sort count | uniq -d | wc -l;"
                                                                 " wc -l < count"})
            assert text_of(wait_result(admin, sid, check, timeout=60)).split() == ["kept", "0", "4"]
            got = Counter(ev["tool_use_id"] for ev in results(admin, sid))
            assert got == Counter({t: 1 for t in [first, running, *queued, check]}), got
            admin.terminate(sid)
    finally:
        bw.stop(timeout=90)
