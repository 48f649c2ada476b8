"""Unix socket helpers that work for paths longer than sun_path (108 bytes).

State directories (and pytest's tmp dirs) are easily deep enough to overflow
sun_path; binding or connecting through ``/proc/self/fd/<dirfd>/<name>`` keeps
the address short while the socket still lives at the real path.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

_MAX_SUN_PATH = 100  # a little under 108 to leave room for the NUL and safety


@contextlib.contextmanager
def _short_path(path: Path) -> Iterator[str]:
    text = os.fspath(path)
    if len(os.fsencode(text)) <= _MAX_SUN_PATH:
        yield text
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def bind_unix(path: Path, mode: int, backlog: int = 128) -> socket.socket:
    """A listening, non-blocking Unix stream socket at ``path`` (a stale file there is replaced)."""
    path = Path(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # The mode comes from the umask at bind() time, never from a later chmod(): a chmod
        # by path would follow a symlink that a sandbox sharing our uid swapped in meanwhile.
        # (The daemon is single-threaded, so the brief process-wide umask change is safe.)
        old_umask = os.umask(0o777 & ~mode)
        try:
            with _short_path(path) as addr:
                sock.bind(addr)
        finally:
            os.umask(old_umask)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def connect_unix(path: Path, timeout: float | None = None) -> socket.socket:
    """A connected, blocking Unix stream socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with _short_path(Path(path)) as addr:
            sock.connect(addr)
    except BaseException:
        sock.close()
        raise
    return sock
