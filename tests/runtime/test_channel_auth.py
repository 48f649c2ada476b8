"""The host accepts only frames it can attribute to the agent (no Docker needed).

A real socket pair plays the attach stream: the test writes what a workload that
somehow reached the agent's stdout could write - frames without the key, frames
replayed, frames reordered - and checks the channel refuses them and says why."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import struct
import time

import pytest

from sandbox.channel import AgentChannel


def frame(payload: bytes, stream: int = 1) -> bytes:
    return struct.pack(">BxxxI", stream, len(payload)) + payload


def signed(key: bytes, seq: int, ev: dict, direction: bytes = b"A") -> bytes:
    body = json.dumps(ev).encode()
    mac = hmac.new(key, direction + seq.to_bytes(8, "big") + body, hashlib.sha256).hexdigest()[:32]
    return mac.encode() + b" " + body + b"\n"


@pytest.fixture
def pair():
    host, agent = socket.socketpair()
    key = b"k" * 32
    ch = AgentChannel(host, key=key)
    yield ch, agent, key
    ch.close()
    agent.close()


def wait_closed(ch: AgentChannel) -> None:
    assert ch.closed.wait(5), "channel stayed open"


def test_authentic_frames_are_delivered(pair) -> None:
    ch, agent, key = pair
    rid, q = ch.open_request()
    agent.sendall(frame(signed(key, 0, {"id": rid, "ev": "exit", "code": 3})))
    assert q.get(timeout=5) == {"id": rid, "ev": "exit", "code": 3}
    assert not ch.violation


def test_unsigned_frame_in_the_old_format_is_refused(pair) -> None:
    ch, agent, _ = pair
    rid, q = ch.open_request()
    agent.sendall(frame(json.dumps({"id": rid, "ev": "exit", "code": 0}).encode() + b"\n"))
    wait_closed(ch)
    assert ch.violation and "authentication" in ch.close_reason
    assert q.get(timeout=5) is None  # the waiting call learns the channel is gone, not a forged exit


def test_frame_under_a_guessed_key_is_refused(pair) -> None:
    ch, agent, _ = pair
    rid, _q = ch.open_request()
    agent.sendall(frame(signed(b"g" * 32, 0, {"id": rid, "ev": "exit", "code": 0})))
    wait_closed(ch)
    assert ch.violation


def test_replayed_frame_is_refused(pair) -> None:
    ch, agent, key = pair
    rid, q = ch.open_request()
    good = signed(key, 0, {"id": rid, "ev": "out", "fd": 1, "data": ""})
    agent.sendall(frame(good))
    assert q.get(timeout=5)["ev"] == "out"
    agent.sendall(frame(good))  # the same bytes again: sequence 0 was spent
    wait_closed(ch)
    assert ch.violation


def test_agent_stderr_is_diagnostics_never_events(pair) -> None:
    ch, agent, key = pair
    rid, q = ch.open_request()
    agent.sendall(frame(signed(key, 0, {"id": rid, "ev": "exit", "code": 0}), stream=2))
    time.sleep(0.2)
    assert q.empty() and not ch.closed.is_set()
    assert b'"ev": "exit"' in bytes(ch.diagnostics)


def test_a_frame_signed_for_the_other_direction_is_refused(pair) -> None:
    """A request the host sent (direction H) echoed back cannot pass as an event (direction A)."""
    ch, agent, key = pair
    rid, _q = ch.open_request()
    agent.sendall(frame(signed(key, 0, {"id": rid, "ev": "exit", "code": 0}, direction=b"H")))
    wait_closed(ch)
    assert ch.violation


def test_hello_then_every_request_is_signed_in_sequence(pair) -> None:
    ch, agent, key = pair
    ch.hello(12.5, 5.0)
    ch.send({"op": "ping", "id": 1})
    ch.send({"op": "ping", "id": 2})
    time.sleep(0.1)
    lines = agent.recv(65536).split(b"\n")
    assert json.loads(lines[0]) == {"op": "hello", "key": key.hex(), "session_s": 12.5, "watchdog_s": 5.0}
    for seq, line in enumerate(lines[1:3]):
        got, body = line.split(b" ", 1)
        want = hmac.new(key, b"H" + seq.to_bytes(8, "big") + body, hashlib.sha256).hexdigest()[:32].encode()
        assert got == want and json.loads(body) == {"op": "ping", "id": seq + 1}
    with pytest.raises(Exception, match="hello sent twice"):
        ch.hello(1.0)  # the key goes out once
