"""Skills reach the sandbox read-only at /mnt/skills, as the embedded control plane serves them;
hostile archives (path traversal, absolute names, symlinks and hard links, a bomb, too many files)
are refused without writing outside their directory, and the host is untouched."""

from __future__ import annotations

import io
import secrets
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sandbox.controlplane import ControlPlane, LocalAdmin
from sandbox.worker import EnvironmentKey, Worker, WorkerConfig
from sandbox.worker.runner import BackgroundWorker

from .helpers import LogCapture, call, free_port

pytestmark = pytest.mark.docker


def _zip(path: Path, files: dict[str, bytes], modes: dict[str, int] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = ((modes or {}).get(name, 0o644) | 0o100000) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
    return path


def _tar(path: Path, build: Callable[[tarfile.TarFile], None]) -> Path:
    with tarfile.open(path, "w:gz") as t:
        build(t)
    return path


def _add(t: tarfile.TarFile, name: str, data: bytes = b"x", **kw: Any) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data) if not kw else 0
    for k, v in kw.items():
        setattr(info, k, v)
    t.addfile(info, io.BytesIO(data) if not kw else None)


@pytest.fixture
def archives(tmp_path: Path) -> tuple[dict[str, Path], Path]:
    d = tmp_path / "archives"
    d.mkdir()
    outside = Path("/tmp") / f"skill-escape-{secrets.token_hex(4)}"
    a = {
        "good": _zip(d / "good.zip", {"good/SKILL.md": b"# good\nuse me\n",
                                      "good/scripts/run.sh": b"#!/bin/sh\necho skill-ran\n"},
                     modes={"good/scripts/run.sh": 0o755}),
        "traversal": _zip(d / "traversal.zip", {"t/SKILL.md": b"x", "t/../../../../escape-traversal.txt": b"evil"}),
        "absolute": _tar(d / "absolute.tar.gz", lambda t: (_add(t, "a/SKILL.md"),
                                                           _add(t, str(outside / "abs.txt"), b"evil"))),
        "links": _tar(d / "links.tar.gz", lambda t: (
            _add(t, "links/SKILL.md", b"# links\n"),
            _add(t, "links/passwd", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
            _add(t, "links/hard", type=tarfile.LNKTYPE, linkname="/etc/shadow"),
            _add(t, "links/dev", type=tarfile.CHRTYPE, devmajor=1, devminor=3))),
        "bomb": _zip(d / "bomb.zip", {"bomb/SKILL.md": b"x", "bomb/zeros": b"\0" * (40 << 20)}),
        "many": _zip(d / "many.zip", {f"many/f{i}": b"" for i in range(1500)} | {"many/SKILL.md": b"x"}),
    }
    return a, outside


def test_skills_are_read_only_in_the_sandbox_and_hostile_archives_are_refused(
        tmp_path: Path, archives: tuple[dict[str, Path], Path], docker_client: Any, worker_logs: LogCapture) -> None:
    paths, outside = archives
    with ControlPlane(tmp_path / "cp", port=free_port(), sse_ping_interval=0.5,
                      skills=list(paths.values())) as cp, LocalAdmin(cp.base_url, cp.admin_key) as admin:
        ids = {name: cp.skill_ids[str(p)] for name, p in paths.items()}
        cfg = WorkerConfig(base_url=cp.base_url, environment_id=cp.environment_id, state_dir=tmp_path / "w",
                           store_dir=tmp_path / "sessions", lease_ttl=10, max_idle=30.0, selftest=False,
                           skills_mb=16, skills_inodes=1000)
        with BackgroundWorker(Worker(cfg, EnvironmentKey(cp.environment_key, "test"))):
            sid = admin.create_session(cp.environment_id, skills=list(ids.values()))
            is_error, text, _ = call(admin, sid, "bash", {"command": (
                "ls /mnt/skills | sort | tr '\\n' ' '; echo; cat /mnt/skills/good/SKILL.md;"
                " /mnt/skills/good/scripts/run.sh; ls -A /mnt/skills/links | tr '\\n' ' '; echo;"
                " touch /mnt/skills/good/new 2>&1 | grep -o 'Read-only file system';"
                " grep -c . /mnt/skills/t/SKILL.md 2>&1 | head -1")}, timeout=90)
            lines = text.splitlines()
            # good, and `links` without its links and device: delivered. The rest: refused whole.
            assert lines[0].split() == ["good", "links"], text
            assert lines[1:4] == ["# good", "use me", "skill-ran"], text
            assert lines[4].split() == ["SKILL.md"], text  # no symlink, hard link or device came through
            assert lines[5] == "Read-only file system", text
            admin.terminate(sid)
    # Nothing was written outside the skills directory, on the host.
    assert not outside.exists()
    assert not [p for p in tmp_path.rglob("escape-traversal.txt")]
    assert not Path("/escape-traversal.txt").exists()
    # The run's skills tmpfs is gone with the run.
    with open("/proc/self/mounts") as f:
        assert not [line for line in f if str(tmp_path) in line and "sandbox-skills" in line]


def _skills_mounts(under: Path) -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line for line in f if line.split()[1].startswith(str(under.resolve())) and "sandbox-skills" in line]


def test_a_session_without_skills_runs_without_a_skills_tmpfs(
        tmp_path: Path, cp: ControlPlane, admin: LocalAdmin, start_worker: Callable[..., Worker]) -> None:
    """The session's agent has no skills: the SDK downloads none, so no tmpfs is mounted (and unmounted)
    on the way to its first call; it still runs its calls."""
    start_worker()
    sid = admin.create_session(cp.environment_id)
    is_error, text, _ = call(admin, sid, "bash", {"command": "echo served"}, timeout=90)
    assert (is_error, text.strip()) == (False, "served")
    assert _skills_mounts(tmp_path) == []  # the run is live (its sandbox idles): nothing was ever mounted
    admin.terminate(sid)


def test_the_skills_tmpfs_is_mounted_without_a_mount_program(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mount(2) itself, with the same options as `mount -t tmpfs` had: capped, nosuid, nodev; and unmounted."""
    from sandbox.worker.store import SessionStore

    empty = tmp_path / "no-programs"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no `mount` or `umount` to run
    store = SessionStore(tmp_path / "sessions")
    d = store.skills_dir("sess-1", size_mb=4, inodes=100)
    (line,) = _skills_mounts(tmp_path)
    fields = line.split()
    opts = set(fields[3].split(","))
    assert fields[1] == str(d.resolve()) and fields[2] == "tmpfs"
    assert {"nosuid", "nodev", "size=4096k", "nr_inodes=100", "mode=755"} <= opts, line
    assert store.skills_dir("sess-1", size_mb=4, inodes=100) == d  # kept when already mounted
    assert len(_skills_mounts(tmp_path)) == 1
    store.release_skills_dir("sess-1")
    assert _skills_mounts(tmp_path) == []
