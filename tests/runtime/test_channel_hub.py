"""Every agent channel of a process is read by one thread (sandbox/channel.py, the hub): N sandboxes cost
one thread, and what goes wrong on one channel - a forged frame, EOF, a sink that raises, an event that
breaks the parser, the host closing it mid-stream - ends that channel only, never the reading of the others.

Real socket pairs play the attach streams (no Docker needed), except the last test, which runs real
sandboxes through the runtime."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import queue
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import pytest

from sandbox.channel import AgentChannel, ChannelClosed

KEY = b"h" * 32


def frame(payload: bytes, stream: int = 1) -> bytes:
    return struct.pack(">BxxxI", stream, len(payload)) + payload


def signed(seq: int, ev: dict[str, Any] | list[Any] | str, key: bytes = KEY) -> bytes:
    body = ev.encode() if isinstance(ev, str) else json.dumps(ev).encode()
    return hmac.new(key, b"A" + seq.to_bytes(8, "big") + body, hashlib.sha256).hexdigest()[:32].encode() \
        + b" " + body + b"\n"


class Agent:
    """The sandbox side of one channel: its socket, and its event sequence numbers."""

    def __init__(self) -> None:
        host, self.sock = socket.socketpair()
        self.ch = AgentChannel(host, key=KEY)
        self.seq = 0

    def event(self, ev: dict[str, Any] | str, *, key: bytes = KEY) -> bytes:
        data = frame(signed(self.seq, ev, key))
        self.seq += 1
        return data

    def send(self, ev: dict[str, Any] | str, *, key: bytes = KEY) -> None:
        self.sock.sendall(self.event(ev, key=key))

    def close(self) -> None:
        self.ch.close()
        self.sock.close()


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    made: list[Agent] = []
    yield made
    for a in made:
        a.close()


def hub_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "agent-channels"]


def test_many_channels_are_read_by_one_thread_and_a_burst_reaches_each_its_own(agents: list[Agent]) -> None:
    agents += [Agent() for _ in range(24)]
    assert len(hub_threads()) == 1
    assert not [t for t in threading.enumerate() if t.name == "agent-channel"]  # no thread per channel
    reqs = [a.ch.open_request() for a in agents]
    for round_ in range(5):  # every sandbox answers at once, several events each
        for i, (a, (rid, _)) in enumerate(zip(agents, reqs)):
            a.sock.sendall(b"".join(a.event({"id": rid, "ev": "out", "who": i, "n": round_ * 3 + k})
                                    for k in range(3)))
    for i, (rid, q) in enumerate(reqs):
        got = [q.get(timeout=5) for _ in range(15)]
        assert [(ev["who"], ev["n"]) for ev in got if ev] == [(i, n) for n in range(15)]
        assert q.empty()
    assert not any(a.ch.closed.is_set() for a in agents)


def test_a_forged_frame_ends_that_channel_only(agents: list[Agent]) -> None:
    agents += [Agent() for _ in range(3)]
    reqs = [a.ch.open_request() for a in agents]
    victim = agents[1]
    victim.send({"id": reqs[1][0], "ev": "exit", "code": 0}, key=b"f" * 32)  # a workload without the key
    assert victim.ch.closed.wait(5)
    assert victim.ch.violation and "authentication" in victim.ch.close_reason
    assert reqs[1][1].get(timeout=5) is None
    assert victim.ch.ready.get(timeout=5) == {"ev": "closed"}
    for a, (rid, q) in (p for j, p in enumerate(zip(agents, reqs)) if j != 1):
        a.send({"id": rid, "ev": "exit", "code": 7})
        assert q.get(timeout=5) == {"id": rid, "ev": "exit", "code": 7}
        assert not a.ch.closed.is_set() and not a.ch.violation
    # and the victim stays ended: authentic frames after the forged one are not read
    victim.send({"id": reqs[1][0], "ev": "exit", "code": 0})
    time.sleep(0.1)
    assert reqs[1][1].empty()


def test_an_agent_that_exits_ends_its_channel_as_agent_exited_and_the_others_live(agents: list[Agent]) -> None:
    agents += [Agent(), Agent()]
    (rid0, q0), (rid1, q1) = agents[0].ch.open_request(), agents[1].ch.open_request()
    agents[0].sock.sendall(agents[0].event({"id": rid0, "ev": "out"})[:-5])  # a frame cut short, then EOF
    agents[0].sock.shutdown(socket.SHUT_WR)
    assert agents[0].ch.closed.wait(5)
    assert agents[0].ch.close_reason == "agent exited" and not agents[0].ch.violation
    assert q0.get(timeout=5) is None
    with pytest.raises(ChannelClosed, match="agent exited"):
        agents[0].ch.open_request()
    agents[1].send({"id": rid1, "ev": "exit", "code": 1})
    assert q1.get(timeout=5) == {"id": rid1, "ev": "exit", "code": 1}


def test_a_sink_that_raises_neither_stops_the_hub_nor_its_own_channel(agents: list[Agent],
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    agents += [Agent(), Agent()]
    seen: list[dict[str, Any] | None] = []

    def bad_sink(ev: dict[str, Any] | None) -> None:
        seen.append(ev)
        raise RuntimeError("a handler bug")

    rid_bad = agents[0].ch.open_request_with(bad_sink)
    rid_ok, q_ok = agents[0].ch.open_request()
    got: queue.Queue[dict[str, Any] | None] = queue.Queue()
    rid_other = agents[1].ch.open_request_with(got.put)
    threads: list[str] = []
    rid_where = agents[1].ch.open_request_with(lambda ev: threads.append(threading.current_thread().name))
    agents[0].send({"id": rid_bad, "ev": "out"})
    agents[0].send({"id": rid_ok, "ev": "exit", "code": 0})
    agents[1].send({"id": rid_other, "ev": "exit", "code": 2})
    agents[1].send({"id": rid_where, "ev": "out"})
    assert q_ok.get(timeout=5) == {"id": rid_ok, "ev": "exit", "code": 0}  # the same channel, after the raise
    assert got.get(timeout=5) == {"id": rid_other, "ev": "exit", "code": 2}  # another channel
    assert seen == [{"id": rid_bad, "ev": "out"}]
    assert "a request's event handler failed" in caplog.text
    assert not agents[0].ch.closed.is_set()
    end = time.monotonic() + 5
    while not threads and time.monotonic() < end:  # sent after the event waited for above: may come later
        time.sleep(0.01)
    assert threads == ["agent-channels"]  # sinks run on the reader thread, as documented


def test_an_event_that_breaks_the_parser_ends_that_channel_only(agents: list[Agent]) -> None:
    """json.loads raises RecursionError (not ValueError) on deep nesting: a thread per channel died of it
    and left its channel open and its requests waiting forever; the hub ends that channel and serves on."""
    agents += [Agent(), Agent()]
    (_, q0), (rid1, q1) = agents[0].ch.open_request(), agents[1].ch.open_request()
    agents[0].send("[" * 200_000 + "]" * 200_000)
    assert agents[0].ch.closed.wait(5)
    assert agents[0].ch.close_reason.startswith("channel error: RecursionError")
    assert q0.get(timeout=5) is None
    agents[1].send({"id": rid1, "ev": "exit", "code": 0})
    assert q1.get(timeout=5) == {"id": rid1, "ev": "exit", "code": 0}


def test_an_oversized_event_ends_that_channel_only(agents: list[Agent]) -> None:
    agents += [Agent(), Agent()]
    rid1, q1 = agents[1].ch.open_request()
    blob = b"x" * (1 << 20)

    def send_17_mib_without_a_newline() -> None:
        try:
            for _ in range(17):
                agents[0].sock.sendall(frame(blob))
        except OSError:
            pass  # the host closed it

    sender = threading.Thread(target=send_17_mib_without_a_newline, daemon=True)
    sender.start()
    assert agents[0].ch.closed.wait(10)
    assert "oversized" in agents[0].ch.close_reason
    agents[1].send({"id": rid1, "ev": "exit", "code": 0})
    assert q1.get(timeout=5) == {"id": rid1, "ev": "exit", "code": 0}
    agents[0].ch.close()
    sender.join(5)


def test_channels_opened_and_closed_from_many_threads_never_get_each_others_events() -> None:
    """Closing frees a descriptor number that the next socket gets again at once: an event must reach the
    channel whose socket it came through, whatever channel held that number before."""
    steady = Agent()
    rid_s, q_s = steady.ch.open_request()
    errors: list[str] = []

    def churn(worker: int) -> None:
        for i in range(40):
            a = Agent()
            try:
                rid, q = a.ch.open_request()
                token = f"{worker}-{i}"
                a.send({"id": rid, "ev": "out", "token": token})
                ev = q.get(timeout=5)
                if ev != {"id": rid, "ev": "out", "token": token}:
                    errors.append(f"{token}: got {ev}")
                if i % 3 == 0:  # an event in flight as the host closes
                    a.send({"id": rid, "ev": "out", "token": "late"})
            finally:
                a.close()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(churn, range(8)))
    assert errors == []
    steady.send({"id": rid_s, "ev": "exit", "code": 0})
    assert q_s.get(timeout=5) == {"id": rid_s, "ev": "exit", "code": 0}
    assert len(hub_threads()) == 1
    from sandbox import channel as chmod

    hub = chmod._the_hub()
    assert set(hub._chans.values()) == {steady.ch}  # every closed channel left the hub's set
    steady.close()
    assert steady.ch._fd not in hub._chans


def test_closing_the_host_side_mid_stream_is_quiet_and_the_others_live(agents: list[Agent],
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    agents += [Agent()]
    noisy = Agent()
    rid_n, _q = noisy.ch.open_request()
    stop = threading.Event()

    def flood() -> None:
        try:
            while not stop.is_set():
                noisy.send({"id": rid_n, "ev": "out", "data": "y" * 1000})
        except OSError:
            pass

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    time.sleep(0.2)
    noisy.ch.close()
    assert noisy.ch.close_reason == "closed by host"
    stop.set()
    t.join(5)
    noisy.sock.close()
    rid, q = agents[0].ch.open_request()
    agents[0].send({"id": rid, "ev": "exit", "code": 0})
    assert q.get(timeout=5) == {"id": rid, "ev": "exit", "code": 0}
    assert "reader failed" not in caplog.text and "reading an event failed" not in caplog.text


def test_a_forked_child_reads_its_own_channels_and_leaves_the_parents_alone(agents: list[Agent]) -> None:
    """The hub thread does not exist in a forked child: a channel made there must get a hub of its own, and
    the child must not change the parent's epoll set (a forked epoll descriptor is the same set)."""
    agents += [Agent()]
    parent = agents[0]
    rid, q = parent.ch.open_request()
    parent.send({"id": rid, "ev": "out", "n": 0})
    assert q.get(timeout=5) == {"id": rid, "ev": "out", "n": 0}  # the hub exists before the fork
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        code = 1
        try:
            child = Agent()
            crid, cq = child.ch.open_request()
            child.send({"id": crid, "ev": "exit", "code": 5})
            ok = cq.get(timeout=5) == {"id": crid, "ev": "exit", "code": 5}
            child.close()  # removes its own fd: in the child's set, not the parent's
            os.write(w, b"ok" if ok and len(hub_threads()) == 1 else b"bad")
            code = 0
        except BaseException as e:  # noqa: BLE001
            os.write(w, f"error {type(e).__name__}: {e}".encode()[:500])
        finally:
            os._exit(code)
    os.close(w)
    try:
        report = b""
        while chunk := os.read(r, 1000):
            report += chunk
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    assert report == b"ok" and os.waitstatus_to_exitcode(status) == 0, report
    parent.send({"id": rid, "ev": "out", "n": 1})  # the parent's channel is still read after the child
    assert q.get(timeout=5) == {"id": rid, "ev": "out", "n": 1}
    late = Agent()  # and a new one in the parent joins the parent's hub
    try:
        lrid, lq = late.ch.open_request()
        late.send({"id": lrid, "ev": "exit", "code": 0})
        assert lq.get(timeout=5) == {"id": lrid, "ev": "exit", "code": 0}
    finally:
        late.close()


@pytest.mark.docker
def test_real_sandboxes_share_the_one_reader_thread(make_sandbox: Any) -> None:
    sbs = [make_sandbox() for _ in range(3)]
    assert len(hub_threads()) == 1
    assert not [t for t in threading.enumerate() if t.name == "agent-channel"]
    with ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(lambda i: sbs[i].exec(["sh", "-c", f"echo {i}"]).stdout, range(3)))
    assert outs == [b"0\n", b"1\n", b"2\n"]
    sbs[1].destroy()
    assert sbs[0].exec(["true"]).exit_code == 0 and sbs[2].exec(["true"]).exit_code == 0
