"""Run a `Worker` on its own event loop in a background thread (demo, tests, bench)."""

from __future__ import annotations

from concurrent.futures import Future
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal

from .worker import Worker


class BackgroundWorker(AbstractContextManager["BackgroundWorker"]):
    def __init__(self, worker: Worker, start_timeout: float = 60.0) -> None:
        self.worker = worker
        self._start_timeout = start_timeout
        self._portal_cm: Any = None
        self._portal: BlockingPortal | None = None
        self._future: Future[None] | None = None

    def start(self) -> BackgroundWorker:
        self._portal_cm = start_blocking_portal()
        self._portal = self._portal_cm.__enter__()
        self._future = self._portal.start_task_soon(self.worker.run)

        async def started() -> None:
            with anyio.fail_after(self._start_timeout):
                await self.worker.started.wait()

        try:
            self._portal.call(started)
            if self.worker.startup_error is not None:
                self._future.result(timeout=self._start_timeout)  # its teardown, then its own startup error
                raise self.worker.startup_error
            if self._future.done():
                self._future.result()  # surface the worker's own startup error
        except BaseException:
            self._portal_cm.__exit__(None, None, None)
            self._portal = None
            raise
        return self

    def call(self, fn: Any, *args: Any) -> Any:
        assert self._portal is not None
        return self._portal.call(fn, *args)

    def stop(self, timeout: float = 60.0) -> None:
        if self._portal is None:
            return
        try:
            if self._future is not None and not self._future.done():
                self._portal.call(self.worker.request_stop)
                self._future.result(timeout=timeout)
        finally:
            self._portal_cm.__exit__(None, None, None)
            self._portal = None

    def __enter__(self) -> BackgroundWorker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
