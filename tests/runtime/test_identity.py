"""uid/gid leases: never two live holders, safe across processes and crashes (no Docker needed)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandbox.identity import IdentityAllocator, IdentityError, parse_range

HOLDER = """
import sys, time
from pathlib import Path
from sandbox.identity import IdentityAllocator
a = IdentityAllocator(Path(sys.argv[1]), (int(sys.argv[2]), int(sys.argv[3])))
ident = a.acquire()
print(ident.uid, flush=True)
time.sleep(300)
"""


def _grab(args: tuple[str, int, int]) -> int | None:
    lease_dir, lo, hi = args
    try:
        ident = IdentityAllocator(Path(lease_dir), (lo, hi)).acquire()
    except IdentityError:
        return None
    time.sleep(1.0)  # hold it while the others try
    return ident.uid


def test_concurrent_processes_never_get_the_same_uid(tmp_path: Path) -> None:
    with multiprocessing.get_context("fork").Pool(12) as pool:
        got = pool.map(_grab, [(str(tmp_path), 5000, 5007)] * 12)
    held = [u for u in got if u is not None]
    assert len(held) == len(set(held)) == 8, got  # 8 numbers, 8 holders, 4 refused
    assert got.count(None) == 4


def test_a_killed_holder_frees_its_uid(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), "7000", "7000"], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"7000"
        alloc = IdentityAllocator(tmp_path, (7000, 7000))
        with pytest.raises(IdentityError, match="no free uid"):
            alloc.acquire()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert alloc.acquire().uid == 7000  # the kernel dropped the dead holder's lock
    finally:
        proc.kill()


def test_a_pinned_uid_is_refused_while_held_and_granted_after_release(tmp_path: Path) -> None:
    alloc = IdentityAllocator(tmp_path, (9000, 9010))
    first = alloc.acquire(4242, 4343)
    with pytest.raises(IdentityError, match="held by another live sandbox"):
        alloc.acquire(4242, 1)
    with pytest.raises(IdentityError, match="held by another live sandbox"):
        alloc.acquire(1, 4343)  # the gid counts as well
    first.release()
    assert alloc.acquire(4242, 4343).uid == 4242


def test_a_number_a_live_container_carries_is_never_handed_out(tmp_path: Path) -> None:
    """The engine still lists a container whose owner just died (its lock is gone): skip its number."""
    alloc = IdentityAllocator(tmp_path, (8000, 8001), in_use=lambda: {8000})
    assert alloc.acquire().uid == 8001
    with pytest.raises(IdentityError):
        alloc.acquire()
    with pytest.raises(IdentityError, match="held by another live sandbox"):
        IdentityAllocator(tmp_path, (8000, 8001), in_use=lambda: {8000}).acquire(8000)


def test_lease_dir_owned_by_someone_else_or_world_writable_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "leases"
    d.mkdir()
    os.chmod(d, 0o777)
    with pytest.raises(IdentityError, match="writable by us alone"):
        IdentityAllocator(d, (1, 2)).acquire()


@pytest.mark.parametrize("text", ["0-5", "5-1", "abc", "1-", "-3", "1-2147483647"])
def test_bad_ranges_are_refused_with_the_variable_named(text: str) -> None:
    with pytest.raises(IdentityError, match="SANDBOX_UID_RANGE"):
        parse_range(text)


def test_a_number_found_carried_after_locking_is_skipped_and_a_pinned_one_refused(tmp_path: Path) -> None:
    asked: list[int] = []

    def carried(n: int) -> bool:
        asked.append(n)
        return n == 6000

    alloc = IdentityAllocator(tmp_path, (6000, 6001), carried=carried)
    assert alloc.acquire().uid == 6001
    assert set(asked) <= {6000, 6001}  # only numbers it had just locked were asked about
    with pytest.raises(IdentityError, match="held by another live sandbox"):
        IdentityAllocator(tmp_path / "other", (1, 2), carried=carried).acquire(6000)
    assert not any(p.name == "6000.lock" and _locked(p) for p in tmp_path.iterdir())


def _locked(path: Path) -> bool:
    import fcntl

    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)
