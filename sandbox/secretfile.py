"""Read a secret from a file only its owner can reach; anything looser is refused.

A key that group or other could read must be treated as leaked, so callers stop
rather than serve with it. Shared by the control plane's key files and the
worker's environment-key file.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class PrivateFileError(Exception):
    """The file is missing, unreadable, or not private to us (message names the path, never content)."""


def read_private_file(path: Path, max_bytes: int = 4096) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise PrivateFileError(f"cannot open {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PrivateFileError(f"{path} is not a regular file")
        if st.st_mode & 0o077:
            raise PrivateFileError(f"{path} is readable by group/other (mode {stat.S_IMODE(st.st_mode):04o})")
        if st.st_uid != os.getuid():
            raise PrivateFileError(f"{path} is owned by uid {st.st_uid}, not by this user")
        data = os.read(fd, max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise PrivateFileError(f"{path} is too large to hold a key")
    return data
