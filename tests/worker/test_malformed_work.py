"""Malformed work items and poll responses: the worker skips or fails that item and keeps polling.

The embedded control plane never produces these, so a small stub server plays a
misbehaving (or hostile) control plane. No sandbox is ever started: the runtime
is a stand-in that refuses to create one.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sandbox.runtime import SandboxError
from sandbox.worker import EnvironmentKey, Worker, WorkerConfig
from sandbox.worker.admission import Admission, HostStats
from sandbox.worker.runner import BackgroundWorker

from .helpers import LogCapture, wait_for

ENV = "env_stub"
KEY = "sk-ant-oat01-" + "s" * 43


def _item(work_id: Any, data: Any, **extra: Any) -> dict[str, Any]:
    return {"type": "work", "id": work_id, "environment_id": ENV, "data": data, "state": "queued",
            "created_at": "2026-01-01T00:00:00Z", "metadata": {}, **extra}


POLL_BODIES: list[Any] = [
    _item("work_health", {"type": "healthcheck", "id": "hc_1"}),
    _item("work_nodata", None),
    _item("work_gone", {"type": "session", "id": "session_missing"}, secret="!!not-base64!!"),
    _item(12345, {"type": "session", "id": "session_x"}),
    [1, 2, 3],  # not an object at all
    "just a string",
    _item("work_weird", {"type": "session", "id": ""}),
]


class Stub:
    def __init__(self) -> None:
        self.bodies = list(POLL_BODIES)
        self.polls = 0
        self.stopped: list[str] = []
        self.auth: set[str] = set()
        lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _send(self, code: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> Any:
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n) or b"null") if n else None

            def do_GET(self) -> None:  # noqa: N802
                stub.auth.add(self.headers.get("Authorization", ""))
                path = self.path.split("?")[0]
                if path.endswith("/work/poll"):
                    with lock:
                        stub.polls += 1
                        body = stub.bodies.pop(0) if stub.bodies else None
                    return self._send(200, body)
                if path.endswith("/work/stats"):
                    return self._send(200, {"type": "work_queue_stats", "depth": 0, "pending": 0,
                                            "oldest_queued_at": None, "workers_polling": 1})
                if path.startswith("/v1/sessions/"):
                    return self._send(404, {"type": "error", "error": {"type": "not_found_error",
                                                                       "message": "no such session"}})
                self._send(404, {"type": "error", "error": {"type": "not_found_error", "message": "?"}})

            def do_POST(self) -> None:  # noqa: N802
                self._body()
                path = self.path.split("?")[0]
                parts = path.split("/")
                if path.endswith("/stop"):
                    stub.stopped.append(parts[-2])
                    return self._send(200, _item(parts[-2], None, state="stopped"))
                if path.endswith("/ack"):
                    return self._send(200, _item(parts[-2], None, state="starting"))
                if path.endswith("/heartbeat"):
                    return self._send(200, {"type": "work_heartbeat", "last_heartbeat": "hb", "lease_extended": True,
                                            "state": "active", "ttl_seconds": 30})
                self._send(404, {"type": "error", "error": {"type": "not_found_error", "message": "?"}})

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class NoSandboxRuntime:
    """Stands in for the Docker runtime: nothing to reap, and no sandbox may be created."""

    def __init__(self) -> None:
        self.created = 0

    def gc(self, **_: Any) -> list[str]:
        return []

    def create(self, *_: Any, **__: Any) -> Any:
        self.created += 1
        raise SandboxError("no sandboxes in this test")


@pytest.fixture
def stub() -> Iterator[Stub]:
    s = Stub()
    yield s
    s.close()


def test_malformed_work_items_are_skipped_and_the_worker_keeps_polling(stub: Stub, tmp_path: Path,
                                                                      worker_logs: LogCapture) -> None:
    roomy = Admission(policy=None, probe=lambda: HostStats(64 << 30, 1 << 40, 0.0, 64))  # type: ignore[arg-type]
    roomy.needs = lambda: (0, 0, 0.0)  # type: ignore[method-assign]
    cfg = WorkerConfig(base_url=stub.url, environment_id=ENV, state_dir=tmp_path / "w", max_sessions=2,
                       metrics_port=0, admission=roomy, lease_ttl=10,
                       selftest=False)  # the fake runtime has no sandboxes to run canaries in
    runtime = NoSandboxRuntime()
    worker = Worker(cfg, EnvironmentKey(KEY, "test"), runtime=runtime)  # type: ignore[arg-type]
    with BackgroundWorker(worker):
        wait_for(lambda: stub.polls >= len(POLL_BODIES) + 2, timeout=60, what="the worker to poll past the bad items")
        health = worker.health()
    assert health["status"] == "ok", health
    # Healthchecks and items without a session are stopped (their lease must not sit), the missing session too.
    assert {"work_health", "work_nodata", "work_gone", "work_weird"} <= set(stub.stopped)
    failed = worker.metrics.work_failed
    assert failed.labels(reason="http_4xx")._value.get() >= 1  # the missing session
    assert failed.labels(reason="malformed")._value.get() >= 2
    assert failed.labels(reason="poll")._value.get() >= 1  # the non-object poll bodies
    assert "sk-ant-" not in worker_logs.text
    assert KEY not in worker_logs.text
    # Only the environment key was ever offered (the garbage secret yielded no sessions token).
    assert stub.auth <= {f"Bearer {KEY}", ""}
