"""Helpers for the worker tests: waiting on the control plane's event log, log capture."""

from __future__ import annotations

import io
import json
import socket
import time
from collections.abc import Callable
from typing import Any

from sandbox.controlplane import LocalAdmin


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LogCapture:
    """The worker's JSON log lines, as they would reach stderr (redaction included)."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text.splitlines() if line.startswith("{")]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("event") == name]


def wait_for(pred: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def results(admin: LocalAdmin, session_id: str) -> list[dict[str, Any]]:
    return admin.events(session_id, types=["user.tool_result"])


def wait_result(admin: LocalAdmin, session_id: str, tool_use_id: str, timeout: float = 30.0) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        for ev in results(admin, session_id):
            if ev.get("tool_use_id") == tool_use_id:
                return ev
        return None
    return wait_for(find, timeout, what=f"the result of {tool_use_id}")


def text_of(ev: dict[str, Any]) -> str:
    return "\n".join(str(b.get("text", "")) for b in ev.get("content") or [])


def call(admin: LocalAdmin, session_id: str, tool: str, input: dict[str, Any],
         timeout: float = 30.0) -> tuple[bool, str, dict[str, Any]]:
    """Emit one tool call and wait for its result: (is_error, text, event)."""
    tid = admin.send_tool_use(session_id, tool, input)
    ev = wait_result(admin, session_id, tid, timeout)
    return bool(ev.get("is_error")), text_of(ev), ev


def log_records(path: Any) -> list[dict[str, Any]]:
    """JSON log lines of a worker process's log file (other lines skipped)."""
    out = []
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def log_events(path: Any, name: str) -> list[dict[str, Any]]:
    return [r for r in log_records(path) if r.get("event") == name]
