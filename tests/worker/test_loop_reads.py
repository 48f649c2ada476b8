"""The worker reads its sandboxes' channels on its own event loop (tools.py `_call_on_loop`, channel.py
`read_on_loop`) when its journal can store a result there without waiting: the result of a real sandbox's
call reaches the tool on the loop thread and is stored in the journal before the tool returns it; when the
journal cannot store it at once, it is stored in a thread and the loop goes on; a call answered once is
replayed, never run again; a sandbox that dies mid-call is answered as stopped. A journal that cannot store
on the loop keeps the channel on the hub's thread.

Real sandboxes (Docker) and a real SQLite journal; the journal's `try_finish` here either stores through
`finish` or says it cannot (to reach the fallback every time), and records the thread it was asked on."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from anthropic.lib.tools import ToolError
from opentelemetry import trace

from sandbox import channel as chmod
from sandbox.worker.metrics import WorkerMetrics
from sandbox.worker.outbox import Outbox
from sandbox.worker.toolctx import ToolCall, _ToolCallSpan
from sandbox.worker.tools import SessionSlot, SessionToolbox

pytestmark = pytest.mark.docker


class Journal(Outbox):
    """A real SQLite journal whose `try_finish` is told whether it can store at once."""

    finishes_on_loop = True

    def __init__(self, path: Path, *, busy: bool = False, on_loop: bool = True) -> None:
        super().__init__(path, "owner-1", synchronous="NORMAL")
        self.busy = busy
        self.finishes_on_loop = on_loop
        self.asked_on: list[str] = []
        self.finished_on: list[str] = []

    def try_finish(self, tool_use_id: str, content: Any, is_error: bool) -> bool:
        self.asked_on.append(threading.current_thread().name)
        if self.busy:
            return False
        self.finish(tool_use_id, content, is_error)
        return True

    def finish(self, tool_use_id: str, content: Any, is_error: bool) -> None:
        self.finished_on.append(threading.current_thread().name)
        super().finish(tool_use_id, content, is_error)


def toolbox(sb: Any, journal: Outbox) -> SessionToolbox:
    slot = SessionSlot(session_id=sb.session_id, work_id="w1")
    slot.set_sandbox(sb)
    return SessionToolbox(slot, journal, WorkerMetrics(), sandbox_limiter=anyio.CapacityLimiter(4),
                          db_limiter=anyio.CapacityLimiter(4))


def run_calls(box: SessionToolbox, calls: list[tuple[str, str, dict[str, Any]]],
              also: Callable[[], None] | None = None) -> tuple[list[Any], str, Any]:
    """Run the tool calls one after another on a uvloop loop, as the SDK's runner does inside each call's
    span; returns their contents (or the ToolError), the loop thread's name and the loop."""
    out: list[Any] = []
    where: dict[str, Any] = {}

    async def main() -> None:
        import asyncio

        where["loop"] = asyncio.get_running_loop()
        where["thread"] = threading.current_thread().name
        for tid, name, raw in calls:
            with trace.use_span(_ToolCallSpan(ToolCall(tid, name, box.slot.session_id)), end_on_exit=True):
                try:
                    out.append(await box.call(name, raw))
                except ToolError as e:
                    out.append(e)
            if also is not None and not where.get("also"):
                where["also"] = True
                await anyio.to_thread.run_sync(also)

    anyio.run(main, backend_options={"use_uvloop": True})
    return out, where["thread"], where["loop"]


@pytest.fixture
def journal_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "journal.db"


def test_a_result_reaches_the_tool_on_the_loop_thread_stored_before_it_returns_and_is_never_run_twice(
        make_sandbox: Any, journal_path: Path) -> None:
    sb = make_sandbox()
    journal = Journal(journal_path)
    tid = f"toolu_{uuid.uuid4().hex[:12]}"
    cmd = {"command": "echo ran >> count; wc -l < count"}
    where_exec: list[int] = []
    out, loop_thread, loop = run_calls(toolbox(sb, journal), [(tid, "bash", cmd), (tid, "bash", cmd),
                                                              (f"{tid}b", "read", {"file_path": "count"})],
                                       also=lambda: where_exec.append(sb.exec(["true"]).exit_code))
    assert out[0].strip() == "1"
    assert out[1].strip() == "1"  # the same tool_use_id again: replayed from the journal, not run again
    assert "ran" in str(out[2]) and str(out[2]).count("ran") == 1
    assert sb.channel._loop is loop  # read on the worker's loop, not by the hub
    assert sb.channel._fd not in chmod._the_hub()._chans
    assert journal.asked_on == [loop_thread, loop_thread]  # stored on the loop, where the result arrived
    assert journal.finished_on == [loop_thread, loop_thread]
    rec = journal.get(tid)
    assert rec is not None and rec.state == "done" and rec.result is not None and rec.result.content.strip() == "1"
    assert where_exec == [0]  # the sync API, from a thread, on a channel the loop reads
    assert sb.exec(["true"]).exit_code == 0  # and after that loop is closed: the hub reads it again
    assert sb.channel._loop is None and sb.channel._fd in chmod._the_hub()._chans


def test_a_result_the_journal_cannot_store_at_once_is_stored_in_a_thread(make_sandbox: Any,
                                                                         journal_path: Path) -> None:
    sb = make_sandbox()
    journal = Journal(journal_path, busy=True)
    tid = f"toolu_{uuid.uuid4().hex[:12]}"
    out, loop_thread, _ = run_calls(toolbox(sb, journal), [(tid, "bash", {"command": "echo hello"})])
    assert out == ["hello"]
    assert journal.asked_on == [loop_thread]
    assert len(journal.finished_on) == 1 and journal.finished_on[0] != loop_thread
    rec = journal.get(tid)
    assert rec is not None and rec.state == "done" and rec.result is not None and rec.result.content == "hello"


def test_a_journal_that_cannot_store_on_the_loop_leaves_the_channel_on_the_hub(make_sandbox: Any,
                                                                              journal_path: Path) -> None:
    sb = make_sandbox()
    journal = Journal(journal_path, on_loop=False)
    out, loop_thread, _ = run_calls(toolbox(sb, journal), [(f"toolu_{uuid.uuid4().hex[:12]}", "bash",
                                                            {"command": "echo hub"})])
    assert out == ["hub"]
    assert sb.channel._loop is None and sb.channel._fd in chmod._the_hub()._chans
    assert journal.finished_on == ["agent-channels"]  # stored by the hub's thread, as before


def test_a_sandbox_that_dies_mid_call_is_answered_as_stopped_on_the_loop(make_sandbox: Any, runtime: Any,
                                                                        journal_path: Path) -> None:
    sb = make_sandbox()
    journal = Journal(journal_path)
    box = toolbox(sb, journal)
    first, second = f"toolu_{uuid.uuid4().hex[:12]}", f"toolu_{uuid.uuid4().hex[:12]}"
    killer = threading.Timer(1.0, lambda: runtime.engine.kill(sb.id))
    calls = [(first, "bash", {"command": "echo warm"}), (second, "bash", {"command": "sleep 30"})]
    killer.start()
    try:
        out, _, loop = run_calls(box, calls)
    finally:
        killer.cancel()
    assert out[0] == "warm"
    assert isinstance(out[1], ToolError) and "sandbox stopped" in str(out[1].content)
    assert sb.channel.closed.is_set() and not sb.channel._on_loop  # ended, and no longer read by the loop
    rec = journal.get(second)
    assert rec is not None and rec.state == "done" and rec.result is not None and rec.result.is_error
