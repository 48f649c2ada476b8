"""Which form the store's call journal takes, decided once per store and kept with it.

Two forms hold the same record (outbox.py explains it): SQLite (`Outbox`, `<store>/journal.db`)
for a store on a local filesystem, shared by the worker processes of one host; plain files
(`FileJournal`, `<store>/journal/`) for a store on a network filesystem shared by workers on
several hosts or pods, where SQLite's locks and shared memory cannot be trusted.

``auto`` picks by the filesystem the store lives on (a local disk filesystem: SQLite; anything
else, e.g. nfs4, ceph, fuse.*: files). The first worker to open a store writes its choice to
``<store>/journal.kind``; every later worker follows it, and a worker asked for the other form
refuses to start, naming the file: two workers on one store with two journals could each claim
the same call.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Union

from .journal_files import FileJournal
from .outbox import Outbox
from .store import SessionStore, StoreError

Journal = Union[Outbox, FileJournal]
KINDS = ("sqlite", "files")
CHOICES = ("auto",) + KINDS

# Filesystems of one host's disk or memory: SQLite's WAL (shared memory, byte-range locks) is sound there.
LOCAL_FILESYSTEMS = frozenset({
    "ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs", "f2fs", "bcachefs", "jfs",
    "reiserfs", "ramfs",
})


def filesystem_of(path: Path, mountinfo: str = "/proc/self/mountinfo") -> str:
    """The type of the filesystem `path` is on (the longest mount point above it), or "" if unknown."""
    target = os.path.realpath(path)
    best, fstype = "", ""
    try:
        lines = Path(mountinfo).read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5:
            continue
        mnt = fields[4].replace("\\040", " ")
        inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= len(best):
            best, fstype = mnt, right.split()[0] if right.split() else ""
    return fstype


def choose_kind(store: SessionStore, requested: str = "auto", *,
                fstype: Callable[[Path], str] = filesystem_of) -> str:
    """The store's journal form: the one it already has, else `requested` (``auto``: by filesystem)."""
    if requested not in CHOICES:
        raise StoreError(f"journal kind {requested!r}: must be one of {', '.join(CHOICES)}")
    marker = store.journal_kind_path()
    kept = _read_marker(marker)
    if kept is None and store.journal_path().exists():
        kept = "sqlite"  # a store made before the marker existed
    if kept is None:
        if requested == "auto":
            fs = fstype(store.root)
            kind = "sqlite" if fs in LOCAL_FILESYSTEMS else "files"
        else:
            kind = requested
        # A complete file linked into place: nobody ever reads a marker half written.
        tmp = marker.with_name(f".{marker.name}.{os.getpid()}.{secrets.token_hex(4)}")
        tmp.write_text(kind + "\n")
        try:
            os.link(tmp, marker)
        except FileExistsError:  # another worker decided first: follow it
            kept = _read_marker(marker)
            if kept is None:
                raise StoreError(f"{marker}: unreadable journal kind") from None
        else:
            return kind
        finally:
            tmp.unlink(missing_ok=True)
    if requested not in ("auto", kept):
        raise StoreError(f"{marker}: this store's journal is {kept!r}, and this worker was asked for {requested!r}; "
                         "every worker of one store must use the same journal")
    return kept


def _read_marker(marker: Path) -> str | None:
    try:
        text = marker.read_text().strip()
    except FileNotFoundError:
        return None
    if text not in KINDS:
        raise StoreError(f"{marker}: unknown journal kind {text[:20]!r} (expected one of {', '.join(KINDS)})")
    return text


def open_journal(store: SessionStore, owner: str, *, requested: str = "auto", synchronous: str = "FULL",
                 alive: Callable[[str], bool] | None = None) -> Journal:
    """The store's journal, in the form `choose_kind` settles on."""
    kind = choose_kind(store, requested)
    if kind == "files":
        return FileJournal(store.journal_dir(), owner, synchronous=synchronous, alive=alive)
    return Outbox(store.journal_path(), owner, synchronous=synchronous, alive=alive)
