"""A fleet on one queue: two `sandbox worker` processes, each with its own state directory (as two hosts
would have), reach one embedded control plane over TLS at its advertised URL and share one session store.
Every call is answered exactly once, both workers work, and a session whose next run lands on the other
worker finds its files. A worker that does not trust the control plane's CA, or would send its key in clear
off the host, does not start. Real sockets on loopback, real TLS, real sandboxes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.controlplane import ControlPlane, LocalAdmin
from sandbox.controlplane.tls import ServerTls, ensure_generated
from sandbox.worker.store import SessionStore

from .helpers import free_port, log_events, results, text_of, wait_for

SESSIONS, CALLS = 4, 3


@pytest.fixture
def fleet_cp(tmp_path: Path) -> Iterator[ControlPlane]:
    """The control plane serves TLS with its generated CA and advertises https://localhost:PORT, the URL a
    worker elsewhere would be given; the test's clients use that URL too."""
    port = free_port()
    with ControlPlane(tmp_path / "cp", port=port, tls=ServerTls(), advertise_url=f"https://localhost:{port}",
                      sse_ping_interval=0.5) as plane:
        yield plane


def _key_file(tmp_path: Path, cp: ControlPlane) -> Path:
    path = tmp_path / "env.key"
    path.write_text(cp.environment_key)
    path.chmod(0o600)
    return path


def _worker_argv(cp: ControlPlane, key_file: Path, *extra: str, base_url: str | None = None) -> list[str]:
    return [sys.executable, "-m", "sandbox.cli", "worker", "--base-url", base_url or cp.advertise_url,
            "--environment-id", cp.environment_id, "--environment-key-file", str(key_file), *extra]


def _host_env(state_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC_") and k != "SANDBOX_STATE_DIR"}
    env["SANDBOX_STATE_DIR"] = str(state_dir)  # a host of its own: worker lock, runtime, egress, policy cache
    return env


@pytest.fixture
def fleet_worker(fleet_cp: ControlPlane, tmp_path: Path,
                 docker_client: Any) -> Iterator[Callable[[str], subprocess.Popen[bytes]]]:
    """`sandbox worker` as a process on "host" NAME: its own SANDBOX_STATE_DIR (<tmp>/host-NAME), the shared
    session store (<tmp>/shared-sessions) with the journal two hosts share it by (plain files, as on a network
    filesystem: SQLite is never opened), the control plane's CA; log in <tmp>/NAME.log."""
    procs: list[subprocess.Popen[bytes]] = []
    key_file = _key_file(tmp_path, fleet_cp)

    def spawn(name: str) -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"{name}.log", "ab")  # noqa: SIM115 - owned by the process
        p = subprocess.Popen(
            _worker_argv(fleet_cp, key_file, "--ca-file", str(fleet_cp.ca_file),
                         "--session-store", str(tmp_path / "shared-sessions"), "--max-sessions", "2",
                         "--lease-ttl", "10", "--max-idle", "1", "--journal", "files"),
            stdout=log, stderr=subprocess.STDOUT, env=_host_env(tmp_path / f"host-{name}"), start_new_session=True)
        procs.append(p)
        return p

    yield spawn
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def _started(log: Path, proc: subprocess.Popen[bytes]) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"worker exited with {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
    return bool(log_events(log, "worker_started"))


@pytest.mark.docker
@pytest.mark.timeout(900)  # two worker start-ups (attack canaries each) and 16 calls on a shared 2-core host
def test_two_workers_on_two_state_dirs_share_one_queue_over_tls_and_answer_every_call_once(
        fleet_cp: ControlPlane, fleet_worker: Callable[[str], subprocess.Popen[bytes]], tmp_path: Path) -> None:
    cp = fleet_cp
    procs = {name: fleet_worker(name) for name in ("a", "b")}
    for name, p in procs.items():
        wait_for(lambda n=name, p=p: _started(tmp_path / f"{n}.log", p), timeout=240, interval=0.5,  # type: ignore[misc]
                 what=f"worker {name} to start")
    shared = SessionStore(tmp_path / "shared-sessions")
    with LocalAdmin(cp.advertise_url, cp.admin_key, ca_file=cp.ca_file) as admin:
        sids = [admin.create_session(cp.environment_id) for _ in range(SESSIONS)]
        sent: dict[str, list[str]] = {s: [] for s in sids}
        errors: list[BaseException] = []

        def turn_one(sid: str) -> None:
            # Each worker holds at most 2 sessions and a run lasts until its turn ends: with 4 sessions
            # whose calls are all answered before any turn ends, both workers must serve.
            try:
                with LocalAdmin(cp.advertise_url, cp.admin_key, ca_file=cp.ca_file) as a:
                    ids = [a.send_tool_use(sid, "bash", {"command": f"echo call-{i} >> fleet.txt; echo {i}"})
                           for i in range(CALLS)]
                    sent[sid].extend(ids)
                    wait_for(lambda: {e["tool_use_id"] for e in results(a, sid)} >= set(ids), timeout=300,
                             interval=0.5, what=f"the calls of {sid}")
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=turn_one, args=(s,)) for s in sids]
        for t in threads:
            t.start()
        for t in threads:
            t.join(420)
        assert not errors, errors[:2]
        by_worker = {n: Counter(r["tool_use_id"] for r in log_events(tmp_path / f"{n}.log", "tool_exec"))
                     for n in procs}
        assert all(sum(c.values()) > 0 for c in by_worker.values()), by_worker  # both workers did work
        # End every turn; each run goes idle and ends, leaving the workspace in the shared store.
        for sid in sids:
            admin.send_idle(sid)
        for sid in sids:
            wait_for(lambda s=sid: (m := shared.meta(s)) is not None and m.runs >= 1 and not shared.run_active(s),  # type: ignore[misc]
                     timeout=120, interval=0.5, what=f"the first run of {sid} to end")

        # Worker a goes away; every session's next run is served by b, from its own state dir, and finds
        # the files its first run wrote, whichever worker that was.
        procs["a"].send_signal(signal.SIGTERM)
        assert procs["a"].wait(90) == 0
        checks: dict[str, str] = {}
        seen: dict[str, dict[str, Any]] = {}

        def turn_two(sid: str) -> None:
            # b holds 2 sessions at a time: each turn ends once answered, so the next session gets its slot.
            try:
                with LocalAdmin(cp.advertise_url, cp.admin_key, ca_file=cp.ca_file) as a:
                    tid = checks[sid] = a.send_tool_use(sid, "bash", {"command": "sort fleet.txt"})
                    sent[sid].append(tid)
                    seen[sid] = wait_for(lambda: next((e for e in results(a, sid) if e["tool_use_id"] == tid), None),
                                         timeout=300, interval=0.5, what=f"the second run of {sid}")
                    a.send_idle(sid)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=turn_two, args=(s,)) for s in sids]
        for t in threads:
            t.start()
        for t in threads:
            t.join(420)
        assert not errors, errors[:2]
        for ev in seen.values():
            assert not ev.get("is_error") and text_of(ev) == "\n".join(f"call-{i}" for i in range(CALLS)), ev

        # Every call answered exactly once, as the control plane recorded it.
        posted: Counter[str] = Counter()
        for sid in sids:
            got = Counter(e["tool_use_id"] for e in results(admin, sid))
            assert set(got) == set(sent[sid]), sid  # nothing lost, nothing unknown
            posted.update(got)
        assert sum(posted.values()) == SESSIONS * (CALLS + 1) and max(posted.values()) == 1
        executed = Counter(r["tool_use_id"] for n in procs for r in log_events(tmp_path / f"{n}.log", "tool_exec"))
        assert executed == Counter({t: 1 for ids in sent.values() for t in ids})  # each ran once, on one worker
        assert all(t in Counter(r["tool_use_id"] for r in log_events(tmp_path / "b.log", "tool_exec"))
                   for t in checks.values())
        # Shared by hosts, the store never holds a mountable workspace image (two kernels would corrupt
        # it): each session's files crossed between the workers as the archive its sandbox wrote.
        assert not list((shared.root / "workspaces").glob("*.img"))
        for sid in sids:
            meta = shared.meta(sid)
            assert meta is not None and shared.workspace_archive(meta.workspace).is_file(), sid
            admin.terminate(sid)

    # Each worker kept its own state where its host's layout says; the store is the one shared path.
    for name in procs:
        assert (tmp_path / f"host-{name}" / "worker" / "worker.lock").exists()
        assert not (tmp_path / f"host-{name}" / "sessions").exists()
    assert shared.journal_kind_path().read_text().strip() == "files" and not shared.journal_path().exists()
    assert not list((shared.journal_dir() / "running").iterdir())  # no call left claimed and unanswered
    logs = "".join((tmp_path / f"{n}.log").read_text(errors="replace") for n in procs)
    assert cp.environment_key not in logs and "sk-ant-req-" not in logs


# ------------------------------------------------------------------ workers that must not start (no Docker needed)


def test_a_worker_that_does_not_trust_the_control_planes_ca_does_not_start(fleet_cp: ControlPlane,
                                                                          tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    wrong_ca = ensure_generated(elsewhere, ["localhost"])[2]
    key_file = _key_file(tmp_path, fleet_cp)
    for extra, trust in ((["--ca-file", str(wrong_ca)], str(wrong_ca)), ([], "system's CA store")):
        res = subprocess.run(_worker_argv(fleet_cp, key_file, *extra), env=_host_env(tmp_path / "host"),
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 2, res.stderr
        assert f"cannot verify the control plane's TLS certificate at {fleet_cp.advertise_url}" in res.stderr
        assert "unable to get local issuer certificate" in res.stderr and trust in res.stderr
        assert "sk-ant-" not in res.stdout + res.stderr and fleet_cp.environment_key not in res.stdout + res.stderr
        assert not (tmp_path / "host" / "worker" / "worker.lock").exists()  # stopped before it set up anything


def test_a_worker_refuses_to_send_its_key_in_clear_off_this_host(fleet_cp: ControlPlane, tmp_path: Path) -> None:
    key_file = _key_file(tmp_path, fleet_cp)
    res = subprocess.run(_worker_argv(fleet_cp, key_file, base_url="http://192.0.2.10:7787"),
                         env=_host_env(tmp_path / "host"), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "refusing to send the environment key in clear to http://192.0.2.10:7787" \
        in res.stderr, res.stderr
    res = subprocess.run(_worker_argv(fleet_cp, key_file, "--ca-file", str(fleet_cp.ca_file),
                                      base_url="http://127.0.0.1:9"),
                         env=_host_env(tmp_path / "host"), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "is for an https control plane" in res.stderr, res.stderr


def test_a_worker_on_the_control_planes_host_takes_the_ca_from_endpoint_json(fleet_cp: ControlPlane,
                                                                             tmp_path: Path) -> None:
    """Without --base-url the worker reads endpoint.json: its https URL and its CA file. Pointing that CA
    entry at another CA makes the start fail on it, which shows the worker used it."""
    import json

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    wrong_ca = ensure_generated(elsewhere, ["localhost"])[2]
    endpoint = tmp_path / "cp" / "endpoint.json"
    doc = json.loads(endpoint.read_text())
    assert doc["ca_file"] == str(fleet_cp.ca_file) and doc["base_url"].startswith("https://127.0.0.1:")
    endpoint.write_text(json.dumps({**doc, "ca_file": str(wrong_ca)}))
    res = subprocess.run([sys.executable, "-m", "sandbox.cli", "worker", "--control-plane-state-dir",
                          str(tmp_path / "cp")], env=_host_env(tmp_path / "host"), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and f"at {doc['base_url']}" in res.stderr and str(wrong_ca) in res.stderr, res.stderr
    assert "sk-ant-" not in res.stdout + res.stderr
