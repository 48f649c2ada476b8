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
