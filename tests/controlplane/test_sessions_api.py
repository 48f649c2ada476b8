"""Conformance: the Sessions API calls the SDK worker makes (retrieve, events list/send/stream)."""

from __future__ import annotations

import queue
import socket
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlsplit

import anthropic
import pytest

from sandbox.controlplane import ControlPlane, LocalAdmin

from .helpers import env_client, wait_for


def test_session_retrieve_shape(cp: ControlPlane, admin: LocalAdmin) -> None:
    sid = admin.create_session(cp.environment_id, title="t", metadata={"k": "v"})
    s = env_client(cp).beta.sessions.retrieve(sid)
    assert s.id == sid and s.type == "session" and s.environment_id == cp.environment_id
    assert s.status == "idle" and s.title == "t" and s.metadata == {"k": "v"}
    assert s.agent.skills == [] and s.resources == [] and s.vault_ids == []
    assert s.agent.tools[0].type == "agent_toolset_20260401"


def test_events_send_stamps_and_list_filters(cp: ControlPlane, admin: LocalAdmin) -> None:
    sid = admin.create_session(cp.environment_id)
    t1 = admin.send_tool_use(sid, "bash", {"command": "ls"})
    t2 = admin.send_tool_use(sid, "read", {"file_path": "/x"})
    assert t1.startswith("sevt_") and t1 != t2
    client = env_client(cp)
    sent = client.beta.sessions.events.send(
        sid,
        events=[
            {"type": "user.tool_result", "tool_use_id": t1, "content": [{"type": "text", "text": "a"}], "is_error": False},
            {"type": "user.tool_result", "tool_use_id": t2, "content": [{"type": "text", "text": "b"}], "is_error": True},
        ],
    )
    assert sent.data and len(sent.data) == 2
    assert all(e.id.startswith("sevt_") and e.processed_at for e in sent.data)  # type: ignore[union-attr]
    events = client.beta.sessions.events
    everything = list(events.list(sid, limit=1000))
    assert [e.type for e in everything] == ["session.status_running", "agent.tool_use", "agent.tool_use", "user.tool_result", "user.tool_result"]
    assert [e.type for e in events.list(sid, order="desc", limit=2).data] == ["user.tool_result", "user.tool_result"]
    paged = list(events.list(sid, limit=2))  # follows next_page
    assert [e.id for e in paged] == [e.id for e in everything]
    only = list(events.list(sid, types=["agent.tool_use"]))
    assert [e.id for e in only] == [t1, t2]
    cut = everything[2].processed_at
    assert cut is not None
    assert [e.id for e in events.list(sid, created_at_gte=cut)] == [e.id for e in everything[2:]]
    assert [e.id for e in events.list(sid, created_at_gt=cut)] == [e.id for e in everything[3:]]
    assert [e.id for e in events.list(sid, created_at_lt=cut)] == [e.id for e in everything[:2]]
    future = datetime.now(timezone.utc) + timedelta(days=1)
    assert list(events.list(sid, created_at_gt=future)) == []


def test_duplicate_tool_result_is_idempotent(cp: ControlPlane, admin: LocalAdmin) -> None:
    # The SDK retries a post whose response it lost; a second result must not be stored or be a 4xx.
    sid = admin.create_session(cp.environment_id)
    tid = admin.send_tool_use(sid, "bash", {"command": "ls"})
    ev: Any = {"type": "user.tool_result", "tool_use_id": tid, "content": [{"type": "text", "text": "x"}]}
    events = env_client(cp).beta.sessions.events
    first = events.send(sid, events=[ev]).data[0]  # type: ignore[index]
    again = events.send(sid, events=[ev]).data[0]  # type: ignore[index]
    assert first.id == again.id
    assert len(admin.events(sid, types=["user.tool_result"])) == 1


def test_results_must_answer_a_real_call(cp: ControlPlane, admin: LocalAdmin) -> None:
    sid = admin.create_session(cp.environment_id)
    other = admin.create_session(cp.environment_id)
    foreign = admin.send_tool_use(other, "bash", {})
    events = env_client(cp).beta.sessions.events
    for bad in ("sevt_nope", foreign):
        with pytest.raises(anthropic.BadRequestError):
            events.send(sid, events=[{"type": "user.tool_result", "tool_use_id": bad, "content": []}])
    denied = admin.send_tool_use(sid, "bash", {"command": "rm -rf /"}, evaluated_permission="deny")
    with pytest.raises(anthropic.ConflictError):
        events.send(sid, events=[{"type": "user.tool_result", "tool_use_id": denied, "content": []}])


def test_confirmation_flow(cp: ControlPlane, admin: LocalAdmin) -> None:
    sid = admin.create_session(cp.environment_id)
    plain = admin.send_tool_use(sid, "bash", {})
    ask = admin.send_tool_use(sid, "bash", {"command": "sudo"}, evaluated_permission="ask")
    with pytest.raises(Exception):
        admin.confirm(sid, plain, allow=True)  # nothing to confirm
    admin.confirm(sid, ask, allow=False, deny_message="no")
    conf = admin.events(sid, types=["user.tool_confirmation"])
    assert conf[0]["result"] == "deny" and conf[0]["deny_message"] == "no"


def _stream_into(cp: ControlPlane, sid: str, out: "queue.Queue[object]", token: str | None = None) -> threading.Thread:
    def run() -> None:
        try:
            with env_client(cp, token).beta.sessions.events.stream(sid) as stream:
                out.put("open")
                for ev in stream:
                    out.put(ev)
            out.put("closed")
        except Exception as e:  # noqa: BLE001
            out.put(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert out.get(timeout=5) == "open"
    return t


def test_stream_delivers_new_events_and_closes_on_termination(cp: ControlPlane, admin: LocalAdmin) -> None:
    sid = admin.create_session(cp.environment_id)
    before = admin.send_tool_use(sid, "bash", {"command": "old"})
    out: queue.Queue[object] = queue.Queue()
    t = _stream_into(cp, sid, out)
    new = admin.send_tool_use(sid, "bash", {"command": "new"})
    ev = out.get(timeout=5)
    assert getattr(ev, "type", None) == "agent.tool_use" and ev.id == new and ev.id != before  # type: ignore[attr-defined]
    assert ev.input == {"command": "new"}  # type: ignore[attr-defined]
    admin.send_idle(sid)
    idle = out.get(timeout=5)
    assert idle.type == "session.status_idle" and idle.stop_reason.type == "end_turn"  # type: ignore[attr-defined]
    admin.terminate(sid)
    assert out.get(timeout=5).type == "session.status_terminated"  # type: ignore[attr-defined]
    assert out.get(timeout=5) == "closed"
    t.join(5)
    # A stream opened later replays the termination and ends, so a late runner stops too.
    out2: queue.Queue[object] = queue.Queue()
    _stream_into(cp, sid, out2)
    assert out2.get(timeout=5).type == "session.status_terminated"  # type: ignore[attr-defined]
    assert out2.get(timeout=5) == "closed"


def test_stream_sends_pings_in_sse_format(cp: ControlPlane, admin: LocalAdmin) -> None:
    sid = admin.create_session(cp.environment_id)
    u = urlsplit(cp.base_url)
    with socket.create_connection((u.hostname, u.port), timeout=5) as s:
        s.sendall(
            (
                f"GET /v1/sessions/{sid}/events/stream?beta=true HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {cp.environment_key}\r\nanthropic-version: 2023-06-01\r\n"
                "anthropic-beta: managed-agents-2026-04-01\r\n\r\n"
            ).encode()
        )
        buf = b""
        deadline = time.monotonic() + 5
        while b"event: ping" not in buf and time.monotonic() < deadline:
            buf += s.recv(4096)
        admin.send_tool_use(sid, "bash", {"command": "x"})
        while b"event: agent.tool_use\ndata: {" not in buf and time.monotonic() < deadline:
            buf += s.recv(4096)
    head = buf.split(b"\r\n\r\n", 1)[0].lower()
    assert b"content-type: text/event-stream" in head
    assert b'event: ping\ndata: {"type": "ping"}\n\n' in buf
    assert b"event: agent.tool_use\ndata: {" in buf


def test_dormant_session_is_requeued_by_new_tool_calls(cp: ControlPlane, admin: LocalAdmin) -> None:
    sid = admin.create_session(cp.environment_id)
    work = env_client(cp).beta.environments.work
    item = work.poll(cp.environment_id)
    assert item is not None
    admin.send_tool_use(sid, "bash", {})  # a live item exists: nothing new queued
    assert len(admin.work_items(sid)) == 1
    work.stop(item.id, environment_id=cp.environment_id, force=True)
    admin.send_idle(sid)  # status changes do not wake anyone
    assert len(admin.work_items(sid)) == 1
    admin.send_tool_use(sid, "bash", {"command": "again"})
    items = admin.work_items(sid)
    assert [i["state"] for i in items] == ["stopped", "queued"]
    again = work.poll(cp.environment_id)
    assert again is not None and again.data.id == sid and again.id != item.id
    # a user message to a dormant session wakes it too
    work.stop(again.id, environment_id=cp.environment_id, force=True)
    admin.post_events(sid, [{"type": "user.message", "content": [{"type": "text", "text": "hi"}]}])
    assert admin.work_items(sid)[-1]["state"] == "queued"


def test_termination_stops_undelivered_work_and_refuses_events(cp: ControlPlane, admin: LocalAdmin) -> None:
    sid = admin.create_session(cp.environment_id)
    admin.terminate(sid)
    assert [i["state"] for i in admin.work_items(sid)] == ["stopped"]
    assert env_client(cp).beta.sessions.retrieve(sid).status == "terminated"
    with pytest.raises(anthropic.ConflictError):
        env_client(cp).beta.sessions.events.send(sid, events=[{"type": "user.message", "content": [{"type": "text", "text": "x"}]}])
    assert wait_for(lambda: env_client(cp).beta.environments.work.poll(cp.environment_id) is None or True)
