"""The dangerous-syscall sample the probe calls, with arguments that are harmless if reached.

Numbers are resolved here, on the host, through libseccomp (pyseccomp) for the
host's architecture, which is the architecture every container on this engine
runs; the probe inside needs no table of its own.

Each call's arguments are chosen so that a call that gets past seccomp AND the
capability checks still does nothing: NULL pointers (EFAULT), fd -1 (EBADF),
invalid flags (EINVAL), wrong reboot magic. This matters because the same
probe runs as root with every capability in the deliberately weak test
container, where nothing else stands between the call and the host kernel.
"""

from __future__ import annotations

import errno
from typing import Any

import pyseccomp

# name -> arguments (all integers). Never add a call whose reachable form changes state.
SAMPLE: dict[str, tuple[int, ...]] = {
    "mount": (0, 0, 0, 0, 0),                # NULL target -> EFAULT
    "umount2": (0, 0),                       # NULL path -> EFAULT
    "unshare": (0x10000000,),                # CLONE_NEWUSER, in a child that exits at once
    "setns": (-1, 0),                        # EBADF
    "pivot_root": (0, 0),                    # EFAULT
    "chroot": (0,),                          # EFAULT
    "ptrace": (16, 0, 0, 0),                 # PTRACE_ATTACH pid 0 -> ESRCH
    "process_vm_readv": (0, 0, 0, 0, 0, 0),  # pid 0 -> ESRCH
    "process_vm_writev": (0, 0, 0, 0, 0, 0),
    "pidfd_getfd": (-1, 0, 0),               # EBADF
    "bpf": (0x7FFFFFFF, 0, 0),               # bad command -> EINVAL
    "keyctl": (0, -3, 0),                    # read the session keyring id, create=0
    "add_key": (0, 0, 0, 0, 0),              # EFAULT
    "request_key": (0, 0, 0, 0),             # EFAULT
    "perf_event_open": (0, 0, -1, -1, 0),    # EFAULT
    "userfaultfd": (0x7FFFFFFF,),            # bad flags -> EINVAL
    "io_uring_setup": (0, 0),                # EINVAL/EFAULT
    "io_uring_enter": (-1, 0, 0, 0, 0, 0),   # EBADF
    "io_uring_register": (-1, 0, 0, 0),      # EBADF
    "kexec_load": (0, 0, 0, 0x7EAD0000),     # bad flags -> EINVAL (nr_segments=0 would unload!)
    "kexec_file_load": (-1, -1, 0, 0, 0x7EAD0000),
    "init_module": (0, 0, 0),                # EFAULT
    "finit_module": (-1, 0, 0x7EAD),         # bad flags -> EINVAL
    "delete_module": (0, 0),                 # EFAULT
    "open_by_handle_at": (-1, 0, 0),         # "shocker": EBADF/EFAULT
    "name_to_handle_at": (-1, 0, 0, 0, 0),
    "clock_settime": (0, 0),                 # NULL timespec -> EFAULT
    "settimeofday": (0, 0),                  # both NULL: a no-op
    "adjtimex": (0,),                        # EFAULT
    "clock_adjtime": (0, 0),
    "swapon": (0, 0),
    "swapoff": (0,),
    "reboot": (0, 0, 0, 0),                  # wrong magic -> EINVAL
    "acct": (1,),                            # bad pointer -> EFAULT (NULL would switch accounting off)
    "syslog": (0, 0, 0),                     # SYSLOG_ACTION_CLOSE: a no-op
    "personality": (0x0040000,),             # ADDR_NO_RANDOMIZE, in a child
    "quotactl": (0, 0, 0, 0),
    "fsopen": (0, 0),                        # EFAULT
    "fsmount": (-1, 0, 0),
    "fspick": (-1, 0, 0),
    "open_tree": (-1, 0, 0x7EAD0000),
    "move_mount": (-1, 0, -1, 0, 0x7EAD0000),
    "mknodat": (-100, 0, 0, 0),              # NULL path -> EFAULT
    "mknod": (0, 0, 0),                      # NULL path -> EFAULT
    "fsconfig": (-1, 0, 0, 0, 0),            # EBADF
    "mount_setattr": (-1, 0, 0x7EAD0000, 0, 0),
    "modify_ldt": (99, 0, 0),                # bad func -> EINVAL
    "uselib": (0,),                          # EFAULT
    "set_mempolicy": (0x7EAD, 0, 0),         # bad mode -> EINVAL
    "process_madvise": (-1, 0, 0, 0, 0),     # EBADF
    "iopl": (4,),                            # level > 3 -> EINVAL
    "ioperm": (0xFFFFFFFF, 1, 1),            # out of range -> EINVAL
    "kcmp": (0, 0, 0, 0, 0),                 # ESRCH
    "lookup_dcookie": (0, 0, 0),
    "fanotify_init": (0x7FFFFFFF, 0),        # EINVAL
}

# errnos that mean "refused before the kernel did anything" (seccomp errno rule or a capability check).
REFUSED_ERRNOS = frozenset(errno.errorcode[e] for e in (errno.EPERM, errno.ENOSYS, errno.EACCES))

# Syscalls the probe's attack probes call directly (ptrace a sibling, unshare, keyctl, ...).
ATTACK_CALLS = ("ptrace", "process_vm_readv", "unshare", "keyctl", "mount")


def _nr(name: str) -> int:
    try:
        return int(pyseccomp.resolve_syscall(pyseccomp.system_arch(), name))
    except Exception:  # noqa: BLE001 - pyseccomp raises on names it cannot parse
        return -1


def sample_table(names: list[str] | None = None) -> dict[str, list[Any]]:
    """{name: [nr, [args...]]} for the host architecture; calls this arch lacks are left out."""
    out: dict[str, list[Any]] = {}
    for name, args in SAMPLE.items():
        if names is not None and name not in names:
            continue
        nr = _nr(name)
        if nr >= 0:
            out[name] = [nr, list(args)]
    return out


def numbers(names: tuple[str, ...] = ATTACK_CALLS) -> dict[str, int]:
    return {n: nr for n in names if (nr := _nr(n)) >= 0}
