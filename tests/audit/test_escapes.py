"""Known container escapes, each performed against a real sandbox and asserted to fail.

Complements tests/runtime/test_attacks.py (fork/memory/disk bombs, the blocked-syscall
list, /proc/sys and /sys writes, host devices, the Docker socket, secrets) with the
published escape classes the audit checks for. Nothing here writes to a host kernel
interface even if an attack got through: "writable" is proven by open(O_WRONLY), and
the host-side state each attack targets is compared before and after.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import textwrap
import threading
import time
from pathlib import Path

import pytest

from sandbox.engine import Engine, EngineError, engine_socket_path
from sandbox.spec import Binds, compile_spec

pytestmark = [pytest.mark.docker, pytest.mark.timeout(120)]


def py(code: str) -> list[str]:
    return ["python3", "-c", textwrap.dedent(code)]


def run_json(sb, code: str, timeout: float = 60) -> dict:
    res = sb.exec(py(code), timeout=timeout)
    assert res.exit_code == 0, (res.stdout, res.stderr, res.error)
    return json.loads(res.stdout.decode().strip().splitlines()[-1])


def sha256_file(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_cve_2019_5736_overwrite_runtime_binary_via_proc_self_exe_fails(make_sandbox, docker_client) -> None:
    """The attack waits for the runtime to enter the container (docker exec) and opens that
    process's /proc/PID/exe for writing, directly or by re-opening an O_PATH descriptor."""
    runc = shutil.which("runc") or "/usr/sbin/runc"
    before = sha256_file(runc)
    sb = make_sandbox()
    result: dict = {}

    def attacker() -> None:
        result.update(run_json(sb, """
        import json, os, time
        mine, hits, seen, tries = os.getpid(), [], set(), 0
        end = time.time() + 5
        while time.time() < end:
            for p in os.listdir('/proc'):
                if not p.isdigit() or int(p) in (1, mine, os.getppid()):
                    continue
                seen.add(p)
                for how in ('direct', 'o_path'):
                    tries += 1
                    pfd = None
                    try:
                        if how == 'direct':
                            fd = os.open('/proc/%s/exe' % p, os.O_WRONLY)
                        else:
                            pfd = os.open('/proc/%s/exe' % p, os.O_PATH)
                            fd = os.open('/proc/self/fd/%d' % pfd, os.O_WRONLY)
                        hits.append((p, how, os.readlink('/proc/%s/exe' % p)))
                        os.close(fd)
                    except OSError:
                        pass
                    finally:
                        if pfd is not None:
                            os.close(pfd)
        for p in ('self', '1'):
            try:
                os.close(os.open('/proc/%s/exe' % p, os.O_WRONLY)); hits.append((p, 'own', ''))
            except OSError:
                pass
        print(json.dumps({'hits': hits, 'seen': len(seen), 'tries': tries}))
        """))

    t = threading.Thread(target=attacker)
    t.start()
    time.sleep(1.0)
    for _ in range(5):  # the runtime (runc exec) enters the container while the attacker watches
        ex = docker_client.api.exec_create(sb.id, ["sleep", "0.3"])
        docker_client.api.exec_start(ex["Id"])
    t.join(timeout=60)
    assert result.get("hits") == [], result
    assert result["seen"] >= 1, "the attacker saw the runtime's processes enter"
    assert sha256_file(runc) == before


@pytest.mark.parametrize("fd", [3, 4, 5, 6, 7, 8, 9])
def test_cve_2024_21626_leaked_fd_workdir_escape_fails(docker_client, fd: int) -> None:
    """A working directory of /proc/self/fd/N made runc (< 1.1.12) start the process inside a
    host directory it had left open. The sandbox spec with that working directory must not
    start, or must start with a cwd inside the container."""
    from sandbox.policy import load_policy

    body = compile_spec(load_policy("default"), "cve-2024-21626", Binds()).body
    body.update({"WorkingDir": f"/proc/self/fd/{fd}", "Cmd": ["sh", "-c", "cd .. && cd .. && cd .. && ls -a"],
                 "OpenStdin": False, "AttachStdin": False, "Labels": {"org.sandbox.audit-test": "cve-2024-21626"}})
    body["HostConfig"].update({"AutoRemove": False, "LogConfig": {"Type": "json-file", "Config": {}}})
    engine = Engine(engine_socket_path() or "/var/run/docker.sock")
    cid = engine.create(body, name=f"audit-cve-2024-21626-{fd}-{int(time.time() * 1000) % 100000}")
    try:
        try:
            engine.start(cid)
        except EngineError as e:
            assert "cwd" in e.explanation or "directory" in e.explanation or "outside" in e.explanation, e
            return
        docker_client.api.wait(cid, timeout=30)
        out = docker_client.api.logs(cid).decode()
        assert "sandbox-runtime" not in out and "containers" not in out and "overlay2" not in out, out
    finally:
        docker_client.api.remove_container(cid, force=True)


@pytest.mark.parametrize("fd", [4, 5, 6, 7, 8])
def test_cve_2024_21626_exec_with_leaked_fd_workdir_fails(make_sandbox, docker_client, fd: int) -> None:
    sb = make_sandbox()
    ex = docker_client.api.exec_create(sb.id, ["sh", "-c", "pwd; ls ../../.."], workdir=f"/proc/self/fd/{fd}")
    out = docker_client.api.exec_start(ex["Id"]).decode()
    code = docker_client.api.exec_inspect(ex["Id"])["ExitCode"]
    assert code != 0, out
    assert "overlay2" not in out and "containers" not in out


def test_leaked_descriptors_of_sandbox_processes_lead_nowhere_outside(make_sandbox) -> None:
    from sandbox.audit.runner import run_in_sandbox

    sb = make_sandbox()
    probe, _ = run_in_sandbox(sb, ["fds"])
    assert probe is not None and probe["fds"]["leaks"] == [] and probe["fds"]["cwd_escapes"] is False, probe
    assert probe["fds"]["checked"] >= 3


def _host_release_agents() -> dict[str, str]:
    out = {}
    for p in Path("/sys/fs/cgroup").glob("*/release_agent"):
        try:
            out[str(p)] = p.read_text()
        except OSError:
            pass
    return out


def test_cve_2022_0492_cgroup_release_agent_escape_fails(make_sandbox) -> None:
    before = _host_release_agents()
    sb = make_sandbox()
    # The published exploit, with the image's own util-linux: a user namespace to become
    # "root", a cgroup v1 mount, then a write to release_agent.
    attack = ("mkdir -p /tmp/cg && unshare -UrmC --propagation=unchanged sh -c "
              "'mount -t cgroup -o rdma cgroup /tmp/cg && echo /tmp/x > /tmp/cg/release_agent "
              "&& echo ESCAPED'; echo rc=$?")
    shell = sb.exec(["sh", "-c", attack], timeout=30)
    assert b"ESCAPED" not in shell.stdout, shell
    assert b"unshare" in shell.stderr or b"Operation not permitted" in shell.stderr, shell
    from sandbox.audit.runner import run_in_sandbox

    probe, _ = run_in_sandbox(sb, ["release_agent"])
    ra = probe["release_agent"]
    assert "opened" not in json.dumps(ra), ra
    assert ra["attack"]["unshare"].endswith("EPERM"), ra
    assert _host_release_agents() == before


def test_core_pattern_overwrite_for_host_code_execution_fails(make_sandbox) -> None:
    before = Path("/proc/sys/kernel/core_pattern").read_text()
    sb = make_sandbox()
    res = sb.exec(["sh", "-c", ("echo '|/tmp/pwn' > /proc/sys/kernel/core_pattern; echo rc=$?; "
                               "python3 -c \"import os; os.open('/proc/sys/kernel/core_pattern', os.O_WRONLY)\"")],
                  timeout=30)
    assert b"rc=0" not in res.stdout and res.exit_code != 0, res
    assert Path("/proc/sys/kernel/core_pattern").read_text() == before


def test_usermode_helper_hooks_cannot_be_opened_for_writing(make_sandbox) -> None:
    sb = make_sandbox()
    out = run_json(sb, """
    import json, os
    r = {}
    for p in ('/proc/sys/kernel/modprobe', '/sys/kernel/uevent_helper', '/proc/sys/fs/binfmt_misc/register',
              '/proc/sysrq-trigger', '/proc/sys/kernel/core_pattern'):
        try:
            os.close(os.open(p, os.O_WRONLY)); r[p] = 'opened'
        except OSError as e:
            r[p] = e.errno
    print(json.dumps(r))
    """)
    assert "opened" not in out.values(), out


def test_kernel_keyring_access_fails(make_sandbox) -> None:
    sb = make_sandbox()
    out = run_json(sb, """
    import ctypes, json
    libc = ctypes.CDLL(None, use_errno=True)
    r = {}
    for name, nr, args in (('keyctl', 250, (0, -3, 1)), ('add_key', 248, (0, 0, 0, 0, 0)), ('request_key', 249, (0, 0, 0, 0))):
        ctypes.set_errno(0)
        ret = libc.syscall(nr, *[ctypes.c_long(a) for a in args])
        r[name] = ctypes.get_errno() if ret == -1 else 'ok'
    print(json.dumps(r))
    """)
    assert out == {"keyctl": 1, "add_key": 1, "request_key": 1}, out  # EPERM: the session keyring stays out of reach


def test_ptrace_attach_to_a_sibling_process_fails(make_sandbox) -> None:
    sb = make_sandbox()
    out = run_json(sb, """
    import ctypes, json, os, signal, subprocess
    libc = ctypes.CDLL(None, use_errno=True)
    child = subprocess.Popen(['sleep', '30'])
    ctypes.set_errno(0)
    r = libc.syscall(101, ctypes.c_long(16), ctypes.c_long(child.pid), 0, 0)  # PTRACE_ATTACH, same uid
    err = ctypes.get_errno()
    mem = None
    try:
        open('/proc/%d/mem' % child.pid, 'rb').read(1)
    except OSError as e:
        mem = e.errno
    child.kill()
    print(json.dumps({'attach': err if r == -1 else 'attached', 'mem': mem}))
    """)
    assert out["attach"] == 1 and out["mem"] is not None, out


def test_user_namespace_creation_fails(make_sandbox) -> None:
    sb = make_sandbox()
    res = sb.exec(["sh", "-c", "unshare -U id -u; echo rc=$?; unshare -Ur id -u; echo rc=$?"], timeout=30)
    assert res.stdout.count(b"rc=0") == 0, res
    out = run_json(sb, """
    import ctypes, json, os
    libc = ctypes.CDLL(None, use_errno=True)
    r = {}
    for name, flags in (('user', 0x10000000), ('user+mount', 0x10020000), ('user+net', 0x50000000)):
        pid = os.fork()
        if pid == 0:
            ctypes.set_errno(0)
            os._exit(0 if libc.unshare(flags) == 0 else ctypes.get_errno())
        r[name] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    print(json.dumps(r))
    """)
    assert set(out.values()) == {1}, out


def test_metadata_address_connect_fails_immediately_with_enetunreach(make_sandbox) -> None:
    sb = make_sandbox()
    out = run_json(sb, """
    import errno, json, socket, time
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.connect(('169.254.169.254', 80)); routed = True  # UDP connect sends nothing: a route lookup only
    except OSError as e:
        routed = e.errno
    r = {'route': routed}
    if routed is not True:  # only with no route can a TCP connect not emit a packet
        s = socket.socket(); s.settimeout(5); t = time.time()
        try:
            s.connect(('169.254.169.254', 80)); r['tcp'] = 'connected'
        except OSError as e:
            r['tcp'] = errno.errorcode.get(e.errno, str(e.errno))
        r['seconds'] = time.time() - t
    print(json.dumps(r))
    """)
    assert out["route"] != True and out["tcp"] == "ENETUNREACH" and out["seconds"] < 0.5, out


def test_dns_lookup_of_an_outside_name_fails(make_sandbox) -> None:
    sb = make_sandbox()
    res = sb.exec(["sh", "-c", ("cat /etc/resolv.conf; getent hosts example.com; echo rc=$?; "
                               "python3 -c \"import socket; socket.getaddrinfo('pypi.org', 443)\"")], timeout=30)
    assert b"nameserver" not in res.stdout or b"127." in res.stdout, res  # nothing routable to ask
    assert b"rc=0" not in res.stdout and res.exit_code != 0, res


def test_proc_kcore_and_kernel_state_files_are_masked(make_sandbox) -> None:
    sb = make_sandbox()
    out = run_json(sb, """
    import json, os
    r = {}
    for p in ('/proc/kcore', '/proc/keys', '/proc/timer_list', '/proc/sched_debug', '/sys/firmware'):
        try:
            r[p] = len(os.listdir(p)) if os.path.isdir(p) else len(open(p, 'rb').read(4096))
        except OSError as e:
            r[p] = 'err%d' % e.errno
    print(json.dumps(r))
    """)
    assert all(v == 0 or str(v).startswith("err") for v in out.values()), out


def test_mknod_of_a_host_block_device_fails(make_sandbox) -> None:
    sb = make_sandbox()
    res = sb.exec(["sh", "-c", ("mknod /tmp/sda b 8 0 && echo MADE; mknod /workspace/mem c 1 1 && echo MADE; "
                               "python3 -c \"import os; os.mknod('/tmp/x', 0o600 | 0o60000, os.makedev(8, 0))\"")],
                  timeout=30)
    assert b"MADE" not in res.stdout and res.exit_code != 0, res
