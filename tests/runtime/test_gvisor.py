"""The same attacks under gVisor (runsc): the profile must not be weaker there.

runsc ignores a container's seccomp profile unless registered with --oci-seccomp
(./run does it); these tests catch an engine where that flag is missing."""

from __future__ import annotations

import os

import pytest

from tests.runtime.test_attacks import blocked_syscall_errnos, py

pytestmark = pytest.mark.docker


@pytest.fixture
def gsb(make_sandbox, docker_client):
    if "runsc" not in (docker_client.info().get("Runtimes") or {}):
        pytest.fail("runsc is not registered with the engine (./run setup registers it)")
    return make_sandbox("gvisor")


def test_gvisor_sandbox_is_non_root_without_capabilities_and_filtered(gsb) -> None:
    res = gsb.exec(["sh", "-c", "id -u; grep -E '^(CapEff|CapBnd|Seccomp):' /proc/self/status; python3 -c "
                               "'import ctypes; print(\"nnp\", ctypes.CDLL(None).prctl(39, 0, 0, 0, 0))'"])
    out = res.stdout.decode()
    assert out.startswith(f"{gsb.uid}\n") and gsb.uid > 0, out
    assert "CapEff:\t0000000000000000" in out and "CapBnd:\t0000000000000000" in out
    # gVisor's /proc/self/status has no NoNewPrivs line: ask prctl(PR_GET_NO_NEW_PRIVS).
    assert "nnp 1" in out and "Seccomp:\t2" in out, out


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86_64 syscall numbers")
def test_gvisor_blocks_the_same_syscalls(gsb) -> None:
    results = blocked_syscall_errnos(gsb)
    assert "succeeded" not in results.values(), results


def test_gvisor_threads_and_tools_work(gsb) -> None:
    res = gsb.exec(py("import threading, subprocess; t = threading.Thread(target=print, args=('t',)); t.start(); t.join();"
                      "print(subprocess.check_output(['git', '--version']).decode().split()[0])"))
    assert res.stdout == b"t\ngit\n", res


def test_gvisor_read_only_root_and_no_network(gsb) -> None:
    res = gsb.exec(["sh", "-c", "echo x > /etc/x 2>&1; echo x > /workspace/ok && echo ws; cat /proc/net/dev | tail -n +3"])
    out = res.stdout.decode()
    assert "ws" in out and "eth0" not in out, out


def test_gvisor_memory_bomb_is_contained(gsb, make_sandbox) -> None:
    res = gsb.exec(py("x = []\nwhile True: x.append(bytearray(16 << 20))"), timeout=60)
    assert res.exit_code != 0, res
    assert make_sandbox().exec(["echo", "ok"]).stdout == b"ok\n"


def test_gvisor_fork_bomb_fails_forks_and_the_sandbox_survives(gsb, make_sandbox) -> None:
    # RLIMIT_NPROC (enforced by gVisor) stops the bomb before the pids cgroup, which counts
    # gVisor's own host tasks, is reached: forks fail with EAGAIN and the sandbox lives on.
    res = gsb.exec(["bash", "-c", "bomb() { bomb | bomb & }; bomb; sleep 3"], timeout=8)
    assert res.error is None and b"Resource temporarily unavailable" in res.stderr, res
    assert gsb.exec(["echo", "alive"], timeout=20).stdout == b"alive\n"
    assert make_sandbox().exec(["echo", "ok"]).stdout == b"ok\n"
