"""The in-container probe: stdlib python3 only, run as ``python3 -c <this file> <config json>``.

It observes; the host judges. Every probe records raw facts (errnos, file
modes, mount flags) and the host turns them into pass/fail rows
(:mod:`sandbox.audit.checks`). Keeping judgement outside means a policy's
expectations never have to be shipped into the container, and a new rule
needs no change here.

Safety rules, because this also runs as root inside deliberately weak
containers on the auditor's own machine:
  * Nothing is ever written to a kernel interface. "Writable" means an
    ``open(O_WRONLY)`` succeeded; the descriptor is closed without a write.
  * Dangerous syscalls are called in a forked child, with arguments the
    kernel rejects (NULL pointers, bad flags, fd -1) if the call gets past
    seccomp and the capability checks, so a reachable call does nothing.
  * No packet leaves the machine: routes are tested with UDP ``connect``
    (which sends nothing); TCP connects and DNS lookups are attempted only
    where no route exists, so they fail before any packet is built.
  * The fork test is bounded by the limit it measures and by a hard cap.
  * The egress scan reads (bounded) and reports only salted 8-byte digests of what it read;
    its SNI tries go through the sandbox's own proxy, only to targets the host chose because
    they are on this machine.

Compatible with python3 >= 3.6 (foreign containers), no f-string ``=``, no
walrus, no dataclasses.
"""
# ruff: noqa: UP031 - %-formatting keeps the probe's string handling uniform across old interpreters
# mypy: ignore-errors
# (Unannotated on purpose: it is shipped as source into foreign containers whose python3 may be
# old; the host-side code that judges its output is typed and checks every field it reads.)

import base64
import binascii
import ctypes
import errno
import hashlib
import json
import os
import re
import resource
import signal
import socket
import ssl
import stat
import sys
import time

MARKER = "SANDBOX-AUDIT-PROBE-JSON:"
LIST_CAP = 50  # entries kept per list: enough to act on, bounded output

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int


def _err(e):
    code = getattr(e, "errno", None)
    return errno.errorcode.get(code, str(code)) if code else type(e).__name__


def _read(path, limit=1 << 20):
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", "replace")
    except OSError as e:
        return {"error": _err(e)}


def _prctl(option, arg2=0):
    ctypes.set_errno(0)
    r = _libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
    return r if r >= 0 else -ctypes.get_errno()


def _syscall(nr, args):
    ctypes.set_errno(0)
    r = _libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    return r, ctypes.get_errno()


def _in_child(fn, timeout=10.0):
    """Run fn() in a forked child; returns its JSON-able result, or how the child died."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out = fn()
        except BaseException as e:  # noqa: BLE001 - the child reports anything
            out = {"exception": type(e).__name__ + ": " + str(e)[:200]}
        try:
            os.write(w, json.dumps(out).encode()[:60000])
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    deadline = time.time() + timeout
    while time.time() < deadline:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        data += chunk
    os.close(r)
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        status = 0
    if os.WIFSIGNALED(status):
        return {"killed": signal.Signals(os.WTERMSIG(status)).name}
    try:
        return json.loads(data.decode() or "null")
    except ValueError:
        return {"exception": "unreadable child output"}


def _status():
    out = {}
    txt = _read("/proc/self/status")
    if isinstance(txt, dict):
        return txt
    for line in txt.splitlines():
        k, _, v = line.partition(":")
        out[k.strip()] = v.strip()
    return out


def _mountinfo():
    mounts = []
    txt = _read("/proc/self/mountinfo")
    if isinstance(txt, dict):
        return mounts
    for line in txt.splitlines():
        left, _, right = line.partition(" - ")
        f = left.split()
        r = right.split()
        if len(f) < 6 or len(r) < 2:
            continue
        mounts.append({"id": f[0], "dev": f[2], "root": _unescape(f[3]), "point": _unescape(f[4]),
                       "opts": f[5].split(","), "fstype": r[0], "source": _unescape(r[1]),
                       "super": r[2].split(",") if len(r) > 2 else []})
    return mounts


def _unescape(s):
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def _mount_of(path, mounts):
    best = None
    for m in mounts:
        p = m["point"]
        inside = path == p or path.startswith(p.rstrip("/") + "/")
        if inside and (best is None or len(p) >= len(best["point"])):
            best = m
    return best


# ----------------------------------------------------------------- identity

def probe_identity(cfg):
    st = _status()
    return {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "egid": os.getegid(),
            "groups": sorted(os.getgroups()), "status_uid": st.get("Uid"), "status_gid": st.get("Gid")}


def probe_caps(cfg):
    st = _status()
    out = {k: st.get(k) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
    # Ask the kernel too: gVisor's status file has no CapAmb line.
    bnd, amb = [], []
    for cap in range(64):
        r = _prctl(23, cap)  # PR_CAPBSET_READ
        if r == -errno.EINVAL:
            break
        if r == 1:
            bnd.append(cap)
        if _amb_is_set(cap):
            amb.append(cap)
    out["bounding_prctl"] = bnd
    out["ambient_prctl"] = amb
    return out


def _amb_is_set(cap):
    ctypes.set_errno(0)
    r = _libc.prctl(47, ctypes.c_ulong(1), ctypes.c_ulong(cap), ctypes.c_ulong(0), ctypes.c_ulong(0))  # PR_CAP_AMBIENT_IS_SET
    return r == 1


def probe_nnp(cfg):
    return {"status": _status().get("NoNewPrivs"), "prctl": _prctl(39)}  # PR_GET_NO_NEW_PRIVS


def probe_seccomp(cfg):
    st = _status()
    return {"status": st.get("Seccomp"), "filters": st.get("Seccomp_filters")}


def probe_syscalls(cfg):
    """Each sample syscall in its own child, with arguments that do nothing if it is reached."""
    out = {}
    for name, spec in sorted(cfg.get("syscalls", {}).items()):
        nr, args = spec[0], spec[1]

        def call(nr=nr, args=args):
            r, e = _syscall(nr, args)
            return {"ret": r, "errno": errno.errorcode.get(e, str(e)) if r == -1 else None}

        out[name] = _in_child(call)
    return out


# ----------------------------------------------------------------- filesystem

def probe_rootfs(cfg):
    mounts = _mountinfo()
    root = _mount_of("/", mounts)
    attempts = {}
    for d in ("/", "/etc", "/usr/bin"):
        path = os.path.join(d, ".sandbox-audit-%d" % os.getpid())
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            os.unlink(path)
            attempts[d] = "created"
        except OSError as e:
            attempts[d] = _err(e)
    return {"root_opts": root["opts"] if root else None, "root_fstype": root["fstype"] if root else None,
            "create": attempts}


PSEUDO = ("/proc", "/sys", "/dev")


def probe_walk(cfg):
    """One walk of every filesystem except /proc, /sys, /dev: writable dirs, set-id files,
    sockets and device nodes, with the mount each lies on."""
    mounts = _mountinfo()
    max_entries = int(cfg.get("walk_max_entries", 400000))
    deadline = time.time() + float(cfg.get("walk_max_s", 60))
    writable, setid, sockets, devices = {}, [], [], []
    seen = 0
    truncated = False
    stack = ["/"]
    while stack:
        d = stack.pop()
        if d in PSEUDO or seen > max_entries or time.time() > deadline:
            truncated = truncated or d not in PSEUDO
            continue
        if os.access(d, os.W_OK):
            m = _mount_of(d, mounts)
            key = m["point"] if m else "?"
            writable.setdefault(key, [])
            if len(writable[key]) < 5:
                writable[key].append(d)
        try:
            it = os.scandir(d)
        except OSError:
            continue
        with it:
            for e in it:
                seen += 1
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                mode = st.st_mode
                if stat.S_ISDIR(mode):
                    stack.append(e.path)
                elif stat.S_ISREG(mode) and mode & (stat.S_ISUID | stat.S_ISGID):
                    m = _mount_of(e.path, mounts)
                    setid.append({"path": e.path, "mode": oct(mode & 0o7777), "uid": st.st_uid,
                                  "nosuid": bool(m and "nosuid" in m["opts"])})
                elif stat.S_ISSOCK(mode):
                    sockets.append(e.path)
                elif stat.S_ISBLK(mode) or stat.S_ISCHR(mode):
                    devices.append({"path": e.path, "major": os.major(st.st_rdev), "minor": os.minor(st.st_rdev)})
    return {"writable": writable, "setid": setid[:LIST_CAP], "setid_count": len(setid),
            "sockets": sockets[:LIST_CAP], "devices_outside_dev": devices[:LIST_CAP], "entries": seen,
            "truncated": truncated,
            "mounts": [{"point": m["point"], "fstype": m["fstype"], "opts": m["opts"], "root": m["root"],
                        "source": m["source"]} for m in mounts][:200]}


def probe_devices(cfg):
    """Everything under /dev, and whether block or unexpected devices open (read-only, nothing read)."""
    found = []
    stack = ["/dev"]
    while stack and len(found) < 500:
        d = stack.pop()
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for n in names:
            p = os.path.join(d, n)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode) and p not in ("/dev/shm", "/dev/mqueue"):
                stack.append(p)
            elif stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode):
                entry = {"path": p, "type": "block" if stat.S_ISBLK(st.st_mode) else "char",
                         "major": os.major(st.st_rdev), "minor": os.minor(st.st_rdev)}
                if entry["type"] == "block" or entry["major"] not in (1, 5, 136):
                    try:
                        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
                        os.close(fd)
                        entry["open"] = "opened"
                    except OSError as e:
                        entry["open"] = _err(e)
                found.append(entry)
    return {"devices": found}


# Kernel interfaces that are container escapes when writable. Opened O_WRONLY, never written.
WRITE_TARGETS = ("/proc/sys/kernel/core_pattern", "/proc/sysrq-trigger", "/proc/sys/kernel/modprobe",
                 "/sys/kernel/uevent_helper", "/proc/sys/fs/binfmt_misc/register", "/proc/sys/vm/drop_caches",
                 "/sys/kernel/mm/transparent_hugepage/enabled")
# What Docker masks by default (bind of /dev/null or an empty read-only tmpfs).
MASKED = ("/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug", "/proc/latency_stats",
          "/proc/timer_stats", "/proc/scsi", "/proc/acpi", "/sys/firmware")


def probe_kernel_files(cfg):
    writes = {}
    for p in WRITE_TARGETS:
        try:
            fd = os.open(p, os.O_WRONLY)
            os.close(fd)
            writes[p] = "opened"
        except OSError as e:
            writes[p] = _err(e)
    masked = {}
    for p in MASKED:
        try:
            st = os.stat(p)
        except OSError as e:
            masked[p] = "absent" if e.errno == errno.ENOENT else _err(e)
            continue
        if stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3):
            masked[p] = "masked"
        elif stat.S_ISDIR(st.st_mode):
            try:
                masked[p] = "masked" if not os.listdir(p) else "exposed"
            except OSError as e:
                masked[p] = "masked" if e.errno in (errno.EACCES, errno.EPERM) else _err(e)
        else:
            try:
                with open(p, "rb") as f:
                    f.read(1)
                masked[p] = "exposed"
            except OSError as e:
                masked[p] = "unreadable:" + _err(e)
    mounts = _mountinfo()
    ro = {}
    for p in ("/proc/sys", "/sys", "/proc/sysrq-trigger", "/sys/fs/cgroup"):
        m = _mount_of(p, mounts)
        ro[p] = None if m is None else ("ro" in m["opts"] or "ro" in m["super"] and m["fstype"] == "sysfs")
    return {"write_open": writes, "masked": masked, "read_only_mount": ro}


# ----------------------------------------------------------------- sockets and descriptors

ENGINE_SOCKETS = ("/var/run/docker.sock", "/run/docker.sock", "/run/containerd/containerd.sock",
                  "/var/run/containerd/containerd.sock", "/run/containerd/containerd.sock.ttrpc",
                  "/run/crio/crio.sock", "/var/run/crio/crio.sock", "/run/podman/podman.sock",
                  "/var/run/dockershim.sock", "/run/buildkit/buildkitd.sock", "/var/run/docker/libnetwork")
ENGINE_NAME = re.compile(r"docker|containerd|crio|podman|dockershim|buildkit|runc|shim", re.IGNORECASE)


def probe_sockets(cfg):
    found, seen = {}, set()
    for p in ENGINE_SOCKETS:
        try:
            st = os.stat(p)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:  # /var/run is usually a link to /run
            continue
        seen.add((st.st_dev, st.st_ino))
        entry = {"socket": stat.S_ISSOCK(st.st_mode)}
        if entry["socket"]:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(2)
            try:
                s.connect(p)  # connecting sends nothing; a listening engine would accept
                entry["connect"] = "connected"
            except OSError as e:
                entry["connect"] = _err(e)
            finally:
                s.close()
        found[p] = entry
    abstract = []
    txt = _read("/proc/net/unix")
    if isinstance(txt, str):
        for line in txt.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 8 and ENGINE_NAME.search(parts[7]):
                abstract.append(parts[7][:120])
    return {"engine_paths": found, "named_unix": abstract[:LIST_CAP]}


def _dir_escapes(path, root_id):
    """Walk '..' from a directory descriptor; True if it reaches a root that is not ours."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        return _err(e)
    try:
        for _ in range(256):
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == root_id:
                return False
            parent = os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            pst = os.fstat(parent)
            os.close(fd)
            fd = parent
            if (pst.st_dev, pst.st_ino) == (st.st_dev, st.st_ino):
                return (pst.st_dev, pst.st_ino) != root_id  # a root that is not ours: outside
        return "too deep"
    except OSError as e:
        return _err(e)
    finally:
        os.close(fd)


def probe_fds(cfg):
    """CVE-2024-21626 class: any descriptor, cwd or root of any visible process that leads
    outside this container's root filesystem."""
    rst = os.stat("/")
    root_id = (rst.st_dev, rst.st_ino)
    leaks, checked, unreadable = [], 0, []
    pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())[:64]
    me = os.getpid()
    for pid in pids:
        base = "/proc/%d" % pid
        entries = []
        try:
            entries = [("fd/" + n) for n in os.listdir(base + "/fd")][:256]
        except OSError as e:
            unreadable.append("%d:%s" % (pid, _err(e)))
        for rel in entries + ["cwd", "root"]:
            path = base + "/" + rel
            try:
                target = os.readlink(path)
                st = os.stat(path)
            except OSError:
                continue
            checked += 1
            if pid == me and rel.startswith("fd/"):
                continue  # our own transient descriptors (this very scan)
            if rel == "root":
                if (st.st_dev, st.st_ino) != root_id:
                    leaks.append({"pid": pid, "what": rel, "target": target[:200], "why": "root differs"})
                continue
            if stat.S_ISDIR(st.st_mode):
                esc = _dir_escapes(path, root_id)
                if esc is True or target.startswith("(unreachable)"):
                    leaks.append({"pid": pid, "what": rel, "target": target[:200], "why": "directory outside root"})
            elif stat.S_ISREG(st.st_mode) and target.startswith("/") and not target.endswith("(deleted)") \
                    and not target.startswith("/memfd:"):
                try:
                    vst = os.stat(target)
                    same = (vst.st_dev, vst.st_ino) == (st.st_dev, st.st_ino)
                except OSError:
                    same = False
                if not same:
                    leaks.append({"pid": pid, "what": rel, "target": target[:200],
                                  "why": "file not reachable by that path inside"})
    cwd = None
    try:
        cwd = os.getcwd()
    except OSError as e:
        cwd = _err(e)
    return {"leaks": leaks[:LIST_CAP], "checked": checked, "pids": len(pids), "unreadable": unreadable[:10],
            "cwd": cwd, "cwd_escapes": _dir_escapes(".", root_id)}


def probe_exe(cfg):
    """CVE-2019-5736 class: can a process's executable (the runtime's, when it enters the
    container) be opened for writing, directly or by re-opening an O_PATH descriptor?"""
    out = {}
    for pid in ["self", "1"]:
        path = "/proc/%s/exe" % pid
        try:
            target = os.readlink(path)
        except OSError as e:
            out[pid] = {"readlink": _err(e)}
            continue
        res = {"target": target[:200]}
        try:
            fd = os.open(path, os.O_WRONLY)
            os.close(fd)
            res["direct"] = "opened"
        except OSError as e:
            res["direct"] = _err(e)
        try:
            pfd = os.open(path, getattr(os, "O_PATH", 0o10000000))
            try:
                fd = os.open("/proc/self/fd/%d" % pfd, os.O_WRONLY)
                os.close(fd)
                res["via_o_path"] = "opened"
            except OSError as e:
                res["via_o_path"] = _err(e)
            finally:
                os.close(pfd)
        except OSError as e:
            res["via_o_path"] = "no O_PATH: " + _err(e)
        out[pid] = res
    return out


# ----------------------------------------------------------------- the host-agent channel (PID 1)

def _pid1_stat():
    """(state letter, start time in ticks) of PID 1, or None when it is gone or unreadable."""
    txt = _read("/proc/1/stat", 4096)
    if not isinstance(txt, str) or ")" not in txt:
        return None
    rest = txt.rsplit(")", 1)[1].split()
    try:
        return rest[0], int(rest[19])
    except (IndexError, ValueError):
        return None


def _try_open(path, flags):
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        return _err(e)
    os.close(fd)  # never read or written: that it opened is the finding
    return "opened"


def probe_agent(cfg):
    """What the workload can reach of the process that speaks the host's channel (PID 1):
    its stdin (the host's requests) and stdout (results the host accepts), any other
    descriptor, its memory and environment. Opens only; nothing is read or written."""
    out = {"me": {"uid": os.getuid(), "pid": os.getpid()}}
    st = {}
    txt = _read("/proc/1/status", 8192)
    if isinstance(txt, str):
        for line in txt.splitlines():
            k, _, v = line.partition(":")
            st[k.strip()] = v.strip()
    out["pid1"] = {"name": st.get("Name"), "uid": (st.get("Uid") or "").split()[:1], "state": st.get("State")}
    try:
        # The kernel hands a non-dumpable process's private /proc entries (environ, fd/, mem; not
        # the /proc/PID directory itself) to root: owner 0 while the process runs as another uid
        # means PR_SET_DUMPABLE is off.
        out["proc_owner"] = os.stat("/proc/1/environ").st_uid
    except OSError as e:
        out["proc_owner"] = _err(e)
    try:
        names = sorted(os.listdir("/proc/1/fd"), key=lambda n: int(n) if n.isdigit() else 1 << 30)
        out["fd_list"] = names[:64]
    except OSError as e:
        names = []
        out["fd_list"] = _err(e)
    opens = {"/proc/1/fd/0": _try_open("/proc/1/fd/0", os.O_RDONLY),
             "/proc/1/fd/1": _try_open("/proc/1/fd/1", os.O_WRONLY)}
    for n in names[:32]:
        p = "/proc/1/fd/" + n
        if p not in opens:
            opens[p] = _try_open(p, os.O_RDONLY)
    out["fd_open"] = opens
    out["mem"] = _try_open("/proc/1/mem", os.O_RDONLY)
    out["environ"] = _try_open("/proc/1/environ", os.O_RDONLY)
    nr = cfg.get("nr", {}).get("process_vm_readv")
    if nr is not None:
        # Address 0 in PID 1: EFAULT means the permission check passed (its memory is readable).
        buf = ctypes.create_string_buffer(8)
        local = (ctypes.c_void_p * 2)(ctypes.cast(buf, ctypes.c_void_p), 8)
        remote = (ctypes.c_void_p * 2)(None, 8)
        r, e = _syscall(nr, [1, ctypes.addressof(local), 1, ctypes.addressof(remote), 1, 0])
        out["process_vm_readv"] = "read" if r >= 0 else errno.errorcode.get(e, str(e))
    try:
        os.kill(1, 0)
        out["signal_permitted"] = True
    except OSError as e:
        out["signal_permitted"] = _err(e)
    try:
        out["same_session"] = os.getsid(0) == os.getsid(1)
        out["same_pgrp"] = os.getpgid(0) == os.getpgid(1)
    except OSError as e:
        out["same_session"] = out["same_pgrp"] = _err(e)
    return out


def probe_signals(cfg):
    """SIGSTOP, SIGTERM, SIGKILL to PID 1 (the agent), each followed by a look at it.
    Run alone, only in a sandbox the audit started: if the agent dies, so does the sandbox."""
    out = {"before": _pid1_stat()}
    for name in ("SIGSTOP", "SIGTERM", "SIGKILL"):
        sig = getattr(signal, name)
        try:
            os.kill(1, sig)
            sent = "delivered to the kernel"
        except OSError as e:
            sent = _err(e)
        time.sleep(0.3)
        after = _pid1_stat()
        res = {"kill": sent, "after": after}
        if name == "SIGSTOP" and after and after[0] in ("T", "t"):
            try:
                os.kill(1, signal.SIGCONT)  # let it answer this very probe
            except OSError:
                pass
        out[name] = res
    return out


FORGED_MARK = "SANDBOX-AUDIT-FORGED"


def probe_forge(cfg):
    """The issue's attack: write result frames (output + exit 0) for the first request ids into
    the agent's stdout through /proc/1/fd/1. Run only in a sandbox the audit started; the host
    must not report them (this process then exits with cfg["exit_code"])."""
    try:
        fd = os.open("/proc/1/fd/1", os.O_WRONLY | os.O_NONBLOCK)
    except OSError as e:
        return {"open": _err(e)}
    import base64

    data = base64.b64encode((FORGED_MARK + "\n").encode()).decode()
    lines = []
    for rid in range(1, 6):
        lines.append(json.dumps({"id": rid, "ev": "out", "fd": 1, "data": data}))
        lines.append(json.dumps({"id": rid, "ev": "exit", "code": 0}))
    try:
        os.write(fd, ("\n".join(lines) + "\n").encode())
        res = "written"
    except OSError as e:
        res = _err(e)
    finally:
        os.close(fd)
    time.sleep(2)
    return {"open": "opened", "write": res}


# Host facts a workload has no use for; each must be unreadable or empty.
HOST_FACTS = ("/sys/kernel/vmcoreinfo", "/proc/config.gz")
# Reported when readable (not required unless the container's spec masks them).
HOST_FACTS_OTHER = ("/proc/cmdline", "/proc/modules", "/proc/kallsyms", "/proc/sys/kernel/random/boot_id",
                    "/sys/kernel/notes", "/sys/devices/virtual/dmi/id/product_name", "/sys/module",
                    "/sys/devices/system/cpu/vulnerabilities", "/proc/iomem", "/sys/kernel/debug")


def _fact(path):
    try:
        st = os.stat(path)
    except OSError as e:
        return "absent" if e.errno == errno.ENOENT else "unreadable:" + _err(e)
    if stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3):
        return "masked"
    if stat.S_ISDIR(st.st_mode):
        try:
            return "readable:%d entries" % len(os.listdir(path)) if os.listdir(path) else "empty"
        except OSError as e:
            return "unreadable:" + _err(e)
    try:
        with open(path, "rb") as f:
            data = f.read(64)  # a few bytes prove it; nothing is kept
    except OSError as e:
        return "unreadable:" + _err(e)
    return "readable" if data else "empty"


def probe_host_facts(cfg):
    required = list(HOST_FACTS) + [p for p in cfg.get("masked", []) if p not in HOST_FACTS]
    seen = {}
    for p in required[:80]:
        seen[p] = _fact(p)
    others = {}
    for p in HOST_FACTS_OTHER:
        if p not in seen:
            others[p] = _fact(p)
    return {"required": seen, "other": others}


# ----------------------------------------------------------------- kernel attack surface

def _cgroup_v1_controller():
    """An existing v1 hierarchy to mount, preferring one where this process sits at the root
    (the exploit's choice: rdma, which Docker does not use). A controller attached to no
    hierarchy is never chosen: mounting it would create a new hierarchy on the host."""
    txt = _read("/proc/cgroups")
    if not isinstance(txt, str):
        return None
    attached = []
    for line in txt.splitlines()[1:]:
        p = line.split()
        if len(p) >= 4 and p[1] != "0" and p[3] == "1":
            attached.append(p[0])
    mine = _cgroup_paths()
    at_root = [c for c in attached if mine.get(c, "/") == "/"]
    return (at_root or attached or [None])[0]


def probe_release_agent(cfg):
    """CVE-2022-0492 class: a writable cgroup v1 release_agent, already mounted or mountable."""
    existing = {}
    for m in _mountinfo():
        if m["fstype"] == "cgroup":
            p = os.path.join(m["point"], "release_agent")
            if os.path.exists(p):
                try:
                    fd = os.open(p, os.O_WRONLY)
                    os.close(fd)
                    existing[p] = "opened"
                except OSError as e:
                    existing[p] = _err(e)
    nrs = cfg.get("nr", {})
    ctrl = _cgroup_v1_controller()
    tmp = None
    for base in cfg.get("scratch", []) + ["/tmp", "/dev/shm"]:
        try:
            tmp = os.path.join(base, ".audit-cg-%d" % os.getpid())
            os.mkdir(tmp, 0o700)
            break
        except OSError:
            tmp = None

    def attack():
        steps = {}
        # With CAP_SYS_ADMIN a new mount namespace is enough, and mounting an existing hierarchy
        # shows its root (release_agent) when the cgroup namespace is the host's.
        r, e = _syscall(nrs["unshare"], [0x00020000])  # CLONE_NEWNS
        if r == 0:
            steps["unshare"] = "newns:ok"
        else:
            # Without it, the exploit's route: a user namespace makes us root there (unshare -UrmC).
            r, e = _syscall(nrs["unshare"], [0x10000000 | 0x00020000 | 0x02000000])
            steps["unshare"] = "userns:" + (errno.errorcode.get(e, str(e)) if r == -1 else "ok")
        if r == -1:
            return steps
        # Private propagation first, so nothing this child mounts can reach any other namespace.
        _libc.mount(None, b"/", None, ctypes.c_ulong(0x4000 | 0x40000), None)  # MS_REC | MS_PRIVATE
        if not tmp or not ctrl:
            steps["mount"] = "no scratch dir or cgroup v1 controller"
            return steps
        ctypes.set_errno(0)
        r = _libc.mount(b"cgroup", tmp.encode(), b"cgroup", ctypes.c_ulong(0), ctrl.encode())
        if r != 0:
            steps["mount"] = errno.errorcode.get(ctypes.get_errno(), "?")
            return steps
        steps["mount"] = "ok:" + ctrl
        try:
            fd = os.open(os.path.join(tmp, "release_agent"), os.O_WRONLY)
            os.close(fd)  # never written: opening for write is the proof
            steps["release_agent"] = "opened"
        except OSError as ex:
            steps["release_agent"] = _err(ex)
        return steps

    result = _in_child(attack) if "unshare" in nrs else {"skipped": "no syscall number for unshare"}
    if tmp:
        try:
            os.rmdir(tmp)
        except OSError:
            pass
    return {"mounted": existing, "attack": result}


def probe_keyring(cfg):
    nr = cfg.get("nr", {}).get("keyctl")
    if nr is None:
        return {"skipped": "no keyctl on this architecture"}

    def call():
        r, e = _syscall(nr, [0, -3, 0])  # KEYCTL_GET_KEYRING_ID(session keyring, create=0): read-only
        return {"ret": r, "errno": errno.errorcode.get(e, str(e)) if r == -1 else None}

    return _in_child(call)


def probe_ptrace(cfg):
    """Attach to a sibling we own (allowed by plain DAC and Yama scope 1): only seccomp stops it."""
    nrs = cfg.get("nr", {})
    if "ptrace" not in nrs:
        return {"skipped": "no ptrace number"}
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    out = {}
    try:
        ret, e = _syscall(nrs["ptrace"], [16, pid, 0, 0])  # PTRACE_ATTACH
        out["attach"] = errno.errorcode.get(e, str(e)) if ret == -1 else "attached"
        if ret != -1:
            os.waitpid(pid, 0)
            _syscall(nrs["ptrace"], [17, pid, 0, 0])  # PTRACE_DETACH
        if "process_vm_readv" in nrs:
            buf = ctypes.create_string_buffer(8)
            iov = (ctypes.c_void_p * 2)(ctypes.cast(buf, ctypes.c_void_p), 8)
            ret, e = _syscall(nrs["process_vm_readv"], [pid, ctypes.addressof(iov), 1, ctypes.addressof(iov), 1, 0])
            out["process_vm_readv"] = errno.errorcode.get(e, str(e)) if ret == -1 else "read"
    finally:
        os.close(w)
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
        os.waitpid(pid, 0)
    return out


def probe_userns(cfg):
    nr = cfg.get("nr", {}).get("unshare")
    if nr is None:
        return {"skipped": "no unshare number"}

    def call():
        r, e = _syscall(nr, [0x10000000])  # CLONE_NEWUSER, in a child that exits at once
        return {"ret": r, "errno": errno.errorcode.get(e, str(e)) if r == -1 else None}

    res = _in_child(call)
    mx = _read("/proc/sys/user/max_user_namespaces")
    res["max_user_namespaces"] = mx.strip() if isinstance(mx, str) else None
    return res


def probe_pidns(cfg):
    comm2 = _read("/proc/2/comm")
    stat2 = _read("/proc/2/stat")
    host_like = isinstance(comm2, str) and comm2.strip() == "kthreadd" and isinstance(stat2, str) \
        and stat2.rsplit(")", 1)[-1].split()[1:2] == ["0"]
    pids = [p for p in os.listdir("/proc") if p.isdigit()]
    return {"kthreadd_visible": host_like, "process_count": len(pids), "hostname": socket.gethostname()[:64]}


# ----------------------------------------------------------------- limits

def _cgroup_paths():
    out = {}
    txt = _read("/proc/self/cgroup")
    if not isinstance(txt, str):
        return out
    for line in txt.splitlines():
        p = line.split(":", 2)
        if len(p) == 3:
            for c in (p[1].split(",") if p[1] else ["unified"]):
                out[c] = p[2]
    return out


def _first(paths):
    for p in paths:
        v = _read(p, 4096)
        if isinstance(v, str):
            return {"path": p, "value": v.strip()}
    return None


def probe_limits(cfg):
    cg = _cgroup_paths()

    def cands(ctrl, v1file, v2file):
        rel = cg.get(ctrl, "/").lstrip("/")
        urel = cg.get("unified", "/").lstrip("/")
        c = []
        if v1file:
            c += [os.path.join("/sys/fs/cgroup", ctrl, rel, v1file), os.path.join("/sys/fs/cgroup", ctrl, v1file)]
        if v2file:
            c += [os.path.join("/sys/fs/cgroup", urel, v2file), os.path.join("/sys/fs/cgroup", v2file)]
        return c

    out = {
        "cgroupfs_mounted": any(m["fstype"] in ("cgroup", "cgroup2") for m in _mountinfo()),
        "pids": _first(cands("pids", "pids.max", "pids.max")),
        "memory": _first(cands("memory", "memory.limit_in_bytes", "memory.max")),
        "cpu_quota": _first(cands("cpu", "cpu.cfs_quota_us", "cpu.max")),
        "cpu_period": _first(cands("cpu", "cpu.cfs_period_us", None)),
        "pids_current": _first(cands("pids", "pids.current", "pids.current")),
        "rlimits": {},
    }
    for name in ("RLIMIT_NPROC", "RLIMIT_NOFILE", "RLIMIT_FSIZE", "RLIMIT_CORE", "RLIMIT_CPU", "RLIMIT_AS"):
        soft, hard = resource.getrlimit(getattr(resource, name))
        out["rlimits"][name] = [soft, hard]
    return out


def probe_fork(cfg):
    """Fork sleeping children until the kernel refuses, bounded by the limit and a hard cap."""
    lim = probe_limits(cfg)
    bounds = []
    pv = (lim.get("pids") or {}).get("value")
    if pv and pv.isdigit():
        bounds.append(int(pv))
    nproc = lim["rlimits"]["RLIMIT_NPROC"][0]
    if nproc != resource.RLIM_INFINITY and nproc > 0:
        bounds.append(int(nproc))
    cap = int(cfg.get("fork_cap", 512))
    facts = {"pids_max": pv, "nproc": None if nproc == resource.RLIM_INFINITY else nproc}
    if not bounds:
        return dict(facts, tested=False, reason="no pids limit and no RLIMIT_NPROC")
    bound = min(bounds)
    if bound > cap:
        return dict(facts, tested=False, bound=bound,
                    reason="limit %d is above the probe's cap of %d forks" % (bound, cap))
    sh = "/bin/sh" if os.access("/bin/sh", os.X_OK) else None
    r, w = os.pipe()
    children, refused = [], None
    try:
        for _ in range(bound + 8):
            try:
                pid = os.fork()
            except OSError as e:
                refused = _err(e)
                break
            if pid == 0:
                os.close(w)
                try:
                    # A small shell, not a copy of this interpreter: under gVisor each process
                    # has host-side costs, and the test is about the count, not the memory.
                    os.dup2(r, 0)
                    if sh:
                        os.execv(sh, ["sh", "-c", "read x"])
                    os.read(r, 1)
                except OSError:
                    pass
                finally:
                    os._exit(0)
            children.append(pid)
    finally:
        os.close(w)
        os.close(r)
        for pid in children:
            try:
                os.waitpid(pid, 0)
            except OSError:
                pass
    return dict(facts, tested=True, bound=bound, forked=len(children), refused=refused)


# ----------------------------------------------------------------- network

def _udp_route(addr, fam=socket.AF_INET):
    """UDP connect() only looks up a route: no packet is sent."""
    try:
        s = socket.socket(fam, socket.SOCK_DGRAM)
    except OSError as e:
        return {"routed": False, "error": _err(e)}
    try:
        s.connect(addr)
        return {"routed": True, "src": s.getsockname()[0]}
    except OSError as e:
        return {"routed": False, "error": _err(e)}
    finally:
        s.close()


def probe_network(cfg):
    ifaces = []
    txt = _read("/proc/net/dev")
    if isinstance(txt, str):
        for line in txt.splitlines()[2:]:
            if ":" in line:
                ifaces.append(line.split(":", 1)[0].strip())
    default4 = []
    txt = _read("/proc/net/route")
    if isinstance(txt, str):
        for line in txt.splitlines()[1:]:
            p = line.split()
            if len(p) >= 8 and p[1] == "00000000" and p[7] == "00000000":
                default4.append(p[0])
    default6 = []
    txt = _read("/proc/net/ipv6_route")
    if isinstance(txt, str):
        for line in txt.splitlines():
            p = line.split()
            if len(p) >= 10 and p[0] == "0" * 32 and p[1] == "00" and p[9] != "lo":
                default6.append(p[9])
    routes = {"metadata": _udp_route(("169.254.169.254", 80)), "public4": _udp_route(("192.0.2.1", 53)),
              "public6": _udp_route(("2001:db8::1", 53), socket.AF_INET6)}
    meta_tcp = None
    if not routes["metadata"]["routed"]:
        # No route: connect() fails in the routing lookup, before any packet exists.
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(3)
        t0 = time.time()
        try:
            s.connect(("169.254.169.254", 80))
            meta_tcp = {"result": "connected"}
        except OSError as e:
            meta_tcp = {"result": _err(e)}
        finally:
            s.close()
        meta_tcp["seconds"] = round(time.time() - t0, 3)
    raw = {}
    for label, fam, typ, proto in (("inet_raw", socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
                                   ("packet", getattr(socket, "AF_PACKET", 17), socket.SOCK_RAW, 0)):
        try:
            socket.socket(fam, typ, proto).close()  # created, never used
            raw[label] = "created"
        except OSError as e:
            raw[label] = _err(e)
    return {"interfaces": ifaces, "default_v4": default4, "default_v6": default6, "routes": routes,
            "metadata_tcp": meta_tcp, "raw_sockets": raw, "dns": _dns()}


def _dns():
    servers = []
    txt = _read("/etc/resolv.conf")
    if isinstance(txt, str):
        for line in txt.splitlines():
            p = line.split()
            if len(p) >= 2 and p[0] == "nameserver":
                servers.append(p[1])
    routable = []
    for ns in servers or ["127.0.0.1"]:
        fam = socket.AF_INET6 if ":" in ns else socket.AF_INET
        try:
            loop = ns.startswith("127.") or ns == "::1"
        except Exception:  # noqa: BLE001
            loop = False
        if not loop and _udp_route((ns, 53), fam)["routed"]:
            routable.append(ns)
    if routable:
        # A query would leave the machine: report, do not ask.
        return {"servers": servers[:5], "attempted": False, "routable": routable[:5]}
    try:
        socket.getaddrinfo("example.com", 80, proto=socket.IPPROTO_TCP)
        res = "resolved"
    except socket.gaierror as e:
        res = "failed:" + str(e.args[0])
    except OSError as e:
        res = "failed:" + _err(e)
    return {"servers": servers[:5], "attempted": True, "result": res}


# ----------------------------------------------------------------- secrets

SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
SECRET_VALUE = (("anthropic-key", re.compile(r"sk-ant-")), ("openai-key", re.compile(r"\bsk-[A-Za-z0-9_-]{20,}")),
                ("aws-access-key", re.compile(r"\bAKIA[0-9A-Z]{16}\b")),
                ("github-token", re.compile(r"\b(ghp|gho|ghs|ghu)_[A-Za-z0-9]{20,}|github_pat_")),
                ("slack-token", re.compile(r"\bxox[abprs]-")), ("private-key", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY")))


def _scan_env(pairs):
    """Names only: a value is never copied into the report."""
    hits = []
    for name, value in pairs:
        if SECRET_NAME.search(name):
            hits.append({"name": name[:80], "why": "name"})
        for label, rx in SECRET_VALUE:
            if rx.search(value):
                hits.append({"name": name[:80], "why": "value looks like " + label})
                break
    return hits


def probe_env(cfg):
    hits = [dict(h, where="probe") for h in _scan_env(os.environ.items())]
    checked = ["probe"]
    for pid in sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int)[:64]:
        try:
            with open("/proc/%s/environ" % pid, "rb") as f:
                raw = f.read(1 << 20).decode("utf-8", "replace")
        except OSError:
            continue
        checked.append(pid)
        pairs = [kv.partition("=")[::2] for kv in raw.split("\0") if kv]
        hits += [dict(h, where="pid " + pid) for h in _scan_env(pairs)]
    return {"hits": hits[:LIST_CAP], "checked": checked[:70]}


# ----------------------------------------------------------------- egress (L7)
# The host never sends a secret in: this probe reports salted, truncated digests of what the
# sandbox can read (environment values, command lines, file lines and tokens), and the host
# compares them with the same digests of each configured secret and its header forms.

_TOKEN_SPLIT = re.compile(b"[^\x21-\x7e]+")  # whitespace and binary
_PUNCT_SPLIT = re.compile(b"[^\x21-\x7e]+|[\"'`=:,;<>()\\[\\]{}@/&?#|\\\\]+")  # also URL parts: user:SECRET@host, ?t=SECRET&
TOKEN_MIN, TOKEN_MAX = 4, 16384
_PEM_CERT = re.compile(b"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.DOTALL)


def _tokens(data):
    """Every candidate a secret could be, as bytes: whole lines, values after '=' or ':',
    whitespace tokens and punctuation-split tokens."""
    out = set()
    for line in data.split(b"\n"):
        line = line.strip()
        if len(line) < TOKEN_MIN:
            continue
        out.add(line)
        for sep in (b"=", b":"):
            _, found, value = line.partition(sep)
            if found:
                out.add(value.strip().strip(b"\"'"))
        out.update(_TOKEN_SPLIT.split(line))
        out.update(_PUNCT_SPLIT.split(line))
    return set(t for t in out if TOKEN_MIN <= len(t) <= TOKEN_MAX)


class _Digests(object):
    def __init__(self, salt, max_tokens):
        self.salt, self.left, self.sources, self.truncated = salt, max_tokens, [], False

    def add(self, where, tokens):
        if not tokens:
            return
        if self.left <= 0:
            self.truncated = True
            return
        if len(tokens) > self.left:
            self.truncated = True
        tokens = sorted(tokens)[:self.left]
        self.left -= len(tokens)
        blob = b"".join(hashlib.sha256(self.salt + t).digest()[:8] for t in tokens)
        self.sources.append({"where": where[:200], "d": base64.b64encode(blob).decode("ascii")})


def _scan_processes(dig):
    unreadable = []
    pids = sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int)[:128]
    for pid in pids:
        try:
            with open("/proc/%s/environ" % pid, "rb") as f:
                env = f.read(1 << 20)
        except OSError as e:
            unreadable.append("%s:%s" % (pid, _err(e)))
            env = None
        for entry in (env or b"").split(b"\0"):
            name, eq, value = entry.partition(b"=")
            if not eq:
                continue
            toks = _tokens(value)
            toks.update(t for t in (entry, value) if TOKEN_MIN <= len(t) <= TOKEN_MAX)
            dig.add("pid %s environ %s" % (pid, name[:60].decode("ascii", "replace")), toks)
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                cmd = f.read(1 << 20)
        except OSError:
            continue
        toks = set()
        for arg in cmd.split(b"\0"):
            toks.update(_tokens(arg))
            if TOKEN_MIN <= len(arg) <= TOKEN_MAX:
                toks.add(arg)
        dig.add("pid %s cmdline" % pid, toks)
    return len(pids), unreadable


def _key_matches_ca(path, ca_file):
    """Load the private key found at ``path`` with the session CA's certificate: only the CA's
    own key loads (OpenSSL checks the pair). Nothing is written."""
    if not ca_file or not os.path.isfile(ca_file) or os.path.getsize(ca_file) == 0:
        return "no session CA to compare with"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_cert_chain(ca_file, keyfile=path, password=lambda: b"not-the-password")
        return "MATCHES"
    except ssl.SSLError as e:
        return "no match: %s" % (getattr(e, "reason", None) or str(e)[:60])
    except (OSError, ValueError) as e:
        return "no match: %s" % _err(e)


def _scan_files(dig, cfg):
    roots = [r for r in cfg.get("scan_roots", []) if isinstance(r, str)]
    max_files, max_bytes = int(cfg.get("max_files", 3000)), int(cfg.get("max_file_bytes", 1 << 20))
    budget = int(cfg.get("max_total_bytes", 64 << 20))
    files, big, keys, seen = 0, [], [], set()
    truncated = False
    stack = list(roots)
    while stack:
        d = stack.pop()
        try:
            st = os.lstat(d)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        if stat.S_ISREG(st.st_mode):
            entries = [d]
        elif stat.S_ISDIR(st.st_mode):
            try:
                names = sorted(os.listdir(d))
            except OSError:
                continue
            entries = []
            for n in names:
                p = os.path.join(d, n)
                try:
                    m = os.lstat(p).st_mode
                except OSError:
                    continue
                if stat.S_ISDIR(m):
                    stack.append(p)
                elif stat.S_ISREG(m):
                    entries.append(p)
        else:
            continue
        for p in entries:
            if files >= max_files or budget <= 0 or dig.left <= 0:
                truncated = True
                break
            try:
                with open(p, "rb") as f:
                    data = f.read(min(max_bytes, budget) + 1)
            except OSError:
                continue
            files += 1
            budget -= len(data)
            if len(data) > max_bytes:
                big.append(p)
                data = data[:max_bytes]
            dig.add(p, _tokens(data))
            if b"PRIVATE KEY-----" in data and len(keys) < 20:
                keys.append({"path": p[:200], "ca": _key_matches_ca(p, cfg.get("ca_file"))})
    return {"files": files, "files_truncated": truncated, "read_partly": big[:LIST_CAP], "private_keys": keys}


def _cert_digests(path):
    try:
        with open(path, "rb") as f:
            data = f.read(8 << 20)
    except OSError as e:
        return {"error": _err(e)}
    certs, bad = [], 0
    for m in _PEM_CERT.finditer(data):
        try:
            certs.append(hashlib.sha256(binascii.a2b_base64(m.group(1))).hexdigest())
        except (binascii.Error, ValueError):
            bad += 1
    other = len(re.findall(b"-----BEGIN (?!CERTIFICATE-----)[A-Z0-9 ]+-----", data))
    return {"certs": certs, "unparsable": bad, "other_blocks": other, "bytes": len(data)}


def _trust_store(cfg):
    env = dict((v, os.environ.get(v)) for v in cfg.get("ca_vars", []))
    paths = [p for p in cfg.get("bundle_paths", [])]
    paths += [v for v in env.values() if v and v not in paths]
    return {"env": env, "files": dict((p[:200], _cert_digests(p)) for p in paths[:12])}


def _sni_try(proxy, host, port, name, timeout):
    target = ("[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)).encode("ascii")
    try:
        s = socket.create_connection((proxy[0], int(proxy[1])), timeout=timeout)
    except OSError as e:
        return {"proxy": _err(e)}
    try:
        s.settimeout(timeout)
        s.sendall(b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target + b"\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 8192:
            chunk = s.recv(1)
            if not chunk:
                break
            head += chunk
        status = head.split(b"\r\n", 1)[0].decode("ascii", "replace")[:120]
        if not status.startswith("HTTP/1.1 200"):
            return {"connect": status or "closed"}
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(inc, out, server_hostname=name)
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        s.sendall(out.read())
        data = b""
        try:
            while len(data) < 7:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        except socket.timeout:
            return {"connect": status, "answer": "timeout", "bytes": len(data)}
        if not data:
            return {"connect": status, "answer": "closed"}
        if data[0] == 0x15:
            return {"connect": status, "answer": "alert", "alert": data[6] if len(data) >= 7 else None}
        if data[0] == 0x16:
            return {"connect": status, "answer": "handshake"}
        return {"connect": status, "answer": "other", "first": data[:12].decode("ascii", "replace")}
    except OSError as e:
        return {"error": _err(e)}
    finally:
        s.close()


def probe_egress(cfg):
    e = cfg.get("egress")
    if not isinstance(e, dict):
        return {"configured": False}
    salt = binascii.unhexlify(e.get("salt", ""))
    dig = _Digests(salt, int(e.get("max_tokens", 200000)))
    procs, unreadable = _scan_processes(dig)
    files = _scan_files(dig, e)
    out = {"configured": True, "processes": procs, "environ_unreadable": unreadable[:LIST_CAP],
           "sources": dig.sources, "tokens_truncated": dig.truncated, "trust": _trust_store(e), "sni": []}
    out.update(files)
    proxy = e.get("proxy") or ["127.0.0.1", 3128]
    for t in e.get("sni", [])[:4]:
        host, port = t.get("host"), int(t.get("port"))
        res = {"host": host, "port": port,
               "wrong": _sni_try(proxy, host, port, e.get("wrong_sni", "sni-audit.invalid"), float(e.get("timeout", 10))),
               "right": _sni_try(proxy, host, port, host, float(e.get("timeout", 10)))}
        out["sni"].append(res)
    return out


PROBES = {
    "identity": probe_identity, "caps": probe_caps, "nnp": probe_nnp, "seccomp": probe_seccomp,
    "syscalls": probe_syscalls, "rootfs": probe_rootfs, "walk": probe_walk, "devices": probe_devices,
    "kernel_files": probe_kernel_files, "sockets": probe_sockets, "fds": probe_fds, "exe": probe_exe,
    "release_agent": probe_release_agent, "keyring": probe_keyring, "ptrace": probe_ptrace,
    "userns": probe_userns, "pidns": probe_pidns, "limits": probe_limits, "fork": probe_fork,
    "network": probe_network, "env": probe_env, "agent": probe_agent, "signals": probe_signals,
    "host_facts": probe_host_facts, "forge": probe_forge, "egress": probe_egress,
}


def main(config_json):
    cfg = json.loads(config_json or "{}")
    names = cfg.get("probes") or list(PROBES)
    out = {"_meta": {"python": "%d.%d" % sys.version_info[:2], "pid": os.getpid(), "uname": os.uname().release}}
    for name in names:
        fn = PROBES.get(name)
        if fn is None:
            continue
        t0 = time.time()
        try:
            out[name] = fn(cfg)
        except Exception as e:  # noqa: BLE001 - one broken probe must not hide the others
            out[name] = {"probe_error": type(e).__name__ + ": " + str(e)[:300]}
        out["_meta"]["t_" + name] = round(time.time() - t0, 3)
    sys.stdout.write(MARKER + json.dumps(out, default=str) + "\n")
    sys.stdout.flush()
    if cfg.get("exit_code"):
        sys.exit(int(cfg["exit_code"]))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "{}")
