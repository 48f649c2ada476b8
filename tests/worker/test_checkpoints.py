"""Checkpoints of a workspace: byte-for-byte round trip, only changed files copied, never
modified in place, symlinks never followed, bounded count and bytes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandbox.worker.checkpoints import CheckpointError, Checkpoints, workspace_digest


def _tree(root: Path) -> dict[str, tuple[str, bytes | str, int]]:
    out: dict[str, tuple[str, bytes | str, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("l", os.readlink(p), 0)
            elif p.is_dir():
                out[rel] = ("d", "", p.stat().st_mode & 0o7777)
            else:
                out[rel] = ("f", p.read_bytes(), p.stat().st_mode & 0o7777)
    return out


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    w = tmp_path / "ws"
    (w / "src" / "deep").mkdir(parents=True)
    (w / "src" / "a.py").write_text("print('a')\n")
    (w / "src" / "deep" / "blob.bin").write_bytes(os.urandom(200_000))
    (w / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (w / "run.sh").chmod(0o755)
    (w / "empty").mkdir()
    os.symlink("/etc/passwd", w / "leak")  # kept as a link, never read through
    return w


def test_restore_round_trips_the_workspace_byte_for_byte(tmp_path: Path, ws: Path) -> None:
    cps = Checkpoints(tmp_path / "sess")
    before = _tree(ws)
    one = cps.create(ws, calls=3)
    assert one is not None and one.calls == 3 and one.digest == workspace_digest(ws)
    (ws / "src" / "a.py").write_text("changed\n")
    (ws / "new.txt").write_text("new")
    (ws / "run.sh").unlink()
    (ws / "empty").rmdir()
    assert workspace_digest(ws) != one.digest
    restored = cps.restore(one.id, ws)
    assert restored.digest == one.digest == workspace_digest(ws)
    assert _tree(ws) == before
    # The symlink came back as a symlink; its target's bytes were never copied.
    assert os.readlink(ws / "leak") == "/etc/passwd"
    assert b"root:" not in b"".join(p.read_bytes() for p in (tmp_path / "sess").rglob("*")
                                    if p.is_file() and not p.is_symlink())


def test_only_changed_files_are_copied_and_checkpoints_never_share_a_changed_file(tmp_path: Path, ws: Path) -> None:
    cps = Checkpoints(tmp_path / "sess")
    one = cps.create(ws)
    assert one is not None and one.bytes_new == one.bytes_total
    blob = ws / "src" / "deep" / "blob.bin"
    with open(blob, "r+b") as f:  # modified in place, as tools do
        f.write(b"XXXX")
    two = cps.create(ws)
    assert two is not None and two.bytes_new == blob.stat().st_size  # only the changed file was copied
    ck1, ck2 = (tmp_path / "sess" / "checkpoints" / c.id / "files" for c in (one, two))
    assert os.stat(ck1 / "src" / "a.py").st_ino == os.stat(ck2 / "src" / "a.py").st_ino  # linked, not copied
    assert (ck1 / "src" / "deep" / "blob.bin").read_bytes()[:4] != b"XXXX"  # the first checkpoint is untouched
    cps.restore(one.id, ws)
    assert blob.read_bytes()[:4] != b"XXXX" and workspace_digest(ws) == one.digest


def test_a_change_hidden_behind_a_restored_mtime_is_still_caught(tmp_path: Path, ws: Path) -> None:
    cps = Checkpoints(tmp_path / "sess")
    one = cps.create(ws)
    a = ws / "src" / "a.py"
    st = a.stat()
    a.write_text("print('b')\n")  # same size
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back, as `touch -d` would
    two = cps.create(ws)
    assert one is not None and two is not None and two.digest != one.digest and two.bytes_new == st.st_size


def test_count_and_bytes_are_bounded_oldest_dropped_first(tmp_path: Path, ws: Path) -> None:
    cps = Checkpoints(tmp_path / "sess", max_count=3, max_bytes=1 << 20)
    ids = []
    for i in range(5):
        (ws / f"f{i}").write_text(str(i))
        c = cps.create(ws)
        assert c is not None
        ids.append(c.id)
    assert [c.id for c in cps.list()] == ids[-3:]
    # Bytes: 300 KB new each time against a 1 MiB budget -> older ones go.
    small = Checkpoints(tmp_path / "s2", max_count=10, max_bytes=1 << 20)
    for i in range(6):
        (ws / "src" / "deep" / "blob.bin").write_bytes(os.urandom(300_000))
        small.create(ws)
    assert small.stored_bytes() <= 1 << 20 and len(small.list()) < 6
    # A workspace bigger than the whole budget is not checkpointed at all.
    tiny = Checkpoints(tmp_path / "s3", max_bytes=1000)
    assert tiny.create(ws) is None and tiny.list() == []


def test_a_tampered_checkpoint_is_refused_before_the_workspace_is_touched(tmp_path: Path, ws: Path) -> None:
    cps = Checkpoints(tmp_path / "sess")
    one = cps.create(ws)
    assert one is not None
    (ws / "after.txt").write_text("keep me")
    victim = tmp_path / "sess" / "checkpoints" / one.id / "files" / "src" / "a.py"
    victim.write_text("tampered")  # someone on the host edits a checkpoint
    with pytest.raises(CheckpointError, match="does not match"):
        cps.restore(one.id, ws)
    assert (ws / "after.txt").read_text() == "keep me"
    with pytest.raises(CheckpointError, match="no checkpoint"):
        cps.restore("../../etc", ws)


# ---------------------------------------------------------------------- a cluster session's checkpoints: its archives


def _archive(tmp_path: Path, data: bytes) -> Path:
    """The store's archive of a cluster workspace, replaced as pool.save_workspace replaces it (a new file)."""
    dest = tmp_path / "workspaces" / "ws1.tar"
    dest.parent.mkdir(exist_ok=True)
    tmp = dest.with_name(".ws1.tar.tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o600)
    os.replace(tmp, dest)
    return dest


def test_an_archive_checkpoint_keeps_the_archive_as_it_was_and_restores_it_byte_for_byte(tmp_path: Path) -> None:
    import hashlib

    cps = Checkpoints(tmp_path / "sess")
    archive = _archive(tmp_path, b"first state: opaque bytes the sandbox wrote")
    one = cps.create_from_archive(archive, calls=4)
    assert one is not None and one.kind == "archive" and one.calls == 4
    assert one.digest == "sha256:" + hashlib.sha256(b"first state: opaque bytes the sandbox wrote").hexdigest()
    kept = tmp_path / "sess" / "checkpoints" / one.id / "workspace.tar"
    assert os.path.samefile(kept, archive), "a link, not a copy"
    # The next sandbox's save replaces the archive (a new file): the checkpoint keeps the old bytes.
    _archive(tmp_path, b"second state")
    two = cps.create_from_archive(archive)
    assert two is not None and two.bytes_new == len(b"second state") and two.digest != one.digest
    assert kept.read_bytes() == b"first state: opaque bytes the sandbox wrote"
    # Unchanged since the last checkpoint: nothing new stored.
    three = cps.create_from_archive(archive)
    assert three is not None and three.bytes_new == 0 and three.digest == two.digest
    assert [c.id for c in cps.list()] == [one.id, two.id, three.id]
    restored = cps.restore_archive(one.id, archive)
    assert restored.digest == one.digest and archive.read_bytes() == b"first state: opaque bytes the sandbox wrote"
    assert archive.stat().st_mode & 0o777 == 0o600
    # the restored archive is the checkpoint's file: a later save replaces it, never writes into it
    _archive(tmp_path, b"after the restore")
    assert kept.read_bytes() == b"first state: opaque bytes the sandbox wrote"


def test_a_tampered_archive_checkpoint_is_refused_before_the_sessions_archive_is_touched(tmp_path: Path) -> None:
    cps = Checkpoints(tmp_path / "sess")
    archive = _archive(tmp_path, b"good state")
    one = cps.create_from_archive(archive)
    assert one is not None
    _archive(tmp_path, b"current state")
    kept = tmp_path / "sess" / "checkpoints" / one.id / "workspace.tar"
    kept.write_bytes(b"someone on the host edits a checkpoint")
    with pytest.raises(CheckpointError, match="does not match its recorded digest"):
        cps.restore_archive(one.id, archive)
    assert archive.read_bytes() == b"current state"


def test_archive_and_tree_checkpoints_are_never_restored_as_the_other(tmp_path: Path, ws: Path) -> None:
    from sandbox.worker.store import SessionStore

    cps = Checkpoints(tmp_path / "sess")
    tree = cps.create(ws)
    archive = _archive(tmp_path, b"a cluster sandbox's tar")
    arch = cps.create_from_archive(archive)
    assert tree is not None and arch is not None
    # An archive is never unpacked on the worker's host, whatever asks.
    with pytest.raises(CheckpointError, match="cluster workspace archive.*never unpacked"):
        cps.restore(arch.id, ws)
    with pytest.raises(CheckpointError, match="is a workspace tree"):
        cps.restore_archive(tree.id, archive)
    # restore_into_store picks by the checkpoint's kind: an archive goes back as the store's archive.
    store = SessionStore(tmp_path / "store", host_workspaces=False)
    meta, _ = store.open_session("s1", 64)
    other = Checkpoints(store.session_dir("s1"))
    _archive(tmp_path, b"state to come back to")
    saved = other.create_from_archive(archive)
    assert saved is not None
    from sandbox.worker.checkpoints import restore_into_store

    assert restore_into_store(store, "s1", meta.workspace, saved.id).digest == saved.digest
    assert store.workspace_archive(meta.workspace).read_bytes() == b"state to come back to"


def test_archive_checkpoints_are_bounded_by_count_and_bytes(tmp_path: Path) -> None:
    cps = Checkpoints(tmp_path / "sess", max_count=2, max_bytes=10_000)
    archive = _archive(tmp_path, b"x" * 20_000)
    assert cps.create_from_archive(archive) is None, "an archive over the whole budget is not kept"
    ids = []
    for i in range(3):
        _archive(tmp_path, bytes([65 + i]) * 3000)
        info = cps.create_from_archive(archive)
        assert info is not None
        ids.append(info.id)
    assert [c.id for c in cps.list()] == ids[1:] and cps.stored_bytes() <= 10_000
    assert cps.create_from_archive(tmp_path / "workspaces" / "missing.tar") is None
