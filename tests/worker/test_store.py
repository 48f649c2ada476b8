"""The session store's locks and the shared journal, without sandboxes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from sandbox.worker.outbox import INTERRUPTED_TEXT, Outbox
from sandbox.worker.store import SessionStore, StoreError, safe_id


def test_a_worker_that_is_gone_is_seen_gone_and_a_live_one_alive(tmp_path: Path) -> None:
    a, b = SessionStore(tmp_path), SessionStore(tmp_path)
    a.register_owner("worker:1:1:aa")
    b.register_owner("worker:2:2:bb")
    assert a.owner_alive("worker:2:2:bb") and b.owner_alive("worker:1:1:aa")
    with pytest.raises(StoreError, match="already registered"):
        SessionStore(tmp_path).register_owner("worker:1:1:aa")
    b.close()  # what a kill -9 does to its flock, too
    assert not a.owner_alive("worker:2:2:bb") and not a.owner_alive("worker:never:0:zz")


def test_the_journal_never_reruns_a_call_and_waits_for_a_live_owner(tmp_path: Path) -> None:
    a, b = SessionStore(tmp_path), SessionStore(tmp_path)
    a.register_owner("A")
    b.register_owner("B")
    ja = Outbox(a.journal_path(), "A", alive=a.owner_alive)
    jb = Outbox(b.journal_path(), "B", alive=b.owner_alive)
    assert ja.begin("t1", "s", "w", "bash").run
    d = jb.begin("t1", "s", "w2", "bash")  # A is alive and running it: B waits, never runs it
    assert not d.run and d.wait
    ja.finish("t1", "done", False)
    d = jb.begin("t1", "s", "w2", "bash")
    assert not d.run and not d.wait and d.record.result.content == "done"  # type: ignore[union-attr]
    assert ja.begin("t2", "s", "w", "bash").run
    a.close()  # A dies mid-call
    assert jb.recover() == 1
    d = jb.begin("t2", "s", "w2", "bash")
    assert not d.run and d.record.result.content == INTERRUPTED_TEXT and d.record.result.is_error  # type: ignore[union-attr]


def test_one_run_per_session_and_removal_refused_while_a_run_holds_it(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    meta, created = store.open_session("sess_1", 8)
    assert created and os.path.ismount(store.workspace_dir(meta.workspace))
    lock = store.try_lock_run("sess_1")
    assert lock is not None and store.try_lock_run("sess_1") is None and store.run_active("sess_1")
    assert not SessionStore(tmp_path).remove_session("sess_1")
    assert store.meta("sess_1") is not None
    assert store.remove_session("sess_1", lock=lock)
    lock.release()
    assert store.meta("sess_1") is None and not store.workspace_dir(meta.workspace).exists()


def test_retention_counts_from_the_last_activity(tmp_path: Path) -> None:
    store = SessionStore(tmp_path, retention_s=60)
    for sid in ("old", "new"):
        store.open_session(sid, 8)
    store.update("old", last_activity=time.time() - 61)
    assert [m.session_id for m in store.expired()] == ["old"]
    for sid in ("old", "new"):
        assert store.remove_session(sid)


def test_session_ids_never_name_another_directory(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    assert store.session_dir("../../etc").parent == tmp_path / "sessions"
    assert safe_id("a/b") == "a_b"
    with pytest.raises(StoreError):
        safe_id("..")


def test_warm_workspaces_of_a_dead_worker_are_orphans_those_of_a_live_one_are_not(tmp_path: Path) -> None:
    live, dead = SessionStore(tmp_path), SessionStore(tmp_path)
    live.register_owner("live")
    dead.register_owner("dead")
    mine, theirs = live.new_workspace(8), dead.new_workspace(8)
    adopted = dead.new_workspace(8)
    live.open_session("sess_a", 8, adopt=adopted)
    dead.close()
    assert live.orphan_workspaces(older_than_s=0) == [theirs]
    for ws in (mine, theirs):
        live.remove_workspace(ws)
    assert live.remove_session("sess_a")
    assert not list((tmp_path / "workspaces").iterdir())


def test_a_worker_whose_store_cannot_cap_workspaces_refuses_to_start(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox.worker import EnvironmentKey, Worker, WorkerConfig, WorkerError

    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no mkfs.ext4, no mount
    worker = Worker(WorkerConfig(base_url="http://127.0.0.1:9", environment_id="env_x", state_dir=tmp_path / "w",
                                 selftest=False), EnvironmentKey("sk-ant-oat01-test-not-a-key", "test"))
    try:
        with pytest.raises(WorkerError, match="cannot make size-capped workspaces.*mkfs.ext4 is not installed"):
            worker._setup()
    finally:
        if worker.store is not None:
            worker.store.close()
        if worker._lock_file is not None:
            worker._lock_file.close()


def test_a_background_worker_that_cannot_start_says_why_instead_of_seeming_to_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox.worker import EnvironmentKey, Worker, WorkerConfig, WorkerError
    from sandbox.worker.runner import BackgroundWorker

    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    worker = Worker(WorkerConfig(base_url="http://127.0.0.1:9", environment_id="env_x", state_dir=tmp_path / "w",
                                 selftest=False), EnvironmentKey("sk-ant-oat01-test-not-a-key", "test"))
    with pytest.raises(WorkerError, match="cannot make size-capped workspaces"):
        BackgroundWorker(worker).start()


def _open_journal(path: str, barrier: object) -> str | None:
    barrier.wait()  # type: ignore[attr-defined]
    try:
        Outbox(Path(path), owner=f"o{os.getpid()}")
        return None
    except Exception as e:  # noqa: BLE001 - the test reports whatever a worker would have died of
        return repr(e)


def test_workers_starting_together_on_one_journal_all_open_it(tmp_path: Path) -> None:
    """Two workers sharing a store start at once: switching the new journal to WAL met the other's lock
    and SQLite said "database is locked" without waiting, so one worker died at start (seen in CI)."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")  # fresh processes, the journal's imports paid once
    ctx.set_forkserver_preload(["sandbox.worker.outbox", __name__])
    errors: list[str] = []
    with ctx.Manager() as manager, ctx.Pool(6) as pool:
        for round_ in range(12):
            barrier = manager.Barrier(6)
            path = str(tmp_path / f"r{round_}" / "journal.db")
            errors += [e for e in pool.starmap(_open_journal, [(path, barrier)] * 6) if e]
    assert not errors, errors


def _listed_bytes(store_root: Path) -> int:
    """What `sandbox session list --json` reports for the store's one session."""
    import json

    from click.testing import CliRunner

    from sandbox.controlplane.cli import session_list

    res = CliRunner().invoke(session_list, ["--store", str(store_root), "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert len(rows) == 1
    return int(rows[0]["workspace_bytes"])


def test_session_list_reports_an_archived_workspace_by_its_archive_not_as_empty(tmp_path: Path) -> None:
    # A store shared by hosts keeps workspaces as archives; `session list` builds its own store
    # object, which does not know the worker chose archives.
    worker_store = SessionStore(tmp_path, host_workspaces=False)
    meta, _ = worker_store.open_session("sess_a", 8)
    worker_store.workspace_archive(meta.workspace).write_bytes(b"x" * 123_457)
    assert SessionStore(tmp_path).workspace_bytes(meta.workspace) == 123_457
    assert _listed_bytes(tmp_path) == 123_457


def test_session_list_counts_a_workspace_not_the_filesystem_under_its_empty_mount_point(tmp_path: Path) -> None:
    from sandbox.worker.store import _umount_lazy

    store = SessionStore(tmp_path)
    meta, _ = store.open_session("sess_h", 16)
    (store.workspace_dir(meta.workspace) / "data").write_bytes(os.urandom(3 << 20))
    mounted = _listed_bytes(tmp_path)
    assert 3 << 20 <= mounted < 16 << 20
    _umount_lazy(store.workspace_dir(meta.workspace))  # as after a host reboot: only the image is left
    assert not os.path.ismount(store.workspace_dir(meta.workspace))
    parent = os.statvfs(tmp_path)
    unmounted = _listed_bytes(tmp_path)
    assert 3 << 20 <= unmounted < 16 << 20 < (parent.f_blocks - parent.f_bfree) * parent.f_frsize
    store.remove_session("sess_h")


@pytest.mark.docker
def test_a_full_session_store_refuses_new_sessions_though_the_state_dir_has_room(tmp_path: Path) -> None:
    """Admission counts free disk where workspaces are kept (--session-store, maybe a volume of
    its own), not on the state dir: else a full store takes sessions it cannot hold."""
    import subprocess

    import anyio

    from sandbox.worker import EnvironmentKey, Worker, WorkerConfig

    store_dir = tmp_path / "store"
    store_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", str(store_dir)], check=True)
    worker = Worker(WorkerConfig(base_url="http://127.0.0.1:9", environment_id="env_x", state_dir=tmp_path / "w",
                                 store_dir=store_dir, selftest=False, warm=0),
                    EnvironmentKey("sk-ant-oat01-test-not-a-key", "test"))
    try:
        worker._setup()
        admission = worker.config.admission
        assert admission is not None
        admission.disk_reserve_mb = 16  # of the 64 MiB store (the state dir has gigabytes)
        assert admission.check().ok
        st = os.statvfs(store_dir)
        with open(store_dir / "fill", "wb") as f:  # leave less than the reserve free on the store only
            f.write(b"\0" * (st.f_bavail * st.f_frsize - (admission.disk_reserve_mb << 20) // 2))
        d = admission.check()
        assert not d.ok and d.resource == "disk", d
        os.unlink(store_dir / "fill")
        assert admission.check().ok
    finally:
        anyio.run(worker._teardown)
        subprocess.run(["umount", "-l", str(store_dir)], check=False)


def test_a_parked_sandbox_sees_it_is_wanted_whatever_the_other_hosts_clock_says(tmp_path: Path) -> None:
    # Host A parks a session's sandbox; host B (another clock, sharing the store) wants the session.
    a, b = SessionStore(tmp_path), SessionStore(tmp_path)
    b.want("sess_1")  # an old request, before the park: not a request to this parking
    mark = a.wanted_mark("sess_1")
    assert not a.wanted_since("sess_1", mark)
    b.want("sess_1")
    # B's clock runs an hour behind A's (or the file server's does): the request still counts.
    os.utime(a.session_dir("sess_1") / "wanted", (time.time() - 3600, time.time() - 3600))
    assert a.wanted_since("sess_1", mark)
    # Parked again later: only a new request counts.
    mark2 = a.wanted_mark("sess_1")
    os.utime(a.session_dir("sess_1") / "wanted", (time.time() + 3600, time.time() + 3600))  # or ahead
    assert not a.wanted_since("sess_1", mark2)
    b.want("sess_1")
    assert a.wanted_since("sess_1", mark2)
    assert not a.wanted_since("sess_never", a.wanted_mark("sess_never"))


@pytest.mark.docker
def test_a_warm_sandbox_over_an_archived_workspace_is_labelled_as_the_pools(runtime, tmp_path: Path) -> None:
    """`docker ps --filter label=org.sandbox.pool=<worker>` finds a worker's warm sandboxes on a
    store shared by hosts (workspaces kept as archives) as on a local one."""
    from sandbox.policy import load_policy
    from sandbox.spec import LABEL_POOL
    from sandbox.worker.pool import start_over

    store = SessionStore(tmp_path, host_workspaces=False)
    ws = store.new_workspace(8)
    sb = start_over(runtime, load_policy("worker"), store, "pool-test", ws, extra_labels={LABEL_POOL: "worker-x"})
    try:
        assert runtime.client.containers.get(sb.id).labels.get(LABEL_POOL) == "worker-x"
    finally:
        sb.destroy()
