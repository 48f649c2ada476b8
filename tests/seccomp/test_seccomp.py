"""The compiled filter, loaded for real into a child process, blocks what it claims to."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from sandbox import seccomp as sc
from sandbox.policy import PolicyError, Seccomp

DENIED_BY_ISSUE = [
    "mount", "umount2", "unshare", "setns", "ptrace", "process_vm_readv", "process_vm_writev", "bpf", "keyctl",
    "add_key", "request_key", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "open_by_handle_at", "name_to_handle_at", "clock_settime", "settimeofday", "adjtimex", "swapon", "swapoff",
    "reboot", "acct", "pivot_root", "chroot", "syslog",
]


def test_every_dangerous_syscall_of_the_issue_is_denied() -> None:
    f = sc.compile_filter(Seccomp())
    assert not set(DENIED_BY_ISSUE) & f.allowed_names
    assert f.dangerous_allowed() == []


def test_unknown_syscall_name_is_an_error() -> None:
    with pytest.raises(PolicyError, match="unknown syscall 'mountt'"):
        sc.compile_filter(Seccomp(extra_allow=["mountt"]))


def test_extra_deny_removes_and_extra_allow_is_reported_as_dangerous() -> None:
    f = sc.compile_filter(Seccomp(extra_deny=["chmod"], extra_allow=["ptrace"]))
    assert "chmod" not in f.allowed_names
    assert f.dangerous_allowed() == ["ptrace"]


def test_pfc_export_comes_from_libseccomp() -> None:
    pfc = sc.to_pfc(sc.compile_filter(Seccomp()))
    assert "pseudo filter code" in pfc and "action ALLOW" in pfc
    assert len(sc.to_bpf(sc.compile_filter(Seccomp()))) > 100


ATTACK = textwrap.dedent("""
    import ctypes, errno, os, sys
    from sandbox import seccomp as sc
    from sandbox.policy import Seccomp
    sc.apply_in_process(sc.compile_filter(Seccomp()))
    libc = ctypes.CDLL(None, use_errno=True)
    results = {}
    def attempt(name, *args):
        r = getattr(libc, name)(*args)
        results[name] = ctypes.get_errno() if r == -1 else 0
    attempt("mount", b"none", b"/tmp", b"tmpfs", 0, None)
    attempt("unshare", 0x10000000)          # CLONE_NEWUSER
    attempt("unshare", 0x20000)             # CLONE_NEWNS
    attempt("ptrace", 16, os.getppid(), 0, 0)   # PTRACE_ATTACH
    attempt("syscall", 321, 0, 0, 0)        # bpf
    attempt("syscall", 425, 8, 0)           # io_uring_setup
    attempt("syscall", 323, 0)              # userfaultfd
    attempt("syscall", 250, 0, 0, 0)        # keyctl
    attempt("personality", 0x0040000)       # ADDR_NO_RANDOMIZE is refused
    ok = open(__file__ if False else "/proc/self/status").read()
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    _, status = os.waitpid(pid, 0)
    print(results, os.waitstatus_to_exitcode(status), "Seccomp:\\t2" in ok)
""")


def test_filter_applied_in_process_blocks_attacks_and_allows_normal_work() -> None:
    out = subprocess.run([sys.executable, "-c", ATTACK], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    results, code, filtered = out.stdout.rsplit(" ", 2)
    parsed = eval(results)  # noqa: S307 - our own child's repr of a dict of ints
    assert all(v == 1 for v in parsed.values()), parsed  # every call: EPERM
    assert code == "7" and filtered.strip() == "True"  # fork/wait still work, filter in mode 2


def test_seccomp_imports_without_the_policy_module() -> None:
    """No import cycle: the compiler needs only sandbox.policy_base."""
    code = "import sys, sandbox.seccomp; print('sandbox.policy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


# The reviewed shipped baseline. Editing profiles/seccomp/default.yaml changes what every
# policy enforces and what counts as a weakening: do it deliberately, then update this.
BASELINE_SHA256 = "0f20ad65d88ada6375548068d816a107444a494512a08767b89d378297e6b736"


def test_shipped_allowlist_is_the_reviewed_baseline() -> None:
    import hashlib
    import json

    canon = sc.baseline_filter().canonical()
    assert hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).hexdigest() == BASELINE_SHA256, (
        "profiles/seccomp/default.yaml changed: review the change, then update BASELINE_SHA256")
    assert canon["default_action"] == "errno" and not set(canon["allow"]) & set(sc.DANGEROUS)
    assert set(sc.ARG_CHECKED) - {"clone3"} <= set(canon["conditional"]) and "clone3" in canon["errno"]


def test_malformed_allowlist_is_an_error_naming_the_file(tmp_path, monkeypatch) -> None:
    d = tmp_path / "seccomp"
    d.mkdir()
    (d / "odd.yaml").write_text("allow: [read]\nconditional: {socket: [[{index: 9, op: eq, value: 1}]]}\nbogus: 1\n")
    monkeypatch.setattr(sc, "_seccomp_dirs", lambda: [d])
    with pytest.raises(PolicyError) as info:
        sc.compile_filter(Seccomp(profile="odd"))
    keys = {(f, k) for f, k, _ in info.value.problems}
    assert keys == {(str((d / "odd.yaml").resolve()), "bogus"), (str((d / "odd.yaml").resolve()), "conditional.socket")}
