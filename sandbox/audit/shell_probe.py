"""The POSIX sh subset of the probe, for foreign containers without python3.

It covers what a shell can observe without compiled helpers: identity,
capability sets, no_new_privs and seccomp mode, root filesystem writes,
kernel files (``test -w``, i.e. access(2)), masked paths, engine sockets,
devices, routes, environment names, cgroup limits, set-id files (when
``find`` exists). Everything needing a syscall a shell cannot make (the
seccomp sample, ptrace, unshare, keyctl, descriptor walks, the fork test,
DNS and metadata connects) is reported as "could not run".

Output lines are ``section|key|value``; :func:`parse` turns them into the
same dictionary shape the python probe emits, so one set of rules judges both.
Environment *values* never leave the container: only names are printed.
"""

from __future__ import annotations

import re
from typing import Any

SH_PROBE = r"""
p() { printf '%s|%s|%s\n' "$1" "$2" "$3"; }
p id uid "$(id -u 2>/dev/null)"
p id gid "$(id -g 2>/dev/null)"
p id groups "$(id -G 2>/dev/null)"
while IFS=: read -r k v; do
  case "$k" in Cap*|NoNewPrivs|Seccomp) set -- $v; p status "$k" "$1";; esac
done < /proc/self/status
while read -r a b c d mp opts rest; do [ "$mp" = / ] && p rootfs opts "$opts"; done < /proc/self/mountinfo
for d in / /etc /usr/bin; do
  f="$d/.sandbox-audit-$$"
  if ( : > "$f" ) 2>/dev/null; then rm -f "$f"; p create "$d" created; else p create "$d" refused; fi
done
for f in /proc/sys/kernel/core_pattern /proc/sysrq-trigger /proc/sys/kernel/modprobe /sys/kernel/uevent_helper \
         /proc/sys/fs/binfmt_misc/register /proc/sys/vm/drop_caches /sys/kernel/mm/transparent_hugepage/enabled; do
  if [ ! -e "$f" ]; then p kf "$f" ENOENT; elif [ -w "$f" ]; then p kf "$f" writable; else p kf "$f" refused; fi
done
for f in /proc/kcore /proc/keys /proc/timer_list /proc/sched_debug /proc/latency_stats /proc/timer_stats \
         /proc/scsi /proc/acpi /sys/firmware; do
  if [ ! -e "$f" ]; then p mask "$f" absent
  elif [ -c "$f" ]; then p mask "$f" masked
  elif [ -d "$f" ]; then set -- "$f"/*; if [ -e "$1" ]; then p mask "$f" exposed; else p mask "$f" masked; fi
  elif [ -r "$f" ]; then p mask "$f" exposed
  else p mask "$f" unreadable; fi
done
while read -r a b c d mp opts rest; do
  case "$mp" in /proc/sys|/sys) p romount "$mp" "$opts";; esac
done < /proc/self/mountinfo
for f in /var/run/docker.sock /run/docker.sock /run/containerd/containerd.sock /var/run/containerd/containerd.sock \
         /run/crio/crio.sock /var/run/crio/crio.sock /run/podman/podman.sock /var/run/dockershim.sock \
         /run/buildkit/buildkitd.sock; do
  if [ -S "$f" ]; then p sock "$f" socket; elif [ -e "$f" ]; then p sock "$f" present; fi
done
for f in /dev/* /dev/*/*; do
  case "$f" in /dev/shm/*|/dev/mqueue/*) continue;; esac
  if [ -b "$f" ]; then p dev block "$(ls -ln "$f" 2>/dev/null)"; elif [ -c "$f" ]; then p dev char "$(ls -ln "$f" 2>/dev/null)"; fi
done
while IFS= read -r line; do
  case "$line" in *:*) n=${line%%:*}; set -- $n; p net iface "$1";; esac
done < /proc/net/dev
while read -r iface dest gw flags rc use metric mask rest; do
  [ "$dest" = 00000000 ] && [ "$mask" = 00000000 ] && p net default4 "$iface"
done < /proc/net/route
env | while IFS= read -r line; do
  case "$line" in *=*) ;; *) continue;; esac
  n=${line%%=*}
  case "$n" in *[Kk][Ee][Yy]*|*[Tt][Oo][Kk][Ee][Nn]*|*[Ss][Ee][Cc][Rr][Ee][Tt]*|*[Pp][Aa][Ss][Ss][Ww][Oo][Rr][Dd]*|\
*[Pp][Aa][Ss][Ss][Ww][Dd]*|*[Cc][Rr][Ee][Dd][Ee][Nn][Tt][Ii][Aa][Ll]*) p env name "$n";; esac
  case "$line" in *sk-ant-*|*AKIA*|*ghp_*|*github_pat_*|*xoxb-*|*xoxp-*) p env value "$n";; esac
done
for f in /sys/fs/cgroup/pids/pids.max /sys/fs/cgroup/pids.max; do [ -r "$f" ] && { p lim pids "$(cat "$f")"; break; }; done
for f in /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/memory.max; do [ -r "$f" ] && { p lim memory "$(cat "$f")"; break; }; done
for f in /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/cpu.max; do [ -r "$f" ] && { p lim cpu "$(cat "$f")"; break; }; done
grep -q ' - cgroup' /proc/self/mountinfo 2>/dev/null && p lim mounted yes
[ "$(cat /proc/2/comm 2>/dev/null)" = kthreadd ] && p pidns kthreadd yes
n=0; for d in /proc/[0-9]*; do n=$((n+1)); done; p pidns count "$n"
if command -v find >/dev/null 2>&1; then
  find / -xdev \( -perm -4000 -o -perm -2000 \) -type f 2>/dev/null | head -n 50 | while IFS= read -r f; do p setid "$f" x; done
  find / -xdev -type s 2>/dev/null | head -n 50 | while IFS= read -r f; do p walksock "$f" x; done
  p find available yes
fi
while IFS=: read -r k v; do case "$k" in Name|Uid) set -- $v; p agent "pid1$k" "$1";; esac; done < /proc/1/status
set -- $(ls -ln /proc/1/environ 2>/dev/null); p agent owner "$3"
# Open only (never read or write). A pipe open can block (no peer): 2 s at most, and blocking
# means the permission check passed, so a timeout (124) counts as opened.
try_open() {
  if command -v timeout >/dev/null 2>&1; then timeout 2 sh -c "$1" 2>/dev/null; else sh -c "$1" 2>/dev/null; fi
  r=$?; [ "$r" -eq 0 ] || [ "$r" -eq 124 ]
}
if try_open 'exec 3</proc/1/fd/0'; then p agent /proc/1/fd/0 opened; else p agent /proc/1/fd/0 refused; fi
if try_open 'exec 3>>/proc/1/fd/1'; then p agent /proc/1/fd/1 opened; else p agent /proc/1/fd/1 refused; fi
if try_open 'exec 3</proc/1/mem'; then p agent mem opened; else p agent mem refused; fi
if try_open 'exec 3</proc/1/environ'; then p agent environ opened; else p agent environ refused; fi
for f in /sys/kernel/vmcoreinfo /proc/config.gz; do
  if [ ! -e "$f" ]; then p fact "$f" absent; elif [ -c "$f" ]; then p fact "$f" masked
  elif [ "$(head -c 1 "$f" 2>/dev/null | wc -c)" -gt 0 ]; then p fact "$f" readable; else p fact "$f" empty; fi
done
p done ok ok
"""

# Checks the shell cannot perform, with the reason shown in their "could not run" row.
SH_UNAVAILABLE: dict[str, str] = {
    i: "needs python3 in the container (only the sh subset ran)" for i in (
        "inside.seccomp_blocked", "inside.writable_paths", "inside.fd_leaks", "inside.runtime_exe",
        "inside.release_agent", "inside.keyring", "inside.ptrace", "inside.userns", "inside.fork_bounded",
        "inside.raw_sockets", "inside.dns", "inside.metadata", "inside.egress_secrets", "inside.egress_trust_store",
        "inside.egress_sni")
}


_DEV = re.compile(r"(\d+),\s+(\d+)\s.*?(/dev/\S+)\s*$")


def parse(output: str) -> dict[str, Any]:
    """sh probe lines -> the python probe's dictionary shape (for the same rules)."""
    ident: dict[str, Any] = {}
    status: dict[str, str] = {}
    rootfs: dict[str, Any] = {"create": {}}
    kf: dict[str, Any] = {"write_open": {}, "masked": {}, "read_only_mount": {}}
    socks: dict[str, Any] = {"engine_paths": {}, "named_unix": []}
    devices: list[dict[str, Any]] = []
    net: dict[str, Any] = {"interfaces": [], "default_v4": [], "default_v6": [], "routes": {}}
    env_hits: list[dict[str, str]] = []
    lim: dict[str, Any] = {"cgroupfs_mounted": False}
    walk: dict[str, Any] = {"writable": {}, "setid": [], "sockets": [], "devices_outside_dev": []}
    pidns: dict[str, Any] = {"kthreadd_visible": False}
    agent: dict[str, Any] = {"pid1": {}, "fd_open": {}, "fd_list": "not listed by the sh subset"}
    facts: dict[str, Any] = {}
    have_find = done = False
    for line in output.splitlines():
        parts = line.split("|", 2)
        if len(parts) != 3:
            continue
        sec, key, val = parts
        if sec == "id":
            if key == "groups":
                ident["groups"] = [int(g) for g in val.split() if g.isdigit()]
            elif val.isdigit():
                ident[key] = int(val)
                ident["e" + key] = int(val)
        elif sec == "status":
            status[key] = val
        elif sec == "rootfs":
            rootfs["root_opts"] = val.split(",")
        elif sec == "create":
            rootfs["create"][key] = "created" if val == "created" else "refused"
        elif sec == "kf":
            kf["write_open"][key] = "opened" if val == "writable" else val
        elif sec == "mask":
            kf["masked"][key] = val
        elif sec == "romount":
            kf["read_only_mount"][key] = "ro" in val.split(",")
        elif sec == "sock":
            socks["engine_paths"][key] = {"socket": val == "socket"}
        elif sec == "dev":
            m = _DEV.search(val)
            if m:
                devices.append({"path": m.group(3), "type": key, "major": int(m.group(1)), "minor": int(m.group(2))})
        elif sec == "net":
            net.setdefault({"iface": "interfaces", "default4": "default_v4"}.get(key, key), []).append(val)
        elif sec == "env":
            env_hits.append({"name": val[:80], "why": "name" if key == "name" else "value looks like a key",
                             "where": "sh"})
        elif sec == "lim":
            if key == "mounted":
                lim["cgroupfs_mounted"] = True
            else:
                lim[{"cpu": "cpu_quota"}.get(key, key)] = {"value": val.strip()}
        elif sec == "pidns":
            if key == "kthreadd":
                pidns["kthreadd_visible"] = True
            elif val.isdigit():
                pidns["process_count"] = int(val)
        elif sec == "setid":
            walk["setid"].append({"path": key, "mode": "?", "nosuid": False})
        elif sec == "walksock":
            walk["sockets"].append(key)
        elif sec == "agent":
            if key == "pid1Name":
                agent["pid1"]["name"] = val
            elif key == "pid1Uid":
                agent["pid1"]["uid"] = [val]
            elif key == "owner":
                agent["proc_owner"] = int(val) if val.isdigit() else val
            elif key.startswith("/proc/1/fd/"):
                agent["fd_open"][key] = "opened" if val == "opened" else "refused"
            elif key in ("mem", "environ"):
                agent[key] = "opened" if val == "opened" else "refused"
        elif sec == "fact":
            facts[key] = val
        elif sec == "find":
            have_find = True
        elif sec == "done":
            done = True
    out: dict[str, Any] = {
        "_meta": {"probe": "sh", "complete": done},
        "identity": ident,
        "caps": {k: status.get(k) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")},
        "nnp": {"status": status.get("NoNewPrivs"), "prctl": 1 if status.get("NoNewPrivs") == "1" else None},
        "seccomp": {"status": status.get("Seccomp")},
        "rootfs": rootfs,
        "kernel_files": kf,
        "sockets": socks,
        "devices": {"devices": devices},
        "network": net,
        "env": {"hits": env_hits, "checked": ["sh"]},
        "limits": lim,
        "pidns": pidns,
    }
    if agent["fd_open"]:
        out["agent"] = agent
    if facts:
        out["host_facts"] = {"required": facts, "other": {}}
    if have_find:
        walk["setid_count"] = len(walk["setid"])
        out["walk"] = walk
    return out
