"""One identity per live sandbox: uid/gid leases from a range, safe across processes and crashes.

Per-uid kernel limits (RLIMIT_NPROC, inotify instances and watches, ...) are
counted per host uid: two sandboxes that share one spend one budget, and one can
starve the other. So every live sandbox gets a number no other live sandbox on
the host holds, used as both its uid and its gid.

A lease is an exclusive ``flock`` on ``<lease dir>/<n>.lock``, held by the
process that owns the sandbox. The kernel drops the lock when that process
dies, whatever kills it - and the sandbox dies with its owner too (its agent
exits when the owner's end of the channel closes). As a second check a number
is never handed out while a container the engine still lists carries it
(label ``org.sandbox.uid``/``org.sandbox.gid``): a sandbox whose owner just
died may take a moment to go.

The lease directory is host-wide (``/run/sandbox/uids`` for root, a tmpfs that a
reboot clears), not per state dir, so two runtimes with different state dirs on
one host never hand out the same number.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import threading
from pathlib import Path
from typing import Callable, Iterable

DEFAULT_RANGE = (2_000_000, 2_065_535)
RANGE_ENV = "SANDBOX_UID_RANGE"
LEASE_DIR_ENV = "SANDBOX_UID_LEASES"


class IdentityError(RuntimeError):
    """No identity could be leased (range exhausted, pinned uid in use, bad configuration)."""


def parse_range(text: str) -> tuple[int, int]:
    """``"2000000-2065535"`` -> (2000000, 2065535); both ends included, never 0."""
    try:
        lo_s, hi_s = text.split("-", 1)
        lo, hi = int(lo_s), int(hi_s)
    except ValueError:
        raise IdentityError(f"{RANGE_ENV}={text!r}: expected FIRST-LAST, e.g. 2000000-2065535") from None
    if not 1 <= lo <= hi <= 2**31 - 2:
        raise IdentityError(f"{RANGE_ENV}={text!r}: need 1 <= FIRST <= LAST <= 2147483646")
    return lo, hi


def configured_range() -> tuple[int, int]:
    env = os.environ.get(RANGE_ENV)
    return parse_range(env) if env else DEFAULT_RANGE


def default_lease_dir() -> Path:
    """``$SANDBOX_UID_LEASES``, else /run/sandbox/uids for root (see :func:`sandbox.paths.uid_leases_dir`)."""
    from sandbox.paths import uid_leases_dir

    return uid_leases_dir()


class Identity:
    """A leased uid/gid pair. Release it once the sandbox is gone (or let the process exit)."""

    # A plain class, not a dataclass: `dataclasses` imports `inspect`, ~8 ms of a cold `sandbox exec`.
    def __init__(self, uid: int, gid: int, _fds: list[int] | None = None):
        self.uid = uid
        self.gid = gid
        self._fds: list[int] = _fds if _fds is not None else []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Identity(uid={self.uid!r}, gid={self.gid!r})"

    @property
    def held(self) -> bool:
        return bool(self._fds)

    def release(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, []
        for fd in fds:
            try:
                os.close(fd)  # closing drops the flock
            except OSError:
                pass

    def __enter__(self) -> "Identity":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class IdentityAllocator:
    """Hands out :class:`Identity` leases. ``in_use`` lists numbers live containers carry;
    ``carried(n)`` says whether one does carry ``n`` (asked only for a number just locked, so
    its cost stays constant however many sandboxes live)."""

    def __init__(self, lease_dir: Path | None = None, id_range: tuple[int, int] | None = None,
                 in_use: Callable[[], Iterable[int]] | None = None,
                 carried: Callable[[int], bool] | None = None):
        self.lease_dir = Path(lease_dir or default_lease_dir())
        self.range = id_range or configured_range()
        self._in_use = in_use
        self._carried = carried

    def _carried_any(self, numbers: Iterable[int]) -> bool:
        return self._carried is not None and any(self._carried(n) for n in numbers)

    def _lock_one(self, n: int) -> int | None:
        """An fd holding the lease on n, or None when another process holds it."""
        path = self.lease_dir / f"{n}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
        return fd

    def _prepare(self) -> set[int]:
        try:
            self.lease_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise IdentityError(f"cannot create the uid lease directory {self.lease_dir}: {e.strerror}") from None
        st = self.lease_dir.lstat()
        if st.st_uid != os.geteuid() or st.st_mode & 0o022 or not os.access(self.lease_dir, os.W_OK):
            raise IdentityError(f"the uid lease directory {self.lease_dir} must be a directory of ours, "
                                "writable by us alone")
        return set(self._in_use()) if self._in_use is not None else set()

    def acquire(self, uid: int | None = None, gid: int | None = None) -> Identity:
        """A pinned pair when ``uid`` is given (refused while held elsewhere), else a free number."""
        busy = self._prepare()
        if uid is not None:
            gid = uid if gid is None else gid
            numbers = sorted({uid, gid})
            if busy & set(numbers):
                raise IdentityError(f"uid/gid {uid}:{gid} is held by another live sandbox on this host")
            fds: list[int] = []
            for n in numbers:
                fd = self._lock_one(n)
                if fd is None:
                    for f in fds:
                        os.close(f)
                    raise IdentityError(f"uid/gid {uid}:{gid} is held by another live sandbox on this host")
                fds.append(fd)
            if self._carried_any(numbers):
                for f in fds:
                    os.close(f)
                raise IdentityError(f"uid/gid {uid}:{gid} is held by another live sandbox on this host")
            return Identity(uid, gid, fds)
        lo, hi = self.range
        size = hi - lo + 1
        start = random.randrange(size)  # spread concurrent allocators over the range
        for i in range(size):
            n = lo + (start + i) % size
            if n in busy:
                continue
            fd = self._lock_one(n)
            if fd is None:
                continue
            if self._carried_any((n,)):  # a sandbox whose owner just died may still be going
                os.close(fd)
                continue
            return Identity(n, n, [fd])
        raise IdentityError(f"no free uid in {lo}-{hi}: {size} live sandboxes hold them all "
                            f"(widen {RANGE_ENV})")
