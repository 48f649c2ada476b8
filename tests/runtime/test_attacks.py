"""Attacks from inside a real sandbox. Each asserts the attack failed, and that the
host and a second, concurrent sandbox (the bystander) were unaffected."""

from __future__ import annotations

import os
import shutil
import socket
import textwrap
import threading

import pytest

pytestmark = pytest.mark.docker

FAKE_SECRET = "fake-secret-7f3a9c-never-inside"


@pytest.fixture(scope="module")
def bystander(runtime):
    from sandbox.policy import load_policy

    sb = runtime.create(load_policy("default"), session_id="bystander")
    sb.exec(["sh", "-c", "echo bystander-data > /workspace/mine"])
    yield sb
    sb.destroy()


def assert_unaffected(bystander) -> None:
    res = bystander.exec(["sh", "-c", "cat /workspace/mine && echo alive"], timeout=20)
    assert res.exit_code == 0 and res.stdout == b"bystander-data\nalive\n", res
    free = shutil.disk_usage("/").free
    assert free > 1 << 30, "host disk nearly full"


def py(code: str) -> list[str]:
    return ["python3", "-c", textwrap.dedent(code)]


def test_fork_bomb_hits_pids_limit(make_sandbox, bystander) -> None:
    sb = make_sandbox()
    res = sb.exec(["bash", "-c", "bomb() { bomb | bomb & }; bomb; sleep 5"], timeout=8)
    assert "pids" in res.limits, res
    assert_unaffected(bystander)
    # The sandbox itself recovers once the bomb is gone.
    assert sb.exec(["true"], timeout=20).exit_code == 0


def test_memory_bomb_is_oom_killed(make_sandbox, bystander) -> None:
    sb = make_sandbox()
    res = sb.exec(py("x = []\nwhile True: x.append(bytearray(16 << 20))"), timeout=60)
    assert res.limit == "memory", res
    assert res.signal == 9 or res.exit_code == 137
    assert_unaffected(bystander)


def test_infinite_loop_hits_timeout(make_sandbox, bystander) -> None:
    sb = make_sandbox()
    res = sb.exec(["sh", "-c", "while :; do :; done"], timeout=2)
    assert res.limit == "timeout", res
    assert 2 <= res.duration < 10
    assert sb.exec(["echo", "still-usable"]).stdout == b"still-usable\n"
    assert_unaffected(bystander)


def test_output_flood_is_capped_and_stopped(make_sandbox, bystander) -> None:
    sb = make_sandbox()
    cap = 1 << 20
    res = sb.exec(["sh", "-c", "yes aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"], timeout=60, max_output=cap)
    assert res.limit == "output" and res.truncated, res
    assert len(res.stdout) + len(res.stderr) <= cap
    assert res.duration < 30  # stopped at the cap, not at the timeout
    assert_unaffected(bystander)


@pytest.mark.parametrize("target", ["/workspace/fill", "/tmp/fill"])
def test_disk_fill_gets_enospc_and_host_disk_untouched(make_sandbox, bystander, target: str) -> None:
    sb = make_sandbox()
    before = shutil.disk_usage("/").free
    res = sb.exec(["sh", "-c", f"for i in $(seq 1 400); do head -c 1048576 /dev/zero >> {target}.$((i % 3)) || exit 9; done"],
                  timeout=60)
    assert res.exit_code == 9, res
    assert b"No space left on device" in res.stderr
    assert before - shutil.disk_usage("/").free < 64 << 20
    assert_unaffected(bystander)


def test_disk_workspace_fill_gets_enospc(make_sandbox, bystander) -> None:
    sb = make_sandbox({"name": "disk", "workspace": {"backing": "disk", "size_mb": 32}})
    assert sb.workspace_dir is not None and os.path.ismount(sb.workspace_dir)
    assert oct(os.stat(sb.workspace_dir).st_mode & 0o777) == "0o700"
    assert os.stat(sb.workspace_dir).st_uid == sb.uid and sb.uid != 0
    res = sb.exec(["sh", "-c", "head -c 100000000 /dev/zero > /workspace/big; echo $?"], timeout=60)
    assert b"No space left on device" in res.stderr, res
    img = sb.workspace_dir.parent / f"{sb.workspace_dir.name}.img"
    assert os.stat(img).st_blocks * 512 <= 33 << 20  # the host file never grows past the cap
    ws = sb.workspace_dir
    sb.destroy()
    assert not ws.exists() and not img.exists()
    assert_unaffected(bystander)


def test_file_size_rlimit(make_sandbox) -> None:
    sb = make_sandbox({"name": "fsize", "rlimits": {"fsize_mb": 4}})
    res = sb.exec(["sh", "-c", "head -c 10000000 /dev/zero > /workspace/f"], timeout=30)
    assert res.limit == "fsize", res


BLOCKED = {
    "mount": (165, 0), "umount2": (166, 0), "unshare": (272, 0x10000000), "setns": (308, 0), "ptrace": (101, 16),
    "process_vm_readv": (310, 1), "process_vm_writev": (311, 1), "bpf": (321, 0), "keyctl": (250, 0),
    "add_key": (248, 0), "request_key": (249, 0), "perf_event_open": (298, 0), "userfaultfd": (323, 0),
    "io_uring_setup": (425, 8), "io_uring_enter": (426, 0), "io_uring_register": (427, 0), "kexec_load": (246, 0),
    "kexec_file_load": (320, 0), "init_module": (175, 0), "finit_module": (313, 0), "delete_module": (176, 0),
    "open_by_handle_at": (304, 0), "name_to_handle_at": (303, 0), "clock_settime": (227, 0),
    "settimeofday": (164, 0), "adjtimex": (159, 0), "swapon": (167, 0), "swapoff": (168, 0), "reboot": (169, 0),
    "acct": (163, 0), "pivot_root": (155, 0), "chroot": (161, 0), "syslog": (103, 0), "personality": (135, 0x0040000),
}


def blocked_syscall_errnos(sb) -> dict[str, object]:
    """Call every syscall in BLOCKED inside the sandbox: name -> errno, or "succeeded"."""
    import json

    code = f"""
    import ctypes, json
    libc = ctypes.CDLL(None, use_errno=True)
    out = {{}}
    for name, (nr, arg) in {BLOCKED!r}.items():
        ctypes.set_errno(0)
        r = libc.syscall(nr, ctypes.c_long(arg), 0, 0, 0, 0)
        out[name] = ctypes.get_errno() if r == -1 else "succeeded"
    print(json.dumps(out))
    """
    return json.loads(sb.exec(py(code), timeout=60).stdout)


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="syscall numbers below are x86_64")
def test_every_blocked_syscall_fails_with_eperm(make_sandbox, bystander) -> None:
    results = blocked_syscall_errnos(make_sandbox())
    assert results == {name: 1 for name in BLOCKED}, results  # 1 == EPERM
    assert_unaffected(bystander)


def test_everyday_tools_work(make_sandbox) -> None:
    sb = make_sandbox()
    script = ("set -e; cd /workspace; git init -q repo; cd repo; echo hello > a.txt; "
              "git -c user.email=a@b -c user.name=n add a.txt; git -c user.email=a@b -c user.name=n commit -qm m; "
              "grep -r hello . >/dev/null; rg hello >/dev/null; ls -la | wc -l >/dev/null; sort a.txt | uniq | wc -c; "
              "python3 -c 'import json, subprocess, threading, sqlite3; print(subprocess.check_output([\"echo\", \"sub\"]).decode().strip())'; "
              "ps aux >/dev/null; tar czf /tmp/x.tgz a.txt; echo ok")
    res = sb.exec(["bash", "-c", script], timeout=60)
    assert res.exit_code == 0, res
    assert res.stdout.endswith(b"sub\nok\n"), res


@pytest.mark.parametrize("target", ["/proc/sys/kernel/hostname", "/proc/sys/vm/drop_caches", "/sys/kernel/uevent_helper",
                                    "/proc/sysrq-trigger", "/etc/passwd", "/usr/bin/python3", "/opt/sandbox-agent/agent.py",
                                    "/newfile"])
def test_writes_outside_workspace_and_tmp_fail(make_sandbox, target: str) -> None:
    sb = make_sandbox()
    res = sb.exec(["sh", "-c", f"echo x > {target}"], timeout=20)
    assert res.exit_code != 0, res
    assert any(e in res.stderr for e in (b"Read-only file system", b"Permission denied", b"No such file",
                                         b"nonexistent")), res


def test_only_workspace_and_tmpfs_are_writable(make_sandbox) -> None:
    sb = make_sandbox()
    res = sb.exec(["sh", "-c", "find / -xdev -writable -type d 2>/dev/null; "
                              "for d in /workspace /tmp /dev/shm /proc /sys /dev; do find $d -maxdepth 0 -writable; done"], timeout=60)
    dirs = set(res.stdout.decode().split())
    assert dirs <= {"/workspace", "/tmp", "/dev/shm", "/dev/mqueue"}, dirs


def test_no_setuid_or_setgid_binaries(make_sandbox) -> None:
    sb = make_sandbox()
    res = sb.exec(["sh", "-c", "find / -xdev -perm /6000 -type f 2>/dev/null"], timeout=60)
    assert res.stdout == b"", res.stdout


def test_runs_as_its_leased_non_root_user_without_capabilities(make_sandbox) -> None:
    sb = make_sandbox()
    res = sb.exec(["sh", "-c", "id -u; id -g; id -G; grep -E '^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs|Seccomp):' /proc/self/status"])
    lines = res.stdout.decode().split("\n")
    assert sb.uid and sb.uid > 0
    assert lines[:3] == [str(sb.uid), str(sb.gid), str(sb.gid)]
    status = dict(line.split(":\t") for line in lines[3:] if line)
    assert all(status[k] == "0000000000000000" for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")), status
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
    assert sb.exec(["sh", "-c", "su -c id root </dev/null"]).exit_code != 0


def test_caller_secret_never_reaches_the_sandbox(make_sandbox, monkeypatch) -> None:
    monkeypatch.setenv("SANDBOX_TEST_FAKE_SECRET", FAKE_SECRET)
    monkeypatch.setenv("ANTHROPIC_API_KEY", FAKE_SECRET)
    sb = make_sandbox()
    res = sb.exec(["sh", "-c", "env; cat /proc/1/environ /proc/*/environ 2>/dev/null | tr '\\0' '\\n'; "
                              "grep -rs " + FAKE_SECRET + " /workspace /tmp /etc /opt /run 2>/dev/null; true"])
    assert FAKE_SECRET.encode() not in res.stdout + res.stderr
    assert b"ANTHROPIC" not in res.stdout


def test_host_devices_are_absent(make_sandbox) -> None:
    sb = make_sandbox()
    res = sb.exec(["sh", "-c", "ls /dev; for d in /dev/sda /dev/vda /dev/mem /dev/kmem /dev/port /dev/kmsg /dev/loop0; "
                              "do [ -e $d ] && echo PRESENT $d; done; head -c1 /dev/vda 2>&1; true"])
    assert b"PRESENT" not in res.stdout, res.stdout
    devs = set(res.stdout.decode().split())
    assert not devs & {"sda", "vda", "mem", "kmem", "kmsg", "loop0", "nvme0"}


def test_no_docker_or_containerd_socket_anywhere(make_sandbox) -> None:
    sb = make_sandbox()
    res = sb.exec(["sh", "-c", "find / -type s 2>/dev/null; for p in /var/run/docker.sock /run/docker.sock "
                              "/run/containerd/containerd.sock /var/run/containerd/containerd.sock; do "
                              "[ -e $p ] && echo PRESENT $p; done; true"], timeout=60)
    assert res.stdout == b"", res.stdout  # not one Unix socket on any filesystem, engine sockets absent


def test_network_is_loopback_only_and_host_server_sees_nothing(make_sandbox) -> None:
    # Our own target: a listener on the host's docker bridge address (this machine).
    import docker

    net = docker.from_env().networks.get("bridge").attrs["IPAM"]["Config"][0]
    gateway = net.get("Gateway") or "172.17.0.1"
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((gateway, 0))
    srv.listen()
    srv.settimeout(0.5)
    port = srv.getsockname()[1]
    seen: list[object] = []

    def accept() -> None:
        try:
            seen.append(srv.accept())
        except OSError:
            pass

    t = threading.Thread(target=accept)
    t.start()
    sb = make_sandbox()
    res = sb.exec(py(f"""
    import socket
    print(open('/proc/net/dev').read().split('\\n')[2:])
    for fam, addr in ((socket.AF_INET, ('{gateway}', {port})), (socket.AF_INET6, ('::1', 1))):
        s = socket.socket(fam)
        s.settimeout(2)
        try:
            s.connect(addr); print('CONNECTED')
        except OSError as e:
            print('refused', e.errno)
    try:
        socket.getaddrinfo('example.com', 80); print('RESOLVED')
    except OSError:
        print('no dns')
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); print('RAW')
    except OSError as e:
        print('no raw', e.errno)
    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW); print('PACKET')
    except OSError as e:
        print('no packet', e.errno)
    """), timeout=30)
    t.join()
    srv.close()
    out = res.stdout.decode()
    assert "CONNECTED" not in out and "RESOLVED" not in out and "RAW" not in out and "PACKET" not in out, out
    assert "lo:" in out and "eth0" not in out
    assert seen == []


def test_two_sessions_cannot_see_each_other(make_sandbox) -> None:
    a = make_sandbox(session_id="sess_alpha")
    b = make_sandbox(session_id="sess_beta")
    a.exec(["sh", "-c", "echo alpha-private > /workspace/secret; sleep 30 & echo started"])
    # The needle is assembled by the shell so that the command line itself does not contain it.
    res = b.exec(["sh", "-c", "n=alpha; ls /workspace; grep -rls \"$n-private\" / --exclude-dir=proc --exclude-dir=sys "
                              "2>/dev/null; ps -eo args | grep -c 'sleep 3[0]'; true"], timeout=60)
    out = res.stdout.decode()
    assert out == "0\n", out  # empty workspace, no file holding alpha's data, no alpha process


def test_agent_as_pid1_reaps_orphaned_zombies(make_sandbox) -> None:
    """Orphans of the workload are re-parented to PID 1 (the agent); left unreaped they would fill the pids limit."""
    sb = make_sandbox()
    res = sb.exec(["sh", "-c", "cat /proc/1/cmdline | tr '\\0' ' '; echo; "
                              "for i in $(seq 1 30); do (sleep 0.05 &); done; sleep 1.5; "
                              "ps -eo stat,ppid | grep -c '^Z' || true"])
    first, count = res.stdout.decode().strip().split("\n")[0], res.stdout.decode().strip().split("\n")[-1]
    assert first.startswith("/usr/bin/python3 -I -S /opt/sandbox-agent/agent.py"), res.stdout
    assert count == "0", res.stdout
    # and its own children's exit codes still reach their callers
    assert sb.exec(["sh", "-c", "exit 7"]).exit_code == 7


def test_sandbox_is_destroyed_at_the_session_time_limit(make_sandbox) -> None:
    import time

    sb = make_sandbox({"name": "short", "timeouts": {"session_s": 2}})
    res = sb.exec(["sleep", "30"], timeout=30)
    assert res.exit_code == 240 and res.duration < 15, res
    time.sleep(0.5)
    assert sb.expired and not sb.alive
