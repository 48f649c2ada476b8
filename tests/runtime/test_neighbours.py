"""A neighbour's bomb while another session works: B's commands run *during* A's bomb and succeed.

Each bomb (tests/bombs.py) runs in sandbox A; while it runs, sandbox B runs its job
several times; every run must succeed with the right output. Then the storm: one
sandbox per bomb, all at once, while a fresh sandbox starts and answers. How much B
slows down is measured by bench/bench_neighbours.py (no timing is asserted here).
"""

from __future__ import annotations

import threading
import time

import pytest

from tests.bombs import JOB, Bomb, bombs

pytestmark = [pytest.mark.docker, pytest.mark.neighbours]

BOMB_S = 4.0


def _start_bomb(sb, bomb: Bomb, seconds: float) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        out["res"] = sb.exec(bomb.argv, timeout=seconds + 2)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def _job_ok(b) -> None:
    res = b.exec(JOB, timeout=60)
    assert res.exit_code == 0, res
    assert float(res.stdout) > 0, res


@pytest.mark.parametrize("bomb", bombs(BOMB_S), ids=lambda b: b.name)
def test_bystander_works_during_a_neighbours_bomb(make_sandbox, bomb: Bomb) -> None:
    a = make_sandbox(bomb.profile)
    b = make_sandbox()
    t, out = _start_bomb(a, bomb, BOMB_S)
    time.sleep(0.3)  # the bomb is under way
    runs = 0
    while t.is_alive() and runs < 6:
        _job_ok(b)
        assert b.exec(["sh", "-c", "echo during > /workspace/x && cat /workspace/x"], timeout=60).stdout == b"during\n"
        runs += 1
    assert runs >= 1, "the bomb ended before B ran anything during it"
    t.join(60)
    assert not t.is_alive()
    # A hit its own limits (or ran out its time); the host and B did not notice anything but load.
    assert out["res"].exit_code is not None
    _job_ok(b)


def test_host_stays_responsive_during_a_storm_of_every_bomb(make_sandbox, runtime) -> None:
    """Every bomb at once, each in its own sandbox (16 in all): a fresh sandbox still starts and answers,
    a live one still runs its commands, and every OOM kill the kernel made happened inside a bomb's
    sandbox (no host process, no bystander)."""
    from sandbox.policy import load_policy

    def host_oom_kills() -> int:
        for line in open("/proc/vmstat"):
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        raise AssertionError("no oom_kill in /proc/vmstat")

    kinds = bombs(10.0)
    storm = [make_sandbox(k.profile) for k in (kinds * 2)[:16]]
    bystander = make_sandbox()
    kills_before = host_oom_kills()
    in_sandboxes_before = sum(sb.counters.snapshot()["oom_kill"] or 0 for sb in storm + [bystander])
    threads = [_start_bomb(sb, k, 10.0)[0] for sb, k in zip(storm, (kinds * 2)[:16])]
    time.sleep(2.0)
    fresh = runtime.create(load_policy("default"), session_id="storm-17th")
    try:
        assert fresh.exec(["true"], timeout=60).exit_code == 0
    finally:
        fresh.destroy()
    # and as a user types it, a whole `sandbox exec` process beside the storm's owner
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "sandbox", "exec", "--", "true"], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-500:]
    _job_ok(bystander)
    for t in threads:
        t.join(60)
    _job_ok(bystander)
    in_sandboxes = sum(sb.counters.snapshot()["oom_kill"] or 0 for sb in storm + [bystander]) - in_sandboxes_before
    assert in_sandboxes > 0, "the memory bombs were never OOM-killed: the check below would prove nothing"
    assert host_oom_kills() - kills_before == in_sandboxes, "the kernel OOM-killed something outside the bombs"
    assert (bystander.counters.snapshot()["oom_kill"] or 0) == 0


def _cpu_weight_file(pid: int):
    from pathlib import Path

    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            return Path("/sys/fs/cgroup") / path.lstrip("/") / "cpu.weight"
        if "cpu" in controllers.split(","):
            return Path("/sys/fs/cgroup") / controllers / path.lstrip("/") / "cpu.shares"
    raise AssertionError("no cpu cgroup")


def test_the_startup_boost_never_outlives_the_agents_start(make_sandbox, runtime) -> None:
    """A new sandbox's CPU weight is raised from the host while its agent starts (busy neighbours
    would otherwise slow every create) and is the engine's own value once create() returns:
    the workload never runs with it."""
    from sandbox.runtime import StartupBoost

    sb = make_sandbox()
    pid = runtime.engine.inspect(sb.id)["State"]["Pid"]
    f = _cpu_weight_file(pid)
    before = int(f.read_text())
    assert before in (1024, 100), before  # what the engine set (cpu.shares v1, cpu.weight v2)
    boost = StartupBoost(pid)
    assert boost.file == f and int(f.read_text()) == min(before * StartupBoost.FACTOR, 262144 if before == 1024 else 10000)
    boost.end()
    assert int(f.read_text()) == before
    assert sb.exec(["true"]).exit_code == 0


def test_runc_init_starts_in_the_boosted_cgroup_and_the_workload_never_sees_it(runtime, monkeypatch) -> None:
    """The host makes the container's CPU cgroup (boosted) between the engine's create and start;
    the container really runs in it, and its weight is back to a new cgroup's value before
    create() returns."""
    from sandbox import runtime as rtmod
    from sandbox.policy import load_policy

    made: list = []
    real = rtmod.StartupBoost.before_start.__func__

    def spy(cls, cid, parent="docker"):
        b = real(cls, cid, parent)
        made.append((b, b.made, b.file.read_text().strip() if b.file else None, b.original))
        return b

    monkeypatch.setattr(rtmod.StartupBoost, "before_start", classmethod(spy))
    sb = runtime.create(load_policy("default"), session_id="boost-early")
    try:
        (b, d, boosted, original), = made
        assert d is not None, "the cgroupfs driver's cgroup was not made before start"
        pid = runtime.engine.inspect(sb.id)["State"]["Pid"]
        assert _cpu_weight_file(pid).parent == d  # the engine adopted it
        assert int(boosted) == int(original) * rtmod.StartupBoost.FACTOR
        assert _cpu_weight_file(pid).read_text().strip() == original  # restored before create() returned
        assert sb.exec(["true"]).exit_code == 0
    finally:
        sb.destroy()
    deadline = time.monotonic() + 20
    while d.exists() and time.monotonic() < deadline:  # the engine removes it with the container
        time.sleep(0.1)
    assert not d.exists(), "the cgroup the host made outlived its container"


def test_memory_high_sits_below_the_limit(tmp_path) -> None:
    from sandbox.runtime import set_memory_high

    assert set_memory_high(tmp_path, 512 << 20)
    assert int((tmp_path / "memory.high").read_text()) == int((512 << 20) * 0.9)
    assert not set_memory_high(tmp_path / "gone", 1 << 20)
