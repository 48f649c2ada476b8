"""The agent's threads on `_thread`, the C module under `threading` (stdlib only).

`import threading` was 3-4 ms of every sandbox's start (it imports functools and collections,
measured inside the image); the agent needs only to start threads, locks, a wake-up and a join
with a timeout. As with `threading`, a thread that cannot be made (the sandbox's process budget
spent) raises RuntimeError when it is started, and it exists once start returns.
"""

from __future__ import annotations

import _thread

Lock = _thread.allocate_lock


def start(fn, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
    """fn(*args, **kwargs) in a new thread (no join; the agent ends with os._exit)."""
    _thread.start_new_thread(fn, args, kwargs)


class Joinable:
    """A thread that can be waited for, with a timeout (threading.Thread's start/join/is_alive)."""

    __slots__ = ("_fn", "_args", "_done")

    def __init__(self, fn, *args) -> None:  # type: ignore[no-untyped-def]
        self._fn, self._args = fn, args
        self._done = _thread.allocate_lock()
        self._done.acquire()  # released when fn returns

    def start(self) -> None:
        _thread.start_new_thread(self._run, ())

    def _run(self) -> None:
        try:
            self._fn(*self._args)
        finally:
            self._done.release()

    def join(self, timeout: float) -> None:
        if self._done.acquire(timeout=timeout):
            self._done.release()

    def is_alive(self) -> bool:
        return self._done.locked()


class Wake:
    """A wake-up call: set() from any thread; wait(timeout) returns True if it was set, and takes
    the call (threading.Event's wait then clear, without losing a set between the two)."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = _thread.allocate_lock()
        self._lock.acquire()

    def set(self) -> None:
        try:
            self._lock.release()
        except RuntimeError:
            pass  # already set

    def wait(self, timeout: float) -> bool:
        return self._lock.acquire(timeout=timeout)
