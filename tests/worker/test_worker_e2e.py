"""The worker end to end: embedded control plane over real HTTP, the official SDK, real sandboxes."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import httpx2 as httpx  # what anthropic ships; httpx is not a dependency
import pytest

from sandbox.controlplane import ControlPlane, LocalAdmin
from sandbox.worker import Worker

from .helpers import LogCapture, call, results, wait_for

pytestmark = pytest.mark.docker


def test_seed_poc_two_sessions_at_once(cp: ControlPlane, admin: LocalAdmin, start_worker: Callable[..., Worker],
                                        worker_logs: LogCapture) -> None:
    worker = start_worker(max_sessions=2)
    s1 = admin.create_session(cp.environment_id)
    s2 = admin.create_session(cp.environment_id)
    out: dict[str, list[tuple[bool, str, dict[str, Any]]]] = {}

    def script(sid: str, word: str) -> None:
        out[sid] = [
            call(admin, sid, "write", {"file_path": "proj/hello.txt", "content": f"hello {word}\n"}),
            call(admin, sid, "read", {"file_path": "proj/hello.txt"}),
            call(admin, sid, "bash", {"command": "cat proj/hello.txt; id -u; ls /workspace/proj"}),
        ]

    threads = [threading.Thread(target=script, args=(s, w)) for s, w in ((s1, "one"), (s2, "two"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    for sid, word in ((s1, "one"), (s2, "two")):
        (w_err, w_text, _), (r_err, r_text, _), (b_err, b_text, _) = out[sid]
        assert (w_err, w_text) == (False, "wrote 10 bytes to proj/hello.txt")
        assert (r_err, r_text) == (False, f"hello {word}\n")
        assert not b_err, b_text
        cat, uid, ls = b_text.splitlines()
        assert (cat, ls) == (f"hello {word}", "hello.txt") and int(uid) > 0  # its own workspace, not root
    # Two sessions, two different sandboxes, both served at the same time.
    assigned = worker_logs.events("sandbox_assigned")
    assert {r["session_id"] for r in assigned} == {s1, s2}
    assert len({r["container"] for r in assigned}) == 2
    for sid in (s1, s2):
        admin.terminate(sid)
    wait_for(lambda: worker.sessions_in_flight == 0, what="both sessions to end")
    assert len(worker_logs.events("sandbox_destroyed")) == 2
    assert worker.metrics.results_posted._value.get() == 6


def test_hostile_inputs_get_clear_errors_and_the_worker_keeps_going(
        cp: ControlPlane, admin: LocalAdmin, start_worker: Callable[..., Worker]) -> None:
    start_worker()
    sid = admin.create_session(cp.environment_id)
    assert call(admin, sid, "bash", {"command": "ln -s /etc/passwd leak; ln -s /etc etcdir; mkdir d; echo ok"})[:2] == \
        (False, "ok")
    # A big (but legal) write: 6 MiB through the control plane into the sandbox.
    assert call(admin, sid, "write", {"file_path": "big.txt", "content": "y" * (6 << 20)})[:2] == \
        (False, f"wrote {6 << 20} bytes to big.txt")
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("read", {"file_path": "../../etc/passwd"}, "outside the session's working directory"),
        ("read", {"file_path": "/etc/passwd"}, "outside the session's working directory"),
        ("read", {"file_path": "leak"}, "outside the session's working directory"),
        ("write", {"file_path": "etcdir/evil", "content": "x"}, "outside the session's working directory"),
        ("edit", {"file_path": "leak", "old_string": "root", "new_string": "toor"}, "outside"),
        ("glob", {"pattern": "../../*"}, "'..' is not permitted"),
        ("grep", {"pattern": "([unclosed"}, "grep: invalid regex"),
        ("grep", {"pattern": "root", "path": "etcdir"}, "outside"),
        ("read", {"file_path": "d"}, "not a regular file"),
        ("read", {"file_path": 42}, "read: invalid input: file_path"),
        ("read", {"file_path": "x", "view_range": [1]}, "view_range must be [start_line, end_line]"),
        ("bash", {}, "bash: command is required"),
        ("bash", {"command": ["rm", "-rf", "/"]}, "bash: invalid input: command"),
        ("bash", {"command": "#" * ((1 << 20) + 1)}, "over the 1048576-character limit"),
        ("edit", {"file_path": "big.txt", "old_string": "x" * 300_000, "new_string": ""}, "over the 262144-character"),
        ("read", {"file_path": "big.txt"}, "exceeds 262144-byte limit. Use the view_range parameter"),
        ("edit", {"file_path": "nope.txt", "old_string": "a", "new_string": "b"}, "no such file or directory"),
    ]
    for tool, inp, expect in cases:
        is_error, text, _ = call(admin, sid, tool, inp, timeout=60)
        assert is_error, (tool, inp, text)
        assert expect in text, (tool, inp, text)
        assert "Traceback" not in text and "ToolFailure" not in text
    # A tool name this worker does not own is left pending for its owner (never answered by us).
    other = admin.send_tool_use(sid, "deploy_to_prod", {"really": True})
    # ... and the session keeps working.
    assert call(admin, sid, "bash", {"command": "echo still alive; cat /etc/hostname >/dev/null && echo ro-ok"})[:2] == \
        (False, "still alive\nro-ok")
    assert not any(ev.get("tool_use_id") == other for ev in results(admin, sid))
    assert call(admin, sid, "bash", {"command": "cat /etc/passwd | grep -c toor"})[1] == "0"


def test_no_key_or_token_reaches_the_sandbox_or_the_logs(cp: ControlPlane, admin: LocalAdmin,
                                                          start_worker: Callable[..., Worker],
                                                          worker_logs: LogCapture) -> None:
    start_worker()
    sid = admin.create_session(cp.environment_id)
    probe = (
        "for f in /proc/[0-9]*/environ; do { tr '\\0' '\\n' < $f; } 2>/dev/null; done | sort -u > /tmp/envs;"
        "env >> /tmp/envs; cat /proc/mounts >> /tmp/envs;"
        "grep -rIl -e 'sk-ant-' -e 'ANTHROPIC' / --exclude-dir=proc --exclude-dir=sys 2>/dev/null | grep -v '^/tmp/envs$'"
        " | head -5; echo files-done;"
        "grep -c -e 'sk-ant-' -e 'ANTHROPIC' /tmp/envs; grep -c '' /tmp/envs"
    )
    is_error, text, _ = call(admin, sid, "bash", {"command": probe, "timeout_ms": 60000}, timeout=90)
    lines = text.splitlines()
    assert lines[0] == "files-done", text  # no file anywhere holds a key or ANTHROPIC_* variable
    assert lines[1] == "0", text  # no process environment, env var or mount mentions them
    assert int(lines[2]) > 5  # the probe did read something
    assert cp.environment_key not in text
    logs = worker_logs.text
    assert cp.environment_key not in logs and "sk-ant-" not in logs
    assert worker_logs.events("tool_exec")  # the log did capture the worker's activity


def test_warm_pool_sandboxes_serve_one_session_each(cp: ControlPlane, admin: LocalAdmin,
                                                    start_worker: Callable[..., Worker],
                                                    worker_logs: LogCapture) -> None:
    worker = start_worker(warm=1, max_idle=1.0)
    wait_for(lambda: worker.pool is not None and worker.pool.ready == 1, what="the warm pool to fill")
    first = admin.create_session(cp.environment_id)
    assert call(admin, first, "write", {"file_path": "mine.txt", "content": "first"})[0] is False
    admin.terminate(first)
    wait_for(lambda: worker.sessions_in_flight == 0, what="the first session to end")
    wait_for(lambda: worker.pool is not None and worker.pool.ready == 1, what="the pool to refill")
    second = admin.create_session(cp.environment_id)
    is_error, text, _ = call(admin, second, "bash", {"command": "ls /workspace; echo end"})
    assert (is_error, text) == (False, "end")  # a fresh workspace: nothing of the first session
    assigned = worker_logs.events("sandbox_assigned")
    assert [r["source"] for r in assigned] == ["pool", "pool"]
    assert assigned[0]["container"] != assigned[1]["container"]
    assert assigned[0]["sandbox_label"].startswith("pool-")
    metrics = httpx.get(f"http://127.0.0.1:{worker.health_port}/metrics").text
    assert "sandbox_worker_pool_ready" in metrics and 'sandbox_worker_tool_calls_total{outcome="ok",tool="bash"}' in metrics
    assert httpx.get(f"http://127.0.0.1:{worker.health_port}/healthz").json()["status"] == "ok"
