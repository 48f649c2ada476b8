"""The audit's rules on synthetic data (no Docker): outside rules for setups a test machine
must not start (privileged, host pid/net, the real Docker socket), the sh-subset parser,
and malformed or hostile probe output, which must never turn into a pass."""

from __future__ import annotations

import copy
import json
import xml.etree.ElementTree as ET

import pytest

from sandbox.audit.catalog import CATALOG, INSIDE_IDS
from sandbox.audit.checks import Expectations, cap_names, evaluate_inside
from sandbox.audit.model import AuditReport
from sandbox.audit.outside import evaluate_engine, evaluate_outside
from sandbox.audit.report import render_table, to_json, to_junit
from sandbox.audit.shell_probe import parse
from sandbox.audit.syscalls import SAMPLE, sample_table
from sandbox.policy import load_policy
from sandbox.spec import compile_spec

HARDENED = {"Id": "c0ffee" * 10, "Image": "sha256:" + "1" * 64, "State": {"Pid": 0, "Running": True},
            "Config": {"User": "10001:10001", "Env": ["PATH=/usr/bin", "HOME=/workspace"], "NetworkDisabled": True},
            "HostConfig": {"Privileged": False, "CapDrop": ["ALL"], "CapAdd": None, "ReadonlyRootfs": True,
                           "SecurityOpt": ["no-new-privileges:true", 'seccomp={"defaultAction":"SCMP_ACT_ERRNO"}'],
                           "NetworkMode": "none", "PidMode": "", "IpcMode": "private", "UTSMode": "", "UsernsMode": "",
                           "CgroupnsMode": "private", "Memory": 1 << 29, "MemorySwap": 1 << 29, "NanoCpus": 10**9,
                           "PidsLimit": 128, "RestartPolicy": {"Name": "no"}, "PortBindings": {}, "Devices": [],
                           "Ulimits": [{"Name": "nofile", "Soft": 1024, "Hard": 1024},
                                       {"Name": "nproc", "Soft": 256, "Hard": 256}, {"Name": "core", "Soft": 0, "Hard": 0}],
                           "MaskedPaths": ["/proc/kcore", "/proc/keys", "/sys/firmware"],
                           "ReadonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"]},
            "Mounts": []}
INFO = {"SecurityOptions": ["name=seccomp,profile=default"], "DefaultRuntime": "runc", "Runtimes": {"runc": {}}}


def rows(attrs: dict) -> dict:
    return {r.id: r for r in evaluate_outside(attrs, INFO, read_host_cgroups=False)}


def weakened(**hc) -> dict:
    a = copy.deepcopy(HARDENED)
    a["HostConfig"].update(hc)
    return a


def test_hardened_inspect_passes_every_outside_rule() -> None:
    bad = {i: r.observed for i, r in rows(HARDENED).items() if r.status == "fail"}
    assert bad == {}


@pytest.mark.parametrize(("change", "check"), [
    ({"Privileged": True}, "outside.privileged"),
    ({"PidMode": "host"}, "outside.pid_mode"),
    ({"NetworkMode": "host"}, "outside.network_mode"),
    ({"NetworkMode": "host"}, "outside.network"),
    ({"IpcMode": "host"}, "outside.ipc_mode"),
    ({"UTSMode": "host"}, "outside.uts_mode"),
    ({"CapAdd": ["SYS_ADMIN"]}, "outside.capabilities"),
    ({"CapDrop": []}, "outside.capabilities"),
    ({"SecurityOpt": ["seccomp=unconfined", "no-new-privileges:true"]}, "outside.seccomp"),
    ({"SecurityOpt": ['seccomp={"defaultAction":"SCMP_ACT_ERRNO"}']}, "outside.no_new_privileges"),
    ({"ReadonlyRootfs": False}, "outside.read_only_rootfs"),
    ({"Devices": [{"PathOnHost": "/dev/sda", "PathInContainer": "/dev/sda"}]}, "outside.devices"),
    ({"Memory": 0}, "outside.memory"),
    ({"PidsLimit": None}, "outside.pids"),
    ({"NanoCpus": 0}, "outside.cpu"),
    ({"RestartPolicy": {"Name": "always"}}, "outside.restart_policy"),
    ({"PortBindings": {"22/tcp": [{"HostIp": "", "HostPort": "22"}]}}, "outside.ports"),
    ({"MaskedPaths": [], "ReadonlyPaths": []}, "outside.masked_paths"),
])
def test_each_weakening_fails_its_outside_row(change: dict, check: str) -> None:
    r = rows(weakened(**change))[check]
    assert r.status == "fail", r


def test_userns_host_fails_only_where_the_engine_remaps() -> None:
    a = weakened(UsernsMode="host")
    assert rows(a)["outside.userns_mode"].status == "info"
    remapping = dict(INFO, SecurityOptions=["name=seccomp", "name=userns"])
    r = {x.id: x for x in evaluate_outside(a, remapping, read_host_cgroups=False)}
    assert r["outside.userns_mode"].status == "fail"


@pytest.mark.parametrize("src", ["/var/run/docker.sock", "/run/containerd/containerd.sock", "/home/u/docker.sock"])
def test_a_mounted_engine_socket_fails_two_rows(src: str) -> None:
    a = copy.deepcopy(HARDENED)
    a["Mounts"] = [{"Type": "bind", "Source": src, "Destination": "/var/run/docker.sock", "RW": True}]
    r = rows(a)
    assert r["outside.docker_socket"].status == "fail"
    assert r["outside.sensitive_mounts"].status == "fail"


@pytest.mark.parametrize("src", ["/", "/etc", "/proc", "/var/lib/docker", "/root/.ssh", "/dev"])
def test_sensitive_host_paths_fail(src: str) -> None:
    a = copy.deepcopy(HARDENED)
    a["Mounts"] = [{"Type": "bind", "Source": src, "Destination": "/host", "RW": False, "Propagation": "rshared"}]
    r = rows(a)
    assert r["outside.sensitive_mounts"].status == "fail"
    assert r["outside.mount_propagation"].status == "fail"


def test_named_volumes_are_not_sensitive_paths() -> None:
    a = copy.deepcopy(HARDENED)
    a["Mounts"] = [{"Type": "volume", "Name": "data", "Source": "/var/lib/docker/volumes/data/_data",
                    "Destination": "/data", "RW": True}]
    assert rows(a)["outside.sensitive_mounts"].status == "pass"


def test_env_secrets_are_reported_by_name_only() -> None:
    a = copy.deepcopy(HARDENED)
    a["Config"]["Env"] = ["GITHUB_TOKEN=ghp_" + "a" * 36, "X=sk-ant-api03-zzzz", "SAFE=1"]
    r = rows(a)["outside.env_secrets"]
    assert r.status == "fail" and "GITHUB_TOKEN" in r.observed and "X " in r.observed + " "
    assert "ghp_" not in r.observed and "sk-ant" not in r.observed


def test_spec_match_detects_drift_from_the_compiled_policy() -> None:
    policy = load_policy("default")
    body = compile_spec(policy, "s").body
    a = {"Config": {"User": body["User"], "Env": body["Env"], "NetworkDisabled": True},
         "HostConfig": copy.deepcopy(body["HostConfig"]), "Mounts": [], "State": {}}
    r = {x.id: x for x in evaluate_outside(a, INFO, policy=policy, spec_body=body, read_host_cgroups=False)}
    assert r["outside.spec_matches_policy"].status == "pass" and r["outside.seccomp"].status == "pass"
    a["HostConfig"]["PidsLimit"] = 4096
    a["HostConfig"]["SecurityOpt"] = ["no-new-privileges:true", 'seccomp={"defaultAction":"SCMP_ACT_ALLOW"}']
    r = {x.id: x for x in evaluate_outside(a, INFO, policy=policy, spec_body=body, read_host_cgroups=False)}
    assert r["outside.spec_matches_policy"].status == "fail" and "PidsLimit" in r["outside.spec_matches_policy"].observed
    assert r["outside.seccomp"].status == "fail" and r["outside.pids"].status == "fail"


def test_engine_rows_never_fail() -> None:
    info = {"SecurityOptions": [], "Runtimes": {"runc": {}}, "DefaultRuntime": "runc"}
    out = evaluate_engine(info, {"com.docker.network.bridge.enable_icc": "true"})
    assert {r.status for r in out} <= {"info", "warn"}
    assert {r.id for r in out} == {i for i in CATALOG if i.startswith("engine.")}


# ---------------------------------------------------------------- inside rules on bad input

def test_an_empty_or_hostile_probe_never_passes() -> None:
    for probe in ({}, {"identity": "x", "caps": [], "nnp": 5, "network": None},
                  {k: {"probe_error": "boom"} for k in ("identity", "caps", "nnp", "seccomp", "rootfs", "walk")}):
        out = evaluate_inside(probe, Expectations.from_policy(load_policy("default")))
        assert {r.id for r in out} == set(INSIDE_IDS)
        assert not [r for r in out if r.status == "pass" and r.id in ("inside.user", "inside.caps",
                                                                         "inside.no_new_privs", "inside.rootfs_read_only")]


def test_capabilities_are_named() -> None:
    assert cap_names("0000000000200000") == ["SYS_ADMIN"]
    assert cap_names("00000000a82425fb")[0] == "SYS_ADMIN"  # the worst first (Docker default set + SYS_ADMIN)


def test_gvisor_emulated_devices_are_accepted_only_under_runsc() -> None:
    probe = {"devices": {"devices": [{"path": "/dev/fuse", "type": "char", "major": 10, "minor": 229, "open": "opened"},
                                     {"path": "/dev/null", "type": "char", "major": 1, "minor": 3}]}}
    runc = evaluate_inside(probe, Expectations(runtime="runc"), only=["inside.host_devices"])[0]
    runsc = evaluate_inside(probe, Expectations(runtime="runsc"), only=["inside.host_devices"])[0]
    assert runc.status == "fail" and runsc.status == "pass" and "gVisor" in runsc.observed


def test_a_syscall_that_reaches_the_kernel_fails_the_sample() -> None:
    probe = {"seccomp": {"status": "2"}, "syscalls": {"mount": {"ret": -1, "errno": "EPERM"},
                                                      "bpf": {"ret": -1, "errno": "EINVAL"},
                                                      "reboot": {"killed": "SIGSYS"}}}
    r = {x.id: x for x in evaluate_inside(probe, Expectations(), only=["inside.seccomp_blocked"])}
    assert r["inside.seccomp_blocked"].status == "fail" and "bpf(EINVAL)" in r["inside.seccomp_blocked"].observed


def test_every_sampled_syscall_has_harmless_arguments_and_resolves() -> None:
    table = sample_table()
    assert set(table) <= set(SAMPLE) and len(table) >= 40
    assert SAMPLE["reboot"] == (0, 0, 0, 0)  # wrong magic: a reachable reboot does nothing
    assert SAMPLE["kexec_load"][1] == 0 and SAMPLE["kexec_load"][3] != 0  # nr_segments=0 with flags=0 would unload
    assert SAMPLE["acct"] == (1,)  # NULL would switch accounting off


def test_sh_subset_output_parses_into_the_same_shape() -> None:
    out = "\n".join([  # noqa: FLY002 - one probe line per item reads best
        "id|uid|0", "id|gid|0", "id|groups|0 1", "status|CapEff|0000003fffffffff", "status|CapBnd|0000003fffffffff",
        "status|CapPrm|0000003fffffffff", "status|CapInh|0000000000000000", "status|CapAmb|0000000000000000",
        "status|NoNewPrivs|0", "status|Seccomp|0", "rootfs|opts|rw,relatime", "create|/|created",
        "kf|/proc/sys/kernel/core_pattern|writable", "mask|/proc/kcore|absent", "mask|/proc/keys|exposed",
        "sock|/var/run/docker.sock|socket", "dev|block|brw-rw---- 1 0 6 8, 0 Jan 1 00:00 /dev/sda",
        "net|iface|lo", "net|iface|eth0", "net|default4|eth0", "env|name|AWS_SECRET_ACCESS_KEY",
        "lim|pids|max", "pidns|count|3", "done|ok|ok"])
    p = parse(out)
    r = {x.id: x for x in evaluate_inside(p, Expectations())}
    for cid in ("inside.user", "inside.caps", "inside.no_new_privs", "inside.seccomp_mode", "inside.rootfs_read_only",
                "inside.core_pattern", "inside.masked_paths", "inside.engine_socket", "inside.host_devices",
                "inside.no_route", "inside.env_secrets", "inside.limit_pids"):
        assert r[cid].status == "fail", (cid, r[cid])


# ---------------------------------------------------------------- rendering

def _report() -> AuditReport:
    rep = AuditReport(target="container evil", header={"policy": "x", "policy_hash": "sha256:00", "kernel": "6"})
    rep.checks = evaluate_inside({"identity": {"uid": 0, "euid": 0, "gid": 0, "groups": []},
                                  "env": {"hits": [{"name": "[bold red]FAKE[/] <x>&", "why": "name", "where": "p"}]}},
                                 Expectations(), only=["inside.user", "inside.env_secrets", "inside.caps"])
    return rep


def test_json_and_junit_carry_every_row() -> None:
    rep = _report()
    data = json.loads(to_json(rep))
    assert data["ok"] is False and len(data["checks"]) == 3 and data["header"]["policy_hash"] == "sha256:00"
    root = ET.fromstring(to_junit(rep).split("?>", 1)[1])
    assert root.get("tests") == "3" and root.get("failures") == "2" and root.get("skipped") == "1"
    names = [c.get("name") for c in root.iter("testcase")]
    assert names == ["inside.user", "inside.caps", "inside.env_secrets"]


def test_observed_text_is_not_interpreted_as_markup() -> None:
    from rich.console import Console

    con = Console(record=True, width=200)
    render_table(_report(), con)
    text = con.export_text()
    assert "[bold red]FAKE[/]" in text and "FAILED" in text
