"""The worker fails closed on its self-test and leaves a verifiable trail per session."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from sandbox.audit.trail import verify
from sandbox.controlplane import ControlPlane, LocalAdmin
from sandbox.worker import Worker
from sandbox.worker.credentials import EnvironmentKey
from sandbox.worker.worker import WorkerConfig, WorkerError

from .helpers import LogCapture, call, wait_for

pytestmark = pytest.mark.docker

SECRET_LOOKING = "sk-ant-oat01-this-must-only-appear-as-a-digest"


def test_worker_refuses_to_serve_when_a_canary_attack_succeeds(cp: ControlPlane, tmp_path: Path,
                                                               docker_client) -> None:
    weak = tmp_path / "ptrace-allowed.yaml"
    weak.write_text("extends: worker\nseccomp: {extra_allow: [ptrace]}\n"
                    "unsafe: {seccomp.allow.ptrace: the canary must catch this}\n")  # declared, or it would not load
    worker = Worker(WorkerConfig(base_url=cp.base_url, environment_id=cp.environment_id,
                                 state_dir=tmp_path / "w", profile=str(weak)),
                    EnvironmentKey(cp.environment_key, "test"))
    with pytest.raises(WorkerError, match="refusing to serve.*seccomp"):
        worker._setup()


def test_each_session_leaves_a_verifiable_trail_with_digests_only(
        cp: ControlPlane, admin: LocalAdmin, start_worker: Callable[..., Worker], worker_logs: LogCapture) -> None:
    worker = start_worker()
    sid = admin.create_session(cp.environment_id)
    assert not call(admin, sid, "write", {"file_path": "a.txt", "content": SECRET_LOOKING})[0]
    assert not call(admin, sid, "bash", {"command": "cat a.txt"})[0]
    admin.terminate(sid)
    wait_for(lambda: worker.sessions_in_flight == 0, what="the session to end")
    assert worker.store is not None
    path = worker.store.trail_path(sid)  # in the session store: every run of the session, any worker
    text = path.read_text()
    assert SECRET_LOOKING not in text
    records = [json.loads(line) for line in text.splitlines()]
    kinds = [r.get("kind") for r in records]
    assert kinds[0] == "policy" and kinds.count("tool_call") == 2 and "lifecycle" in kinds
    assert records[0]["policy_digest"] == worker.policy.digest()  # type: ignore[union-attr]
    assert all(len(r.get("input_digest", "x" * 64)) >= 64 for r in records if r.get("kind") == "tool_call")
    closed = worker_logs.events("trail_closed")[-1]
    result = verify(path, expect_head=closed["head"])
    assert result.ok, result
