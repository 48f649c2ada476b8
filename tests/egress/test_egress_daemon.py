"""The proxy daemon as the runtime uses it: started on demand, shared, unprivileged,
gone when idle. Everything here uses IP literals or names no rule allows, so the
daemon's real resolver is never asked about anything."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from sandbox.egress.manager import EgressError, EgressManager, proxy_env
from sandbox.egress.rules import EgressPolicy
from sandbox.egress.unixsock import connect_unix
from tests.egress.egress_helpers import Target, parse_response, recv_all, wait_until

pytestmark = pytest.mark.timeout(40)


def _policy(t: Target) -> EgressPolicy:
    return EgressPolicy.model_validate({"allow_cidrs": [f"{t.addr}/32"], "rules": [{"host": "allowed.test", "ports": [443]}]})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/status").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


@pytest.fixture
def mgr(tmp_path: Path):
    m = EgressManager(tmp_path / "state" / "egress", idle_exit_s=1.0)
    yield m
    st = m.status()
    if st:  # never leave a daemon behind (the idle exit itself is tested above)
        os.kill(st["pid"], signal.SIGTERM)
        assert wait_until(lambda: not _alive(st["pid"]), 5)


@pytest.fixture
def target() -> Target:
    t = Target("127.0.0.2").start()
    yield t
    t.close()


def test_daemon_is_started_on_demand_reused_and_exits_when_idle(mgr: EgressManager, target: Target) -> None:
    assert mgr.status() is None  # status never starts it
    d1 = mgr.register("s1", _policy(target))
    pid = mgr.status()["pid"]
    d2 = mgr.register("s2", _policy(target))
    assert mgr.status()["pid"] == pid and sorted(mgr.sessions()) == ["s1", "s2"]
    assert d1.parent == mgr.state_dir / "sessions" and (d1 / "proxy.sock").exists() and d2 != d1
    # The directory's host path shows in the sandbox's mountinfo: it must not reveal the session id.
    assert "s1" not in d1.name and "s2" not in d2.name and len(d1.name) >= 16
    assert mgr.register("s1", _policy(target)) == d1  # idempotent
    mgr.unregister("s1")
    time.sleep(1.5)
    assert mgr.status()["pid"] == pid  # a session remains: it stays
    mgr.unregister("s2")
    assert not d1.exists()
    assert wait_until(lambda: mgr.status() is None, 6)
    assert wait_until(lambda: not _alive(pid), 3)
    d3 = mgr.register("s3", _policy(target))  # and comes back on demand
    assert mgr.status()["pid"] != pid and (d3 / "proxy.sock").exists()


def test_concurrent_registrations_start_exactly_one_daemon(mgr: EgressManager, target: Target) -> None:
    errors: list[BaseException] = []

    def reg(i: int) -> None:
        try:
            EgressManager(mgr.state_dir, idle_exit_s=1.0).register(f"c{i}", _policy(target))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=reg, args=(i,)) for i in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert not errors
    assert sorted(mgr.sessions()) == [f"c{i}" for i in range(6)]
    pid = mgr.status()["pid"]
    daemons = [p for p in os.listdir("/proc") if p.isdigit() and _is_daemon_for(int(p), mgr.state_dir)]
    assert daemons == [str(pid)]


def _is_daemon_for(pid: int, state: Path) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"sandbox.egress.daemon" in cmd and os.fsencode(str(state)) in cmd


@pytest.mark.skipif(os.geteuid() != 0, reason="the privilege drop happens only when started as root")
def test_daemon_started_as_root_runs_as_nobody_without_capabilities(mgr: EgressManager, target: Target) -> None:
    mgr.register("s1", _policy(target))
    st = mgr.status()
    assert st["uid"] == 65534 and st["gid"] == 65534
    status = Path(f"/proc/{st['pid']}/status").read_text()
    for field in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(re.search(rf"^{field}:\s*(\w+)$", status, re.MULTILINE).group(1), 16) == 0, field
    assert re.search(r"^NoNewPrivs:\s*1$", status, re.MULTILINE)
    assert re.search(r"^Groups:\s*$", status, re.MULTILINE)
    # the control socket stays root's: the dropped uid (or anyone else) cannot drive it
    ctl = mgr.state_dir / "control.sock"
    assert ctl.stat().st_uid == 0 and ctl.stat().st_mode & 0o777 == 0o600
    # the daemon's environment carries nothing of ours (API keys live in the runtime's)
    env = Path(f"/proc/{st['pid']}/environ").read_bytes().split(b"\0")
    assert {e.split(b"=")[0] for e in env if e} <= {b"PATH", b"PYTHONPATH", b"LANG", b"SANDBOX_EGRESS_LOOP"}
    # not dumpable: it holds credential values and CA keys, and another process of its uid
    # (nobody) must not read its memory: /proc/<pid>/mem stays root's
    assert Path(f"/proc/{st['pid']}/mem").stat().st_uid == 0


def test_session_socket_enforces_policy_and_audits_per_session(mgr: EgressManager, target: Target) -> None:
    d = mgr.register("s1", _policy(target))
    with connect_unix(d / "proxy.sock", timeout=5) as s:
        s.sendall(f"GET http://{target.addr}:{target.port}/ok?secret=x HTTP/1.1\r\nHost: {target.addr}:{target.port}\r\n\r\n".encode())
        ok = parse_response(recv_all(s))
    with connect_unix(d / "proxy.sock", timeout=5) as s:
        s.sendall(b"CONNECT evil.test:443 HTTP/1.1\r\n\r\n")
        denied = parse_response(recv_all(s))
    assert ok.status == 200 and ok.body == b"ok:/ok?secret=x"
    # the daemon runs on uvloop (evloop.py) unless told otherwise
    assert mgr.status()["loop"] == ("asyncio" if os.environ.get("SANDBOX_EGRESS_LOOP") == "asyncio" else "uvloop")
    assert denied.status == 403 and denied.headers["x-sandbox-egress-denied"].startswith("no-matching-rule")
    assert wait_until(lambda: len(mgr.records(session="s1")) == 2)
    recs = mgr.records(session="s1")
    assert [r["decision"] for r in recs] == ["allow", "deny"] and recs[0]["path"] == "/ok"
    assert mgr.records(session="other") == []
    from sandbox.egress.audit import session_file

    text = session_file(mgr.audit_path, "s1").read_text()
    assert '"path":"/ok"' in text and "secret" not in text + mgr.audit_path.read_text()


def test_sandbox_uid_can_connect_to_its_socket_through_the_mounted_dir(mgr: EgressManager, target: Target) -> None:
    """What a container sees is the session dir mounted at /run/sandbox-egress; reach it the
    same way (a directory handle, no access to the ancestors) as an unprivileged uid."""
    if os.geteuid() != 0:
        pytest.skip("needs root to become another uid")
    d = mgr.register("s1", _policy(target))
    dir_fd = os.open(d, os.O_PATH | os.O_DIRECTORY)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: become a sandbox-like uid, then use only the dir handle
        try:
            os.setgroups([])
            os.setresgid(1000, 1000, 1000)
            os.setresuid(1000, 1000, 1000)
            s = connect_unix(Path(f"/proc/self/fd/{dir_fd}/proxy.sock"), timeout=5)
            s.sendall(f"GET http://{target.addr}:{target.port}/as-1000 HTTP/1.1\r\nHost: {target.addr}:{target.port}\r\n\r\n".encode())
            os.write(w, recv_all(s)[:12])
        except BaseException as e:  # noqa: BLE001
            os.write(w, repr(e).encode()[:200])
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    out = os.read(r, 300)
    os.close(r)
    os.close(dir_fd)
    assert out.startswith(b"HTTP/1.1 200"), out


def test_policy_without_rules_gets_no_proxy_socket(mgr: EgressManager) -> None:
    with pytest.raises(EgressError):
        mgr.register("s1", EgressPolicy())
    assert mgr.status() is None


@pytest.mark.parametrize("sid", ["../escape", "a/b", "", ".hidden", "x" * 65])
def test_path_traversal_session_ids_are_refused(mgr: EgressManager, target: Target, sid: str) -> None:
    with pytest.raises(EgressError):
        mgr.register(sid, _policy(target))
    assert not (mgr.state_dir.parent / "escape").exists()


def test_unregister_without_a_daemon_is_a_noop(mgr: EgressManager) -> None:
    mgr.unregister("never-registered")
    assert mgr.status() is None


def test_proxy_env_points_every_client_at_the_forwarder() -> None:
    env = proxy_env()
    assert env["HTTP_PROXY"] == env["https_proxy"] == "http://127.0.0.1:3128"
    assert env["NO_PROXY"] == env["no_proxy"] == "localhost,127.0.0.1"
