"""The README's session flow, in the order it shows, against a real worker: `session send --idle`
ends the turn after the results, so the run ends after --max-idle and the next session is served;
/healthz says degraded while the worker is at its session limit; `session watch --history`."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2 as httpx  # what anthropic ships
import pytest
from click.testing import CliRunner

from sandbox.cli import main
from sandbox.controlplane import ControlPlane, LocalAdmin
from sandbox.worker import Worker

from .helpers import LogCapture, results, text_of, wait_for

pytestmark = pytest.mark.docker


def _cli(*args: str, input: str | None = None) -> Any:
    res = CliRunner().invoke(main, list(args), input=input)
    assert res.exit_code == 0, res.output
    return res


def test_send_idle_lets_the_run_end_so_the_next_session_is_served_and_healthz_tells_the_limit(
        cp: ControlPlane, admin: LocalAdmin, start_worker: Callable[..., Worker], worker_logs: LogCapture,
        tmp_path: Path) -> None:
    worker = start_worker(max_sessions=1, max_idle=1.0)
    sd = str(cp.state_dir)
    health = f"http://127.0.0.1:{worker.health_port}"
    calls = tmp_path / "calls.jsonl"
    calls.write_text(json.dumps({"name": "bash", "input": {"command": "sleep 1; echo one"}}) + "\n"
                     + json.dumps({"name": "write", "input": {"file_path": "a.txt", "content": "a"}}) + "\n")
    first = _cli("session", "new", "--state-dir", sd).output.strip()
    seen_degraded: list[dict[str, Any]] = []

    def poll_health() -> None:
        while not seen_degraded:
            r = httpx.get(health + "/healthz")
            if r.status_code == 503 and "at_session_limit" in r.json().get("reasons", []):
                seen_degraded.append(r.json())
                return

    t = threading.Thread(target=poll_health, daemon=True)
    t.start()
    _cli("session", "send", "--state-dir", sd, "--idle", first, str(calls))
    t.join(30)
    assert seen_degraded and seen_degraded[0]["sessions"] == 1  # at the limit: degraded, and says why
    assert "sandbox_worker_at_session_limit" in httpx.get(health + "/metrics").text
    # The idle came after both results, so --max-idle fires and the run ends.
    log = admin.events(first)
    kinds = [e["type"] for e in log]
    assert kinds.index("session.status_idle") > max(i for i, k in enumerate(kinds) if k == "user.tool_result")
    wait_for(lambda: worker.sessions_in_flight == 0, timeout=30, what="the first run to end after max-idle")
    assert httpx.get(health + "/healthz").json()["status"] == "ok"
    # ... so a second session is served by this one-session worker.
    second = _cli("session", "new", "--state-dir", sd).output.strip()
    _cli("session", "send", "--state-dir", sd, second, "-", input=json.dumps({"name": "bash",
                                                                             "input": {"command": "echo two"}}))
    ev = wait_for(lambda: results(admin, second), timeout=60, what="the second session's result")
    assert text_of(ev[0]) == "two"
    # watch --history shows what happened before it started, then ends with the session.
    admin.terminate(first)
    watched = _cli("session", "watch", "--state-dir", sd, "--history", "--json", first).output
    types = [json.loads(x)["type"] for x in watched.splitlines()]
    assert types.count("user.tool_result") == 2 and types[-1] == "session.status_terminated"
    assert len({json.loads(x)["id"] for x in watched.splitlines()}) == len(types)  # each event once
    admin.terminate(second)
