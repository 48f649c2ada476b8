"""A channel handed to an asyncio event loop (`AgentChannel.read_on_loop`, what the worker does) is read by the
loop's own reader callback: events reach their requests on the loop thread, with no reader thread between. The
hub's guarantees hold there unchanged: a forged, oversized or unparsable frame, or EOF, ends that channel only;
one read per wake-up (a flooding sandbox cannot hold the loop, a sandbox that stops mid-frame cannot block it);
the hand-over never splits, loses or repeats an event; a channel closed from another thread leaves the loop's
selector before its descriptor is closed (the number is reused at once).

Each test runs on the plain asyncio loop and on uvloop (the worker's). Real socket pairs play the attach
streams, as in test_channel_hub.py."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from sandbox import channel as chmod
from sandbox.channel import AgentChannel

from .test_channel_hub import Agent, frame

LOOPS = ["asyncio", "uvloop"]


def run(kind: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    if kind == "uvloop":
        uvloop.run(main())
    else:
        asyncio.run(main())


class Inbox:
    """A request's events as the worker's tools get them (a sink), with the thread each arrived on."""

    def __init__(self, ch: AgentChannel) -> None:
        self.events: list[dict[str, Any] | None] = []
        self.threads: set[str] = set()
        self._changed = asyncio.Event()
        self.rid = ch.open_request_with(self._put)

    def _put(self, ev: dict[str, Any] | None) -> None:
        self.events.append(ev)
        self.threads.add(threading.current_thread().name)
        self._changed.set()  # only valid on the loop thread: a sink run elsewhere breaks the test

    async def wait_for(self, n: int, timeout: float = 10.0) -> list[dict[str, Any] | None]:
        async def until() -> None:
            while len(self.events) < n:
                self._changed.clear()
                await self._changed.wait()
        await asyncio.wait_for(until(), timeout)
        return self.events


async def on_loop(*agents: Agent) -> None:
    loop = asyncio.get_running_loop()
    for a in agents:
        assert a.ch.read_on_loop(loop)


@pytest.mark.parametrize("kind", LOOPS)
def test_events_of_a_channel_handed_to_the_loop_reach_their_requests_on_the_loop_thread(kind: str) -> None:
    async def main() -> None:
        agents = [Agent() for _ in range(4)]
        try:
            inboxes = [Inbox(a.ch) for a in agents]
            await on_loop(*agents)
            hub = chmod._the_hub()
            assert not any(a.ch._fd in hub._chans for a in agents)  # the hub no longer reads them
            for round_ in range(3):
                for i, (a, box) in enumerate(zip(agents, inboxes)):
                    a.sock.sendall(b"".join(a.event({"id": box.rid, "ev": "out", "who": i, "n": round_ * 2 + k})
                                            for k in range(2)))
            for i, box in enumerate(inboxes):
                got = await box.wait_for(6)
                assert [(ev["who"], ev["n"]) for ev in got if ev] == [(i, n) for n in range(6)]
                assert box.threads == {threading.current_thread().name}  # the loop's thread, no hop
        finally:
            for a in agents:
                a.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_a_forged_frame_ends_that_loop_channel_only(kind: str) -> None:
    async def main() -> None:
        victim, other, on_hub = Agent(), Agent(), Agent()
        try:
            vbox, obox = Inbox(victim.ch), Inbox(other.ch)
            hrid, hq = on_hub.ch.open_request()
            await on_loop(victim, other)
            victim.sock.sendall(victim.event({"id": vbox.rid, "ev": "out", "n": 0})
                                + victim.event({"id": vbox.rid, "ev": "exit", "code": 0}, key=b"f" * 32)
                                + victim.event({"id": vbox.rid, "ev": "out", "n": 2}))
            assert await vbox.wait_for(2) == [{"id": vbox.rid, "ev": "out", "n": 0}, None]
            assert victim.ch.closed.is_set() and victim.ch.violation
            assert "authentication" in victim.ch.close_reason
            assert not victim.ch._on_loop  # no longer read by the loop
            other.send({"id": obox.rid, "ev": "exit", "code": 7})
            assert await obox.wait_for(1) == [{"id": obox.rid, "ev": "exit", "code": 7}]
            on_hub.send({"id": hrid, "ev": "exit", "code": 3})
            assert await asyncio.to_thread(hq.get, timeout=5) == {"id": hrid, "ev": "exit", "code": 3}
            victim.send({"id": vbox.rid, "ev": "out", "n": 3})  # authentic, after the forged one: never read
            await asyncio.sleep(0.1)
            assert len(vbox.events) == 2
            assert not other.ch.closed.is_set() and not other.ch.violation
        finally:
            for a in (victim, other, on_hub):
                a.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_an_oversized_event_ends_that_loop_channel_only(kind: str) -> None:
    async def main() -> None:
        big, other = Agent(), Agent()
        try:
            bbox, obox = Inbox(big.ch), Inbox(other.ch)
            await on_loop(big, other)
            blob = frame(b"x" * (1 << 20))

            def send_17_mib_without_a_newline() -> None:
                try:
                    for _ in range(17):
                        big.sock.sendall(blob)
                except OSError:
                    pass  # the host closed it

            sender = threading.Thread(target=send_17_mib_without_a_newline, daemon=True)
            sender.start()
            assert await bbox.wait_for(1, timeout=20) == [None]
            assert "oversized" in big.ch.close_reason
            other.send({"id": obox.rid, "ev": "exit", "code": 0})
            assert await obox.wait_for(1) == [{"id": obox.rid, "ev": "exit", "code": 0}]
            big.ch.close()
            await asyncio.to_thread(sender.join, 5)
        finally:
            big.close()
            other.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_an_event_that_breaks_the_parser_and_an_agent_that_exits_end_their_loop_channels_only(kind: str) -> None:
    async def main() -> None:
        deep, gone, other = Agent(), Agent(), Agent()
        try:
            dbox, gbox, obox = Inbox(deep.ch), Inbox(gone.ch), Inbox(other.ch)
            await on_loop(deep, gone, other)
            await asyncio.to_thread(deep.send, "[" * 200_000 + "]" * 200_000)  # json.loads: RecursionError
            gone.sock.sendall(gone.event({"id": gbox.rid, "ev": "out"})[:-5])  # cut short, then EOF
            gone.sock.shutdown(socket.SHUT_WR)
            assert await dbox.wait_for(1) == [None]
            assert deep.ch.close_reason.startswith("channel error: RecursionError")
            assert await gbox.wait_for(1) == [None]
            assert gone.ch.close_reason == "agent exited" and not gone.ch.violation
            other.send({"id": obox.rid, "ev": "exit", "code": 0})
            assert await obox.wait_for(1) == [{"id": obox.rid, "ev": "exit", "code": 0}]
        finally:
            for a in (deep, gone, other):
                a.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_a_sandbox_that_stops_mid_frame_or_floods_does_not_hold_the_loop(kind: str) -> None:
    """One read per wake-up, never waiting: a frame cut off mid-way leaves the loop free, and a sandbox
    that writes without pause is read once per turn of the loop, not until it pauses."""
    async def main() -> None:
        stuck, flood, other = Agent(), Agent(), Agent()
        stop = threading.Event()
        ticks = [0]
        reads: list[int] = []  # the loop's turn at each read of the flooding channel that got bytes
        real_recv = flood.ch._recv

        def counted_recv() -> bytes | None:
            got = real_recv()
            if got:
                reads.append(ticks[0])
            return got

        flood.ch._recv = counted_recv  # type: ignore[method-assign]
        try:
            sbox, fbox, obox = Inbox(stuck.ch), Inbox(flood.ch), Inbox(other.ch)
            await on_loop(stuck, flood, other)
            stuck.sock.sendall(stuck.event({"id": sbox.rid, "ev": "out", "pad": "z" * 100})[:50])  # and no more

            def pour() -> None:
                try:
                    while not stop.is_set():
                        flood.sock.sendall(b"".join(flood.event({"id": fbox.rid, "ev": "out", "data": "y" * 2000})
                                                    for _ in range(200)))
                except OSError:
                    pass

            pourer = threading.Thread(target=pour, daemon=True)
            pourer.start()
            while len(reads) < 50:  # the loop turns while the flood is read
                await asyncio.sleep(0)
                ticks[0] += 1
            turns = list(reads)
            other.send({"id": obox.rid, "ev": "exit", "code": 0})
            assert await obox.wait_for(1, timeout=20) == [{"id": obox.rid, "ev": "exit", "code": 0}]
            assert pourer.is_alive()  # answered while the flood goes on
            assert len(turns) == len(set(turns)), "the flooding channel was read twice in one turn of the loop"
            assert sbox.events == [] and not stuck.ch.closed.is_set() and not flood.ch.closed.is_set()
        finally:
            stop.set()
            for a in (stuck, flood, other):
                a.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_handing_a_channel_to_the_loop_mid_stream_neither_loses_splits_nor_repeats_an_event(kind: str) -> None:
    async def main() -> None:
        a = Agent()
        try:
            box = Inbox(a.ch)
            data = b"".join(a.event({"id": box.rid, "ev": "out", "n": i, "pad": "p" * (i % 300)})
                            for i in range(3000))

            def dribble() -> None:
                for i in range(0, len(data), 4093):  # frames cut anywhere, read by the hub, then the loop
                    a.sock.sendall(data[i:i + 4093])
                    time.sleep(0.001)

            sender = threading.Thread(target=dribble, daemon=True)
            sender.start()
            while not box.events:
                await asyncio.sleep(0.001)
            await on_loop(a)  # the hub has read some, the loop reads the rest
            got = await box.wait_for(3000, timeout=30)
            assert [ev["n"] for ev in got if ev] == list(range(3000))
            assert len(box.threads) == 2  # both readers really took part
            assert not a.ch.closed.is_set()
            sender.join(5)
        finally:
            a.close()

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_loop_channels_closed_from_other_threads_never_get_each_others_events(kind: str) -> None:
    """`close` on another thread (the worker destroys sandboxes in threads) frees the descriptor only once the
    loop has let go of it; a new channel given the same number at once is read correctly."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        for i in range(60):
            a = Agent()
            fd = a.ch._fd
            box = Inbox(a.ch)
            await on_loop(a)
            a.send({"id": box.rid, "ev": "out", "token": i})
            assert await box.wait_for(1) == [{"id": box.rid, "ev": "out", "token": i}]
            if i % 2:
                a.send({"id": box.rid, "ev": "out", "token": "late"})  # in flight as the host closes
            await asyncio.to_thread(a.ch.close)
            assert a.ch.close_reason == "closed by host"
            assert box.events[-1] is None
            await asyncio.sleep(0)  # the loop lets go of the descriptor, then it is closed
            await asyncio.sleep(0)
            assert a.ch._sock_closed and not a.ch._on_loop
            a.sock.close()
            if kind == "asyncio":
                assert fd not in loop._selector.get_map()  # type: ignore[attr-defined]

    run(kind, main)


@pytest.mark.parametrize("kind", LOOPS)
def test_a_sink_that_raises_on_the_loop_stops_neither_the_loop_nor_its_channel(
        kind: str, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        a = Agent()
        try:
            def bad(ev: dict[str, Any] | None) -> None:
                raise RuntimeError("a handler bug")

            rid_bad = a.ch.open_request_with(bad)
            box = Inbox(a.ch)
            await on_loop(a)
            a.send({"id": rid_bad, "ev": "out"})
            a.send({"id": box.rid, "ev": "exit", "code": 0})
            assert await box.wait_for(1) == [{"id": box.rid, "ev": "exit", "code": 0}]
            assert not a.ch.closed.is_set()
        finally:
            a.close()

    with caplog.at_level(logging.ERROR):
        run(kind, main)
    assert "a request's event handler failed" in caplog.text


def test_a_closed_channel_is_not_handed_over() -> None:
    async def main() -> None:
        a = Agent()
        a.ch.close()
        assert not a.ch.read_on_loop(asyncio.get_running_loop())
        a.sock.close()

    asyncio.run(main())


@pytest.mark.parametrize("kind", LOOPS)
def test_a_channel_outliving_its_loop_is_read_by_the_hub_again(kind: str) -> None:
    """The sync API on a sandbox whose worker loop has ended (closed with its selector) is still answered."""
    a = Agent()
    try:
        async def main() -> None:
            box = Inbox(a.ch)
            await on_loop(a)
            a.send({"id": box.rid, "ev": "out", "n": 0})
            assert await box.wait_for(1) == [{"id": box.rid, "ev": "out", "n": 0}]
            a.ch.finish_request(box.rid)

        run(kind, main)
        rid, q = a.ch.open_request()
        assert a.ch._loop is None and a.ch._fd in chmod._the_hub()._chans
        a.send({"id": rid, "ev": "exit", "code": 0})
        assert q.get(timeout=5) == {"id": rid, "ev": "exit", "code": 0}
    finally:
        a.close()


@pytest.mark.parametrize("kind", LOOPS)
def test_a_close_racing_the_hand_over_never_leaves_a_closed_descriptor_registered(kind: str) -> None:
    """`close` on another thread while the loop takes the channel (held in the middle of the hand-over here):
    the close waits, then sees the loop and lets the loop close the descriptor once it has let go of it; the
    loop never registers a closed descriptor, and the next channel (the same number, often) works."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        a = Agent()
        hub = a.ch._hub
        in_hand_over = threading.Event()
        real_remove = hub.remove

        def slow_remove(ch: AgentChannel) -> None:
            if threading.current_thread() is threading.main_thread() and ch is a.ch:
                in_hand_over.set()
                time.sleep(0.2)  # the closer runs now
            real_remove(ch)

        def closer() -> None:
            in_hand_over.wait(5)
            a.ch.close()

        hub.remove = slow_remove  # type: ignore[method-assign]
        try:
            t = threading.Thread(target=closer)
            t.start()
            assert a.ch.read_on_loop(loop)  # no error: the descriptor was open when it was registered
        finally:
            del hub.remove
        await asyncio.to_thread(t.join, 5)
        for _ in range(3):
            await asyncio.sleep(0)
        assert a.ch.closed.is_set() and a.ch.close_reason == "closed by host"
        assert not a.ch._on_loop and a.ch._sock_closed  # the loop let go, then the descriptor was closed
        if kind == "asyncio":
            assert a.ch._fd not in loop._selector.get_map()  # type: ignore[attr-defined]
        a.sock.close()
        b = Agent()
        try:
            box = Inbox(b.ch)
            await on_loop(b)
            b.send({"id": box.rid, "ev": "exit", "code": 0})
            assert await box.wait_for(1) == [{"id": box.rid, "ev": "exit", "code": 0}]
        finally:
            b.close()

    run(kind, main)
