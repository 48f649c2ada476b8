"""The compiled container spec carries every hardening flag (no Docker needed)."""

from __future__ import annotations

import json

import pytest

from sandbox.policy import load_policy, policy_from_dict
from sandbox.spec import MASKED_PATHS, Binds, Ids, compile_spec


@pytest.fixture(scope="module")
def spec():
    return compile_spec(load_policy("default"), "sess_test", ids=Ids(2000123, 2000123))


def test_runs_as_the_leased_non_root_uid_without_capabilities(spec) -> None:
    hc = spec.host_config
    assert spec.body["User"] == "2000123:2000123"
    assert spec.body["Labels"]["org.sandbox.uid"] == "2000123" and spec.body["Labels"]["org.sandbox.gid"] == "2000123"
    assert hc["CapDrop"] == ["ALL"] and not hc["CapAdd"]
    assert hc["Privileged"] is False
    assert "no-new-privileges:true" in hc["SecurityOpt"]


def test_root_filesystem_is_read_only_and_writable_paths_are_capped(spec) -> None:
    hc = spec.host_config
    assert hc["ReadonlyRootfs"] is True
    assert "size=64m" in hc["Tmpfs"]["/tmp"] and "noexec" in hc["Tmpfs"]["/tmp"]
    ws = hc["Tmpfs"]["/workspace"]
    assert "size=256m" in ws and "uid=2000123" in ws and "gid=2000123" in ws and "mode=0700" in ws
    assert hc["Mounts"] == []  # no host path at all by default
    assert hc["ShmSize"] > 0


def test_no_network_at_all_without_egress_rules(spec) -> None:
    assert spec.body["NetworkDisabled"] is True
    assert spec.host_config["NetworkMode"] == "none"
    assert not any(e.startswith(("HTTP_PROXY=", "HTTPS_PROXY=")) for e in spec.body["Env"])


def test_cgroup_limits_and_no_swap(spec) -> None:
    hc = spec.host_config
    assert hc["Memory"] == 512 << 20 and hc["MemorySwap"] == hc["Memory"]
    assert hc["PidsLimit"] == 128 and hc["NanoCpus"] == 10**9
    ul = {u["Name"]: u for u in hc["Ulimits"]}
    assert ul["core"]["Hard"] == 0
    assert set(ul) == {"nofile", "nproc", "fsize", "core", "cpu", "stack"}


def test_seccomp_profile_is_inline_allowlist(spec) -> None:
    opt = next(o for o in spec.host_config["SecurityOpt"] if o.startswith("seccomp="))
    prof = json.loads(opt.removeprefix("seccomp="))
    assert prof["defaultAction"] == "SCMP_ACT_ERRNO"
    allowed = {n for r in prof["syscalls"] if r["action"] == "SCMP_ACT_ALLOW" for n in r["names"]}
    for bad in ("mount", "unshare", "setns", "ptrace", "bpf", "keyctl", "io_uring_setup", "userfaultfd"):
        assert bad not in allowed


def test_agent_is_pid1_and_dies_with_its_owner_and_output_is_not_logged_to_disk(spec) -> None:
    hc = spec.host_config
    assert hc["Init"] is False  # no dumpable docker-init holding the channel; the agent is PID 1
    assert spec.body["StdinOnce"] is True  # the owner's attach closing closes the agent's stdin
    assert hc["LogConfig"]["Type"] == "none"
    assert hc["RestartPolicy"]["Name"] == "no"


def test_host_facts_are_masked_and_docker_defaults_kept(spec) -> None:
    masked = spec.host_config["MaskedPaths"]
    for p in ("/sys/kernel/vmcoreinfo", "/proc/config.gz", "/proc/kallsyms", "/proc/kcore", "/proc/keys",
              "/sys/firmware", "/proc/sys/kernel/random/boot_id"):
        assert p in masked
    assert masked == list(MASKED_PATHS)
    assert "/proc/sys" in spec.host_config["ReadonlyPaths"]


def test_pinned_policy_uid_is_the_default_ids() -> None:
    pol = policy_from_dict({"name": "p", "user": {"uid": 4242, "gid": 4343}})
    assert compile_spec(pol, "s").body["User"] == "4242:4343"


def test_extra_read_only_mounts_are_read_only_binds() -> None:
    s = compile_spec(load_policy("default"), "s", Binds(ro_mounts=(("/srv/skills/x", "/skills"),)))
    assert s.host_config["Mounts"] == [{"Type": "bind", "Source": "/srv/skills/x", "Target": "/skills",
                                        "ReadOnly": True, "BindOptions": {"Propagation": "rprivate"}}]


def test_caller_environment_never_leaks_in(monkeypatch) -> None:
    monkeypatch.setenv("FAKE_SECRET_FOR_TEST", "s3cr3t-value")
    s = compile_spec(load_policy("default"), "sess_env")
    assert not any("s3cr3t-value" in e or "FAKE_SECRET" in e for e in s.body["Env"])


def test_labels_name_session_and_host(spec) -> None:
    lab = spec.body["Labels"]
    assert lab["org.sandbox.managed"] == "true" and lab["org.sandbox.session"] == "sess_test"
    assert lab["org.sandbox.host"] and lab["org.sandbox.policy-digest"].startswith("sha256:")


def test_egress_policy_mounts_only_the_session_socket_dir() -> None:
    pol = load_policy("python-packages")
    with pytest.raises(ValueError):
        compile_spec(pol, "s")  # no proxy prepared: refuse rather than run without one
    s = compile_spec(pol, "s", Binds(egress_dir="/var/lib/sandbox/egress/sessions/s"))
    m = s.host_config["Mounts"]
    assert m == [{"Type": "bind", "Source": "/var/lib/sandbox/egress/sessions/s", "Target": "/run/sandbox-egress",
                  "ReadOnly": True, "BindOptions": {"Propagation": "rprivate"}}]
    assert "HTTPS_PROXY=http://127.0.0.1:3128" in s.body["Env"]
    assert s.body["NetworkDisabled"] is True


def test_disk_workspace_is_a_bind_of_the_prepared_dir() -> None:
    pol = policy_from_dict({"name": "d", "workspace": {"backing": "disk", "size_mb": 64}})
    s = compile_spec(pol, "s", Binds(workspace_dir="/var/lib/sandbox/workspaces/x"))
    assert s.host_config["Mounts"][0]["Target"] == "/workspace"
    assert "/workspace" not in s.host_config["Tmpfs"]


def test_gvisor_spec_allows_clone3_because_runsc_ignores_errno_ret() -> None:
    s = compile_spec(load_policy("gvisor"), "g")
    opt = next(o for o in s.host_config["SecurityOpt"] if o.startswith("seccomp="))
    prof = json.loads(opt.removeprefix("seccomp="))
    assert s.host_config["Runtime"] == "runsc"
    assert "clone3" in prof["syscalls"][0]["names"]
    runc = json.loads(next(o for o in compile_spec(load_policy("default"), "r").host_config["SecurityOpt"]
                           if o.startswith("seccomp=")).removeprefix("seccomp="))
    assert {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38} in runc["syscalls"]
