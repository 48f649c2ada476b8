"""The call journal as plain files: the same record as `outbox.Outbox`, for a store on a shared filesystem.

Why a second form: workers on several hosts (or pods) share one session store only through a
network filesystem (NFS, CephFS, EFS, Filestore, a ReadWriteMany volume). SQLite must not live
there: WAL mode needs shared memory that only processes of one host see, and rollback mode
trusts the filesystem's byte-range locks, which network filesystems get wrong often enough that
SQLite's own documentation warns against it. A broken lock there is a call run twice.

So this journal never locks and never maps memory. Every decision that two workers could race
on is ONE exclusive operation that the file server carries out atomically for every client:
``link(2)`` of a complete, private file onto a name that must not exist yet (it fails with
EEXIST if it does; NFS performs it at the server, not in a client's cache). Exactly one worker
can claim a call, and exactly one result (the tool's, or "interrupted") is ever stored for it;
readers then read complete files only. Layout, under ``<store>/journal/``:

    calls/<hh>/<h>.call        the claim: tool_use_id, session, work id, tool, owner, started_at
    calls/<hh>/<h>.result      the stored result (content, is_error, finished_at): first one wins
    calls/<hh>/<h>.delivered   the tombstone: the control plane accepted the result (payload dropped)
    running/<h>.<owner>        index: claims without a result, made before the claim (for `recover`)
    pending/<h>                index: results not yet delivered (for `pending`)
    tmp/                       private files before they are linked into place

``<h>`` is a hash of the tool_use_id (any id maps to one safe name; the record holds the id
itself). The indexes are hints, checked against the call's own files on every read, so a crash
between two steps leaves at most a stale index entry, which the next reader removes. States and
their meaning are exactly the SQLite journal's (see outbox.py): running, done, delivered;
`interrupted` for a call whose worker is gone; a call is never run twice.

What a network filesystem still decides: who is alive is the store's owner lock (flock, which
NFSv4 carries as a lease-backed lock: a crashed host's locks are freed when its lease expires,
so its calls are answered as interrupted only then, typically 90 s). `try_begin` never answers
here (a claim is a round trip to the file server, never made on the event loop).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .outbox import INTERRUPTED_TEXT, TOMBSTONE_TTL_S, AcceptedResults, Begin, CallRecord, StoredResult
from .store import safe_id

STALE_TMP_S = 3600.0  # a private file this old was left by a worker that died mid-write
UNCLAIMED_MARK_S = 60.0  # a running mark with no claim behind it this long: its claimer lost or died


def _name(tool_use_id: str) -> str:
    return hashlib.sha256(tool_use_id.encode()).hexdigest()[:40]


class FileJournal(AcceptedResults):
    """The journal of calls in plain files (module docstring). Same methods as `outbox.Outbox`."""

    kind = "files"
    finishes_on_loop = False  # every write talks to the file server: never on the worker's event loop

    def __init__(self, root: Path, owner: str, *, synchronous: str = "FULL",
                 alive: Callable[[str], bool] | None = None) -> None:
        self.root = Path(root)
        self.owner = owner
        self._owner_tag = safe_id(owner)
        self._alive = alive or (lambda o: o == owner)
        self._sync = synchronous.upper() in ("FULL", "EXTRA")
        super().__init__()
        for d in ("calls", "running", "pending", "tmp"):
            (self.root / d).mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            os.chmod(self.root, 0o700)
        except OSError:
            pass

    def close(self) -> None:
        """Nothing is held open between calls."""

    # ---------------------------------------------------------------- files

    def _call_dir(self, h: str) -> Path:
        return self.root / "calls" / h[:2]

    def _path(self, h: str, suffix: str) -> Path:
        return self._call_dir(h) / f"{h}.{suffix}"

    def _fsync_dir(self, d: Path) -> None:
        if not self._sync:
            return
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _private(self, data: bytes) -> Path:
        """A complete file under tmp/, written (and synced when asked) before anyone can see it."""
        tmp = self.root / "tmp" / f"{self._owner_tag}.{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if self._sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        return tmp

    def _link_new(self, data: bytes, dest: Path) -> bool:
        """Put `data` at `dest` only if nothing is there yet: True if this call made it.

        link(2) is the one atomic create-if-absent of a complete file a network filesystem offers.
        An NFS client that lost the server's reply may retransmit and be told EEXIST for its own
        link; then the private file's link count (2: ours) says it was ours after all."""
        dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self._private(data)
        try:
            try:
                os.link(tmp, dest)
                made = True
            except FileExistsError:
                made = os.stat(tmp).st_nlink >= 2
        finally:
            tmp.unlink(missing_ok=True)
        if made:
            self._fsync_dir(dest.parent)
        return made

    def _mark(self, path: Path, data: bytes = b"") -> None:
        """An index entry or tombstone: made if absent, content advisory."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        try:
            if data:
                os.write(fd, data)
        finally:
            os.close(fd)

    @staticmethod
    def _load(path: Path) -> dict[str, Any] | None:
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # only a tombstone is written in place; its content is advisory
        return data if isinstance(data, dict) else {}

    def _read(self, h: str) -> CallRecord | None:
        claim = self._load(self._path(h, "call"))
        if not claim:
            return None  # a claim is linked complete: absent means never claimed (or expired)
        delivered = self._load(self._path(h, "delivered"))
        result = None if delivered is not None else self._load(self._path(h, "result"))
        if delivered is not None:
            state, stored, finished = "delivered", None, delivered.get("finished_at")
        elif result:
            state = "done"
            stored = StoredResult(result.get("content"), bool(result.get("is_error")))
            finished = result.get("finished_at")
        else:
            state, stored, finished = "running", None, None
        return CallRecord(claim["tool_use_id"], claim["session_id"], claim.get("work_id"), claim["tool"],
                          state, claim["owner"], stored, float(claim["started_at"]),  # type: ignore[arg-type]
                          None if finished is None else float(finished))

    def _read_soon(self, h: str, tries: int = 40) -> CallRecord | None:
        """`_read` of an entry the file server just said exists (a link failed with EEXIST): a client
        may still hold a cached "no such file" for it for a moment, so look again briefly."""
        for _ in range(tries):
            rec = self._read(h)
            if rec is not None:
                return rec
            time.sleep(0.05)
        return None

    def _store_result(self, h: str, content: Any, is_error: bool) -> bool:
        """The call's one result (first writer wins), indexed as pending; False if it had one already."""
        if self._path(h, "delivered").exists():
            return False
        body = json.dumps({"content": content, "is_error": bool(is_error), "finished_at": time.time()}).encode()
        made = self._link_new(body, self._path(h, "result"))
        if made:
            self._mark(self.root / "pending" / h)
        self._unmark_running(h)
        return made

    def _unmark_running(self, h: str) -> None:
        for p in self._running_marks(h):
            p.unlink(missing_ok=True)

    def _running_marks(self, h: str) -> list[Path]:
        d = self.root / "running"
        try:
            return [d / n for n in os.listdir(d) if n.startswith(h + ".")]
        except FileNotFoundError:
            return []

    def _deliver(self, h: str, *, any_state: bool = False) -> bool:
        rec = self._read(h)
        if rec is None or rec.state == "delivered" or (rec.state != "done" and not any_state):
            return False
        tomb = json.dumps({"finished_at": rec.finished_at, "delivered_at": time.time()}).encode()
        self._mark(self._path(h, "delivered"), tomb)
        self._path(h, "result").unlink(missing_ok=True)
        (self.root / "pending" / h).unlink(missing_ok=True)
        self._unmark_running(h)
        return True

    # ---------------------------------------------------------------- lifecycle

    def recover(self) -> int:
        """Calls left running by workers that are gone become `interrupted` results; old tombstones go."""
        self._flush_accepted()
        now = time.time()
        n = 0
        seen: set[str] = set()
        for mark in _entries(self.root / "running"):
            h = mark.name.split(".", 1)[0]
            rec = self._read(h)
            if rec is None:
                if _age(mark, now) > UNCLAIMED_MARK_S:
                    mark.unlink(missing_ok=True)
                continue
            if rec.state != "running":
                mark.unlink(missing_ok=True)
                continue
            if h in seen or rec.owner == self.owner or self._alive(rec.owner):
                continue
            seen.add(h)
            if self._store_result(h, INTERRUPTED_TEXT, True):
                n += 1
        for tmp in _entries(self.root / "tmp"):
            if _age(tmp, now) > STALE_TMP_S:
                tmp.unlink(missing_ok=True)
        for shard in _entries(self.root / "calls"):
            for p in _entries(shard):
                if p.name.endswith(".delivered") and _age(p, now) > TOMBSTONE_TTL_S:
                    h = p.name[: -len(".delivered")]
                    for suffix in ("call", "result"):
                        self._path(h, suffix).unlink(missing_ok=True)
                    p.unlink(missing_ok=True)
        return n

    def begin(self, tool_use_id: str, session_id: str, work_id: str | None, tool: str) -> Begin:
        """Claim the call for execution, or return the record that already answers it."""
        self._flush_accepted()
        h = _name(tool_use_id)
        rec = self._read(h)
        if rec is None:
            mark = self.root / "running" / f"{h}.{self._owner_tag}"
            self._mark(mark)  # before the claim: a claim is always findable by `recover`
            claim = {"tool_use_id": tool_use_id, "session_id": session_id, "work_id": work_id, "tool": tool,
                     "owner": self.owner, "started_at": time.time()}
            if self._link_new(json.dumps(claim).encode(), self._path(h, "call")):
                return Begin(run=True)
            mark.unlink(missing_ok=True)  # another worker claimed it first
            rec = self._read_soon(h)
            if rec is None:  # the server said it exists, and it never showed: not a journal we can trust
                raise OSError(errno.EIO, f"journal entry for {tool_use_id} exists and cannot be read")
        if rec.tool_use_id != tool_use_id:
            raise OSError(errno.EIO, f"journal entry {h} names another call")
        if rec.state == "running":
            if rec.owner == self.owner or self._alive(rec.owner):
                return Begin(run=False, record=rec, wait=True)
            self._store_result(h, INTERRUPTED_TEXT, True)  # its worker is gone: never run it again
            rec = self._read(h) or rec
        return Begin(run=False, record=rec)

    def try_begin(self, tool_use_id: str, session_id: str, work_id: str | None, tool: str) -> Begin | None:
        """Never answers: a claim here is a round trip to the file server, not made on an event loop."""
        return None

    def try_finish(self, tool_use_id: str, content: Any, is_error: bool) -> bool:
        """Never stores: writing a result is a round trip to the file server (`finish`, in a thread)."""
        return False

    def finish(self, tool_use_id: str, content: Any, is_error: bool) -> None:
        """Store the result (only while the call is still running here); before anyone posts it."""
        self._flush_accepted()
        h = _name(tool_use_id)
        rec = self._read(h)
        if rec is not None and rec.state == "running":
            self._store_result(h, content, is_error)

    def delivered(self, tool_use_ids: list[str]) -> int:
        return sum(self._deliver(_name(t)) for t in list(tool_use_ids) + self._take_accepted())

    def _flush_accepted(self) -> None:
        for t in self._take_accepted():
            self._deliver(_name(t))

    def abandon(self, tool_use_id: str) -> None:
        """The tool was cancelled mid-flight: its effects are unknown."""
        self.finish(tool_use_id, INTERRUPTED_TEXT, True)

    # ---------------------------------------------------------------- queries

    def get(self, tool_use_id: str) -> CallRecord | None:
        self._flush_accepted()
        rec = self._read(_name(tool_use_id))
        return rec if rec is None or rec.tool_use_id == tool_use_id else None

    def pending(self, session_id: str | None = None, older_than: float | None = None) -> list[CallRecord]:
        """Results stored but not yet accepted by the control plane."""
        self._flush_accepted()
        out = []
        cutoff = None if older_than is None else time.time() - older_than
        for entry in _entries(self.root / "pending"):
            rec = self._read(entry.name)
            if rec is None or rec.state != "done":
                entry.unlink(missing_ok=True)  # stale: delivered, dropped or expired
                continue
            if session_id is not None and rec.session_id != session_id:
                continue
            if cutoff is not None and (rec.finished_at is None or rec.finished_at >= cutoff):
                continue
            out.append(rec)
        return sorted(out, key=lambda r: r.started_at)

    def pending_count(self) -> int:
        return len(self.pending())

    def all(self) -> list[CallRecord]:
        self._flush_accepted()
        out = []
        for shard in _entries(self.root / "calls"):
            for p in _entries(shard):
                if p.name.endswith(".call"):
                    rec = self._read(p.name[: -len(".call")])
                    if rec is not None:
                        out.append(rec)
        return sorted(out, key=lambda r: r.started_at)

    def drop(self, tool_use_id: str) -> None:
        """Forget a pending result that can never be delivered (its session is gone)."""
        self._deliver(_name(tool_use_id), any_state=True)


def _entries(d: Path) -> Iterator[Path]:
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return
    for n in names:
        yield d / n


def _age(p: Path, now: float) -> float:
    try:
        return now - p.stat().st_mtime
    except FileNotFoundError:
        return 0.0
