"""The call journal in both forms (SQLite for one host, plain files for a shared network filesystem).

Every rule of the journal is checked against both; the file form also against what a network
filesystem cannot give it (locks, shared memory) and against workers racing and dying as
separate processes."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from sandbox.worker.journal import (
    LOCAL_FILESYSTEMS,
    Journal,
    choose_kind,
    filesystem_of,
    open_journal,
)
from sandbox.worker.journal_files import FileJournal
from sandbox.worker.outbox import INTERRUPTED_TEXT, Outbox
from sandbox.worker.store import SessionStore, StoreError

KINDS = ["sqlite", "files"]


def _journal(store: SessionStore, kind: str, owner: str, **kw: Any) -> Journal:
    if kind == "files":
        return FileJournal(store.journal_dir(), owner, alive=store.owner_alive, **kw)
    return Outbox(store.journal_path(), owner, alive=store.owner_alive, **kw)


def _alone(tmp_path: Path, kind: str) -> Journal:
    """One live worker "A" on a fresh store."""
    store = SessionStore(tmp_path)
    store.register_owner("A")
    return _journal(store, kind, "A")


# ------------------------------------------------------------------ the rules, in both forms

@pytest.mark.parametrize("kind", KINDS)
def test_a_call_is_never_run_twice_even_after_delivery(tmp_path: Path, kind: str) -> None:
    j = _alone(tmp_path, kind)
    assert j.begin("t1", "s1", "w1", "bash").run
    j.finish("t1", [{"type": "text", "text": "out"}], False)
    again = j.begin("t1", "s1", "w2", "bash")
    assert not again.run and again.record and again.record.result
    assert again.record.result.content == [{"type": "text", "text": "out"}]
    assert [r.tool_use_id for r in j.pending()] == ["t1"] and j.pending_count() == 1
    assert j.delivered(["t1"]) == 1 and j.pending() == [] and j.pending_count() == 0
    gone = j.begin("t1", "s1", "w3", "bash")
    assert not gone.run and gone.record and gone.record.state == "delivered" and gone.record.result is None
    assert j.get("t1").state == "delivered"  # type: ignore[union-attr]
    assert j.get("never") is None


@pytest.mark.parametrize("kind", KINDS)
def test_a_live_owners_call_is_waited_for_and_a_dead_owners_is_interrupted(tmp_path: Path, kind: str) -> None:
    a, b = SessionStore(tmp_path), SessionStore(tmp_path)
    a.register_owner("A")
    b.register_owner("B")
    ja, jb = _journal(a, kind, "A"), _journal(b, kind, "B")
    assert ja.begin("t1", "s", "w", "bash").run
    d = jb.begin("t1", "s", "w2", "bash")
    assert not d.run and d.wait  # A is alive and running it: B never runs it
    ja.finish("t1", "done", False)
    d = jb.begin("t1", "s", "w2", "bash")
    assert not d.run and not d.wait and d.record and d.record.result and d.record.result.content == "done"
    assert ja.begin("t2", "s", "w", "bash").run
    assert ja.begin("t3", "s", "w", "bash").run
    a.close()  # A dies mid-call (what a kill -9 does to its owner lock)
    assert jb.recover() == 2
    d = jb.begin("t2", "s", "w2", "bash")
    assert not d.run and d.record and d.record.result
    assert d.record.result.content == INTERRUPTED_TEXT and d.record.result.is_error
    ja.finish("t3", "too late", False)  # A's result after B answered it: the first answer stands
    assert jb.get("t3").result.content == INTERRUPTED_TEXT  # type: ignore[union-attr]


@pytest.mark.parametrize("kind", KINDS)
def test_begin_itself_answers_a_dead_owners_call_as_interrupted(tmp_path: Path, kind: str) -> None:
    a, b = SessionStore(tmp_path), SessionStore(tmp_path)
    a.register_owner("A")
    b.register_owner("B")
    assert _journal(a, kind, "A").begin("t1", "s", "w", "bash").run
    a.close()
    d = _journal(b, kind, "B").begin("t1", "s", "w2", "bash")  # no recover first: a re-dispatch
    assert not d.run and d.record and d.record.result and d.record.result.content == INTERRUPTED_TEXT


@pytest.mark.parametrize("kind", KINDS)
def test_accepted_results_are_marked_before_anything_reads_them(tmp_path: Path, kind: str) -> None:
    j = _alone(tmp_path, kind)
    ids = [f"t{i}" for i in range(40)]
    for t in ids:
        assert j.begin(t, "s1", "w1", "bash").run
        j.finish(t, "out", False)
    j.delivered_later(ids[:-1])
    assert [r.tool_use_id for r in j.pending()] == [ids[-1]]
    assert not j.begin(ids[0], "s1", "w2", "bash").run


@pytest.mark.parametrize("kind", KINDS)
def test_pending_filters_by_session_and_age_and_drop_forgets_even_a_running_call(tmp_path: Path, kind: str) -> None:
    j = _alone(tmp_path, kind)
    for t, s in (("t1", "s1"), ("t2", "s2")):
        assert j.begin(t, s, "w", "bash").run
        j.finish(t, t, False)
    assert [r.tool_use_id for r in j.pending("s2")] == ["t2"]
    assert j.pending(older_than=3600) == []
    time.sleep(0.05)
    assert {r.tool_use_id for r in j.pending(older_than=0.01)} == {"t1", "t2"}
    j.drop("t1")
    assert [r.tool_use_id for r in j.pending()] == ["t2"]
    assert j.begin("t3", "s1", "w", "bash").run
    j.drop("t3")  # its session is gone while it ran
    j.finish("t3", "late", False)
    assert j.get("t3").state == "delivered" and not j.begin("t3", "s1", "w", "bash").run  # type: ignore[union-attr]
    assert [r.tool_use_id for r in j.all()] == ["t1", "t2", "t3"]


@pytest.mark.parametrize("kind", KINDS)
def test_abandon_answers_interrupted_and_never_reruns(tmp_path: Path, kind: str) -> None:
    j = _alone(tmp_path, kind)
    assert j.begin("t1", "s1", "w1", "read").run
    j.abandon("t1")
    rec = j.get("t1")
    assert rec and rec.result and rec.result.content == INTERRUPTED_TEXT and rec.result.is_error
    assert not j.begin("t1", "s1", "w1", "read").run


# ------------------------------------------------------------------ the file form's own attacks

def test_the_file_journal_needs_no_lock_no_sqlite_and_no_shared_memory(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """What a network filesystem gets wrong is never asked of it: every lock call, SQLite and mmap fail
    here, and a whole life of calls still works."""
    import fcntl
    import mmap
    import sqlite3

    journal = FileJournal(tmp_path / "journal", "A", synchronous="FULL", alive=lambda o: o == "A")

    def refused(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("the file journal asked for a lock, SQLite or shared memory")

    for mod, name in ((fcntl, "flock"), (fcntl, "lockf"), (fcntl, "fcntl"), (sqlite3, "connect"), (mmap, "mmap")):
        monkeypatch.setattr(mod, name, refused)
    assert journal.begin("t1", "s", "w", "bash").run
    assert journal.begin("t1", "s", "w", "bash").wait
    journal.finish("t1", "ok", False)
    assert journal.pending()[0].result.content == "ok"  # type: ignore[union-attr]
    journal.delivered(["t1"])
    assert journal.begin("t2", "s", "w", "bash").run
    other = FileJournal(tmp_path / "journal", "B", alive=lambda o: o == "B")  # A is gone for B
    assert other.recover() == 1 and not other.begin("t1", "s", "w", "bash").run


def test_ids_that_a_path_would_mangle_stay_apart(tmp_path: Path) -> None:
    j = FileJournal(tmp_path / "journal", "A")
    for t in ("a/b", "a_b", "a..b", "../../etc", "x" * 300):
        assert j.begin(t, "s", "w", "bash").run, t
        j.finish(t, t, False)
    assert sorted(r.result.content for r in j.pending()) == sorted(  # type: ignore[union-attr]
        ["a/b", "a_b", "a..b", "../../etc", "x" * 300])
    assert not any(p.name == "etc" for p in tmp_path.rglob("*"))


def test_a_crash_between_two_steps_leaves_nothing_that_misleads(tmp_path: Path) -> None:
    """A worker killed between the steps of a write leaves only stale hints: a running mark with no
    claim, a pending mark for a delivered result, a private half-written file. None of them makes a call
    run twice or lose its result, and the next recover tidies them."""
    j = FileJournal(tmp_path / "journal", "B", alive=lambda o: o == "B")
    root = tmp_path / "journal"
    (root / "running" / "deadbeef.A").write_bytes(b"")  # marked, never claimed (older than the grace)
    old = time.time() - 7200
    os.utime(root / "running" / "deadbeef.A", (old, old))
    (root / "tmp" / "A.half").write_bytes(b'{"tool_use')  # a private file, never linked
    os.utime(root / "tmp" / "A.half", (old, old))
    assert j.begin("t1", "s", "w", "bash").run
    j.finish("t1", "r", False)
    j.delivered(["t1"])
    from sandbox.worker.journal_files import _name

    (root / "pending" / _name("t1")).write_bytes(b"")  # as if killed before unmarking it
    assert j.pending() == [] and not (root / "pending" / _name("t1")).exists()
    assert j.recover() == 0
    assert list((root / "running").iterdir()) == [] and list((root / "tmp").iterdir()) == []
    assert not j.begin("t1", "s", "w", "bash").run


def _race(root: str, owner: str, ids: list[str], barrier: Any) -> list[str]:
    j = FileJournal(Path(root), owner, alive=lambda _o: True)
    barrier.wait()
    won = []
    for t in ids:
        d = j.begin(t, "s", "w", "bash")
        if d.run:
            won.append(t)
            j.finish(t, owner, False)
        else:
            assert d.wait or d.record is not None
    return won


def test_workers_racing_as_processes_on_the_file_journal_claim_each_call_once(tmp_path: Path) -> None:
    """Four processes claim the same 200 calls at once: every call is claimed by exactly one, and its
    stored result is that winner's."""
    ctx = multiprocessing.get_context("spawn")
    ids = [f"toolu_{i:04d}" for i in range(200)]
    with ctx.Manager() as manager, ctx.Pool(4) as pool:
        barrier = manager.Barrier(4)
        won = pool.starmap(_race, [(str(tmp_path / "journal"), f"w{i}", ids, barrier) for i in range(4)])
    claimed = [t for w in won for t in w]
    assert sorted(claimed) == sorted(ids), "a call claimed twice or never"
    reader = FileJournal(tmp_path / "journal", "reader")
    for i, w in enumerate(won):
        for t in w:
            assert reader.get(t).result.content == f"w{i}"  # type: ignore[union-attr]


def _claim_and_hang(store_root: str, ready: Any) -> None:
    store = SessionStore(Path(store_root))
    store.register_owner("doomed")
    j = open_journal(store, "doomed", requested="files", alive=store.owner_alive)
    assert j.begin("toolu_hang", "s", "w", "bash").run
    ready.set()
    time.sleep(600)


def test_a_worker_killed_mid_call_is_answered_interrupted_by_the_next_one(tmp_path: Path) -> None:
    """A real worker process claims a call on the file journal and is SIGKILLed while running it; another
    worker on the same store recovers it as interrupted (never re-run), its owner lock freed by the kill."""
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_claim_and_hang, args=(str(tmp_path), ready))
    proc.start()
    try:
        assert ready.wait(60), "the doomed worker never claimed its call"
        survivor = SessionStore(tmp_path)
        survivor.register_owner("survivor")
        j = open_journal(survivor, "survivor", alive=survivor.owner_alive)
        assert isinstance(j, FileJournal)  # the store's kind was set by the first worker
        d = j.begin("toolu_hang", "s", "w2", "bash")
        assert not d.run and d.wait  # alive: waited for
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        assert j.recover() == 1
        d = j.begin("toolu_hang", "s", "w2", "bash")
        assert not d.run and d.record and d.record.result and d.record.result.content == INTERRUPTED_TEXT
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(10)


# ------------------------------------------------------------------ which form a store uses

def test_a_store_keeps_the_journal_its_first_worker_chose_and_refuses_the_other(tmp_path: Path) -> None:
    store = SessionStore(tmp_path / "nfs")
    assert choose_kind(store, "auto", fstype=lambda _p: "nfs4") == "files"
    assert (tmp_path / "nfs" / "journal.kind").read_text().strip() == "files"
    assert choose_kind(store, "auto", fstype=lambda _p: "ext4") == "files"  # kept, whatever the probe says
    with pytest.raises(StoreError, match=r"journal\.kind.*'files'.*'sqlite'"):
        choose_kind(store, "sqlite")
    local = SessionStore(tmp_path / "local")
    assert choose_kind(local, "auto", fstype=lambda _p: "ext4") == "sqlite"
    for fs in ("ceph", "fuse.sshfs", "cifs", "nfs", ""):
        fresh = SessionStore(tmp_path / f"fresh-{fs or 'unknown'}")
        assert choose_kind(fresh, "auto", fstype=lambda _p, fs=fs: fs) == "files", fs
    with pytest.raises(StoreError, match="must be one of"):
        choose_kind(SessionStore(tmp_path / "x"), "postgres")


def test_a_store_made_before_the_choice_was_recorded_keeps_sqlite(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    Outbox(store.journal_path(), "old").close()
    assert choose_kind(store, "auto", fstype=lambda _p: "nfs4") == "sqlite"
    with pytest.raises(StoreError, match="asked for 'files'"):
        choose_kind(store, "files")


def test_a_damaged_choice_is_an_error_naming_the_file(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    store.journal_kind_path().write_text("mysql\n")
    with pytest.raises(StoreError, match=r"journal\.kind: unknown journal kind 'mysql'"):
        choose_kind(store)


def test_the_filesystem_is_read_from_the_longest_mount_above_the_store(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        "90 22 0:50 / /srv/state rw,relatime shared:5 - nfs4 server:/export rw,vers=4.2\n"
        "91 90 0:51 / /srv/state/local rw - tmpfs tmpfs rw\n"
        "92 22 0:52 / /srv/state2 rw - ceph 10.0.0.1:/ rw\n"
    )
    assert filesystem_of(Path("/srv/state/sessions"), str(info)) == "nfs4"
    assert filesystem_of(Path("/srv/state/local/x"), str(info)) == "tmpfs"
    assert filesystem_of(Path("/srv/state2"), str(info)) == "ceph"
    assert filesystem_of(Path("/srv/stateX"), str(info)) == "ext4"
    assert filesystem_of(Path("/x"), str(tmp_path / "missing")) == ""
    assert filesystem_of(tmp_path) in LOCAL_FILESYSTEMS  # this machine's own disk: SQLite stays


def test_the_loops_result_store_never_waits_and_loses_no_accepted_result(tmp_path: Path) -> None:
    """`try_finish` runs on the worker's event loop (where the sandbox's channel is read): while another
    process holds the journal's write lock it answers False at once, has written nothing, and keeps the
    results the control plane accepted meanwhile for the next write. It never revives a settled call."""
    import sqlite3

    path = tmp_path / "o.db"
    ob = Outbox(path, owner="w:1:1", synchronous="NORMAL")
    assert ob.finishes_on_loop
    for t in ("t0", "t1", "t2"):
        assert ob.begin(t, "s1", "w1", "bash").run
    ob.finish("t0", "zero", False)
    ob.delivered_later(["t0"])
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another worker process mid-transaction
    try:
        assert ob.try_finish("t1", "one", False) is False
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert ob._nowait is not None and ob._nowait.execute("PRAGMA busy_timeout").fetchone()[0] == 0
    reader = sqlite3.connect(path)
    assert reader.execute("SELECT state FROM calls WHERE tool_use_id='t1'").fetchone()[0] == "running"
    assert reader.execute("SELECT state FROM calls WHERE tool_use_id='t0'").fetchone()[0] == "done"
    assert ob.try_finish("t1", "one", True) is True
    assert reader.execute("SELECT state, content, is_error FROM calls WHERE tool_use_id='t1'").fetchone() == \
        ("done", '"one"', 1)
    # The accepted result kept from the failed attempt went with that write.
    assert reader.execute("SELECT state FROM calls WHERE tool_use_id='t0'").fetchone()[0] == "delivered"
    ob.abandon("t2")  # settled as interrupted: a late result does not replace it
    assert ob.try_finish("t2", "late", False) is True
    assert ob.get("t2").result.content == INTERRUPTED_TEXT  # type: ignore[union-attr]
    with pytest.raises(TypeError):  # unstorable content: raised, and nothing is lost with it
        ob.delivered_later(["t1"])
        ob.try_finish("t2", object(), False)
    assert ob.try_finish("t2", "late", False) and ob.get("t1").state == "delivered"  # type: ignore[union-attr]
    reader.close()
    full = Outbox(tmp_path / "full.db", owner="w:1:1", synchronous="FULL")
    assert not full.finishes_on_loop and full.try_finish("t1", "x", False) is False  # FULL fsyncs: never on the loop
    files = _alone(tmp_path / "f", "files")
    assert not files.finishes_on_loop and files.try_finish("t1", "x", False) is False


def test_a_worker_storing_every_result_on_its_loop_still_keeps_the_journal_small(tmp_path: Path) -> None:
    """The loop's no-wait connection never checkpoints (that fsyncs); without a checkpoint from time to time
    the WAL would grow by every call a worker ever ran."""
    ob = Outbox(tmp_path / "o.db", owner="w:1:1", synchronous="NORMAL")
    wal = tmp_path / "o.db-wal"
    on_thread = 0
    for i in range(3000):
        tid = f"t{i}"
        assert ob.try_begin(tid, "s1", "w1", "bash") is not None
        if not ob.try_finish(tid, "x" * 200, False):
            ob.finish(tid, "x" * 200, False)  # what the worker does then, in a thread
            on_thread += 1
        ob.delivered_later([tid])
    assert wal.stat().st_size < 8 << 20, wal.stat().st_size
    assert 0 < on_thread < 3000 // 64  # a few checkpoint turns, the rest on the loop
