"""A worker whose event loop is stuck serves nobody, yet its health server (a thread of its own) still
answers: the liveness probe must see the stall, not only a dead process."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from sandbox.controlplane import ControlPlane
from sandbox.kube.probe import check
from sandbox.worker import EnvironmentKey, Worker, WorkerConfig
from sandbox.worker.runner import BackgroundWorker

from .helpers import wait_for

pytestmark = pytest.mark.docker


def test_a_worker_whose_event_loop_is_stuck_fails_liveness_while_its_health_server_still_answers(
        cp: ControlPlane, tmp_path: Path, docker_client: Any) -> None:
    worker = Worker(WorkerConfig(base_url=cp.base_url, environment_id=cp.environment_id, state_dir=tmp_path / "w",
                                 store_dir=tmp_path / "sessions", max_sessions=2, warm=0, lease_ttl=10,
                                 metrics_port=0), EnvironmentKey(cp.environment_key, "test"))
    bw = BackgroundWorker(worker).start()
    try:
        port = worker.health_port
        assert port
        wait_for(lambda: check("live", port, max_loop_stall=2.0)[0], timeout=30, what="a live worker to read alive")

        async def stuck() -> None:
            time.sleep(10)  # a blocking call on the event loop: what the stall check is for

        blocked = bw._portal.start_task_soon(stuck)  # type: ignore[union-attr]
        ok, why = wait_for(lambda: (lambda r: r if not r[0] else None)(check("live", port, max_loop_stall=2.0)),
                           timeout=9, interval=0.2, what="liveness to see the stuck loop")
        assert not ok and why.startswith("stalled: the worker's event loop has not run for"), why
        # the same answer with the default threshold still reads alive: a short stall is no restart
        assert check("live", port)[0] and check("ready", port)[0]
        blocked.result(timeout=30)
        wait_for(lambda: check("live", port, max_loop_stall=2.0)[0], timeout=10, what="the loop to beat again")
    finally:
        bw.stop(timeout=90)
