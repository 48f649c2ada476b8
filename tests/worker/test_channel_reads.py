"""The agent channel reads the attach stream in large reads (sandbox/channel.py): however the stream is cut
into reads - a frame split at any byte, many frames in one read - the events reach their requests whole and in
order, stderr stays diagnostics, and a forged frame inside a batch still ends the channel (no Docker needed)."""

from __future__ import annotations

import hashlib
import hmac
import json
import queue
import socket
import struct
from typing import Any

from sandbox.channel import AgentChannel

KEY = b"r" * 32


def frame(payload: bytes, stream: int = 1) -> bytes:
    return struct.pack(">BxxxI", stream, len(payload)) + payload


def signed(seq: int, ev: dict[str, Any], key: bytes = KEY) -> bytes:
    body = json.dumps(ev).encode()
    return hmac.new(key, b"A" + seq.to_bytes(8, "big") + body, hashlib.sha256).hexdigest()[:32].encode() \
        + b" " + body + b"\n"


def _events(q: queue.Queue[dict[str, Any] | None], n: int) -> list[dict[str, Any] | None]:
    return [q.get(timeout=5) for _ in range(n)]


def test_frames_split_at_every_byte_and_batched_arrive_whole_and_in_order() -> None:
    host, agent = socket.socketpair()
    ch = AgentChannel(host, key=KEY)
    try:
        rid, q = ch.open_request()
        lines = [signed(i, {"id": rid, "ev": "out", "n": i, "pad": "x" * (i * 97)}) for i in range(40)]
        # One line across two frames, a stderr frame between events, then the rest in frames of any size.
        stream = frame(lines[0][:10]) + frame(lines[0][10:]) + frame(b"agent: a warning\n", stream=2)
        stream += b"".join(frame(line) for line in lines[1:20]) + frame(b"".join(lines[20:]))
        for i in range(0, len(stream), 7):  # 7-byte writes: headers and payloads cut everywhere
            agent.sendall(stream[i:i + 7])
        got = _events(q, 40)
        assert [ev["n"] for ev in got if ev] == list(range(40))
        assert bytes(ch.diagnostics) == b"agent: a warning\n"
        assert not ch.closed.is_set()
        big = b"".join(frame(signed(40 + i, {"id": rid, "ev": "out", "n": 40 + i})) for i in range(200))
        agent.sendall(big)  # 200 frames at once: one read holds many
        assert [ev["n"] for ev in _events(q, 200) if ev] == list(range(40, 240))
    finally:
        ch.close()
        agent.close()


def test_a_forged_frame_inside_a_batch_ends_the_channel_after_the_authentic_ones() -> None:
    host, agent = socket.socketpair()
    ch = AgentChannel(host, key=KEY)
    try:
        rid, q = ch.open_request()
        batch = frame(signed(0, {"id": rid, "ev": "out", "n": 0}))
        batch += frame(signed(1, {"id": rid, "ev": "out", "n": 1}, key=b"x" * 32))  # not the channel's key
        batch += frame(signed(1, {"id": rid, "ev": "out", "n": 2}))
        agent.sendall(batch)
        assert ch.closed.wait(5)
        assert ch.violation
        first, then = _events(q, 2)
        assert first is not None and first["n"] == 0
        assert then is None  # the request is ended; the frame after the forged one never arrives
    finally:
        ch.close()
        agent.close()
