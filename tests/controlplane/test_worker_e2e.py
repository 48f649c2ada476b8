"""End to end: the SDK's own EnvironmentWorker serves sessions from the local control plane.

We play the model (inject `agent.tool_use`), the SDK worker polls, acks,
heartbeats, streams, runs the tool and posts `user.tool_result`; ending the
turn or terminating the session ends its run and the item gets stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anthropic
from anthropic.lib.environments import EnvironmentWorker
from anthropic.lib.tools import beta_async_tool

from sandbox.controlplane import ControlPlane, LocalAdmin

from .helpers import env_client

T = TypeVar("T")

calls: list[str] = []


@beta_async_tool(name="bash", input_schema={"type": "object", "properties": {"command": {"type": "string"}}})
async def fake_bash(command: str = "") -> str:
    """A stand-in for bash: records the call and answers with a fixed string."""
    calls.append(command)
    return f"fake bash ran: {command}"


async def _eventually(fn: Callable[[], T | None], timeout: float = 15.0) -> T:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await asyncio.to_thread(fn)
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.03)


def _result_for(admin: LocalAdmin, sid: str, tool_use_id: str) -> Callable[[], dict[str, Any] | None]:
    def find() -> dict[str, Any] | None:
        for ev in admin.events(sid, types=["user.tool_result"]):
            if ev["tool_use_id"] == tool_use_id:
                return ev
        return None

    return find


def _item_stopped(admin: LocalAdmin, sid: str) -> Callable[[], bool]:
    return lambda: all(i["state"] == "stopped" for i in admin.work_items(sid))


async def _with_worker(
    worker: EnvironmentWorker, client: anthropic.AsyncAnthropic, body: Callable[[], Awaitable[None]]
) -> None:
    task = asyncio.create_task(worker.run())
    try:
        await body()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await client.close()


def _client(cp: ControlPlane) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=cp.base_url, auth_token=cp.environment_key, api_key=None)


def test_sdk_worker_runs_a_tool_call_and_stops_after_idle(cp: ControlPlane, admin: LocalAdmin, tmp_path: Path) -> None:
    calls.clear()
    sid = admin.create_session(cp.environment_id)
    client = _client(cp)
    worker = EnvironmentWorker(
        client, environment_id=cp.environment_id, environment_key=cp.environment_key,
        tools=[fake_bash], workdir=tmp_path, max_idle=0.3,
    )

    async def body() -> None:
        tid = await asyncio.to_thread(admin.send_tool_use, sid, "bash", {"command": "echo hi"})
        result = await _eventually(_result_for(admin, sid, tid))
        assert result["is_error"] is False
        assert result["content"] == [{"type": "text", "text": "fake bash ran: echo hi"}]
        # An ask-gated call waits for the user's verdict.
        gated = await asyncio.to_thread(admin.send_tool_use, sid, "bash", {"command": "gated"}, "ask")
        await asyncio.sleep(0.3)
        assert "gated" not in calls
        await asyncio.to_thread(admin.confirm, sid, gated, True)
        await _eventually(_result_for(admin, sid, gated))
        # A tool this worker does not own is left pending for its owner.
        await asyncio.to_thread(admin.send_tool_use, sid, "not_mine", {})
        await asyncio.to_thread(admin.send_idle, sid)
        await _eventually(_item_stopped(admin, sid))

    asyncio.run(_with_worker(worker, client, body))
    assert calls == ["echo hi", "gated"]
    assert len(admin.events(sid, types=["user.tool_result"])) == 2
    item = admin.work_items(sid)[0]
    assert item["acknowledged_at"] and item["started_at"] and item["latest_heartbeat_at"] and item["stopped_at"]


def test_sdk_reference_toolset_and_termination(cp: ControlPlane, admin: LocalAdmin, tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    sid = admin.create_session(cp.environment_id)
    # tools=None: the SDK's own agent_toolset_20260401 (bash, read, write, edit, glob, grep) in workdir
    client = _client(cp)
    worker = EnvironmentWorker(client, environment_id=cp.environment_id, environment_key=cp.environment_key, workdir=workdir)

    async def body() -> None:
        path = str(workdir / "hello.txt")
        w = await asyncio.to_thread(admin.send_tool_use, sid, "write", {"file_path": path, "content": "hello\n"})
        assert "wrote" in (await _eventually(_result_for(admin, sid, w)))["content"][0]["text"]
        r = await asyncio.to_thread(admin.send_tool_use, sid, "read", {"file_path": path})
        assert "hello" in (await _eventually(_result_for(admin, sid, r)))["content"][0]["text"]
        bad = await asyncio.to_thread(admin.send_tool_use, sid, "read", {"file_path": "/etc/passwd"})
        assert (await _eventually(_result_for(admin, sid, bad)))["is_error"] is True  # outside the workdir
        await asyncio.to_thread(admin.terminate, sid)
        await _eventually(_item_stopped(admin, sid))

    asyncio.run(_with_worker(worker, client, body))
    assert (workdir / "hello.txt").read_text() == "hello\n"


def test_handle_item_runs_on_the_sessions_token_alone(cp: ControlPlane, admin: LocalAdmin, tmp_path: Path) -> None:
    # A sandbox handed only the work secret (never the environment key) can serve its item.
    calls.clear()
    sid = admin.create_session(cp.environment_id)
    env = env_client(cp)
    item = env.beta.environments.work.poll(cp.environment_id)
    assert item is not None
    env.beta.environments.work.ack(item.id, environment_id=cp.environment_id)
    # The parent client's own credential is worthless here; only the secret's token can work.
    parent = anthropic.AsyncAnthropic(base_url=cp.base_url, auth_token="sk-ant-oat01-not-a-real-key", api_key=None)
    worker = EnvironmentWorker(parent, tools=[fake_bash], workdir=tmp_path, max_idle=0.3)

    async def main() -> None:
        task = asyncio.create_task(
            worker.handle_item(work_id=item.id, environment_id=cp.environment_id, session_id=sid, work_secret=item.secret)
        )
        tid = await asyncio.to_thread(admin.send_tool_use, sid, "bash", {"command": "token only"})
        await _eventually(_result_for(admin, sid, tid))
        await asyncio.to_thread(admin.send_idle, sid)
        await asyncio.wait_for(task, 15)
        await parent.close()

    asyncio.run(main())
    assert calls == ["token only"]
    assert admin.work_items(sid)[0]["state"] == "stopped"
