"""`policy compile --target kubernetes`: every shipped profile compiles to manifests that validate
strictly against the vendored agent-sandbox / security-profiles-operator CRDs and the core
Kubernetes schemas; a mistyped field or a wrong type is caught; the hardening is all there."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from sandbox import seccomp as sc
from sandbox.cli import main
from sandbox.kube import compiler as kc
from sandbox.kube.config import config_from_dict
from sandbox.kube.degradations import KNOWN_IDS
from sandbox.paths import profile_dirs
from sandbox.policy import load_policy
from tests.kube.k8s_schema import Invalid, validate

ACCEPT_ALL = {k: "accepted in this test on purpose" for k in KNOWN_IDS}
SHIPPED = sorted(p.stem for d in profile_dirs()[-1:] for p in d.glob("*.yaml"))
CONFIGS = {
    "defaults": {"accept": ACCEPT_ALL},
    "hardened-cluster": {"accept": ACCEPT_ALL, "user_namespaces": True, "disk_storage_class": "standard-rwo",
                         "egress_proxy": {"cluster_ip": "10.96.0.53"}, "node_selector": {"sandbox.dev/pool": "sandboxes"},
                         "tolerations": [{"key": "sandbox.gke.io/runtime", "operator": "Equal", "value": "gvisor",
                                          "effect": "NoSchedule"}],
                         "image": "registry.example.com/sandbox-runtime:1", "namespace": "agents"},
}


def _by_kind(docs):
    return {d["kind"]: d for d in docs}


def test_shipped_profiles_are_found():
    assert {"default", "gvisor", "worker", "python-packages", "disk-workspace"} <= set(SHIPPED)


@pytest.mark.parametrize("cfg", sorted(CONFIGS))
@pytest.mark.parametrize("profile", SHIPPED)
def test_every_shipped_profile_compiles_to_strictly_valid_manifests(profile, cfg):
    pol = load_policy(profile)
    docs = kc.compile_manifests(pol, config_from_dict(CONFIGS[cfg]))
    assert [d["kind"] for d in docs] == ["SeccompProfile", "SandboxTemplate", "NetworkPolicy", "SandboxWarmPool"]
    for d in docs:
        validate(d)
    validate(kc.claim(pol, config_from_dict(CONFIGS[cfg]), "c-1", "sess_x", "2026-11-30T03:00:00Z"))


def _compiled(profile="default", **cfg):
    return _by_kind(kc.compile_manifests(load_policy(profile), config_from_dict({"accept": ACCEPT_ALL, **cfg})))


# ---- the validator itself must catch mistakes, or the test above proves nothing

@pytest.mark.parametrize("kind,path,bad_key", [
    ("SandboxTemplate", ["spec", "podTemplate", "spec", "containers", 0, "securityContext"], "readOnlyRootFileSystem"),
    ("SandboxTemplate", ["spec", "podTemplate", "spec"], "automountServiceAcountToken"),
    ("SandboxTemplate", ["spec"], "networkPolicies"),
    ("SandboxWarmPool", ["spec"], "replica"),
    ("SeccompProfile", ["spec"], "defaultErrnoRet"),  # SPO has no such field: the API server would drop it
    ("NetworkPolicy", ["spec"], "polcyTypes"),
    ("SandboxTemplate", ["metadata"], "lables"),
])
def test_a_mistyped_field_is_an_error(kind, path, bad_key):
    doc = copy.deepcopy(_compiled()[kind])
    node = doc
    for p in path:
        node = node[p]
    node[bad_key] = node.get("x", True) if bad_key != "defaultErrnoRet" else 1
    with pytest.raises(Invalid, match=bad_key):
        validate(doc)


@pytest.mark.parametrize("kind,path,value", [
    ("SandboxWarmPool", ["spec", "replicas"], "2"),
    ("SandboxTemplate", ["spec", "podTemplate", "spec", "containers", 0, "securityContext", "runAsUser"], "1000"),
    ("SandboxTemplate", ["spec", "podTemplate", "spec", "automountServiceAccountToken"], "false"),
    ("SeccompProfile", ["spec", "syscalls", 0, "names"], "read"),
    ("SeccompProfile", ["spec", "defaultAction"], "SCMP_ACT_DENY"),
    ("NetworkPolicy", ["spec", "egress"], {"to": []}),
    ("SandboxTemplate", ["spec", "networkPolicyManagement"], "Sometimes"),
])
def test_a_wrong_type_or_value_is_an_error(kind, path, value):
    doc = copy.deepcopy(_compiled("python-packages", egress_proxy={"cluster_ip": "10.96.0.53"})[kind])
    node = doc
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    with pytest.raises(Invalid):
        validate(doc)


# ---- what the manifests say

def test_seccomp_profile_is_the_same_filter_the_docker_backend_loads():
    for profile in ("default", "gvisor"):
        pol = load_policy(profile)
        spo = _compiled(profile)["SeccompProfile"]
        oci = sc.to_oci(pol.seccomp_filter())
        assert spo["spec"]["defaultAction"] == oci["defaultAction"] == "SCMP_ACT_ERRNO"
        assert oci.get("defaultErrnoRet") == 1  # EPERM: what runc answers without the field
        assert spo["spec"]["syscalls"] == oci["syscalls"]
        assert spo["kind"] == "SeccompProfile" and "namespace" not in spo["metadata"]  # cluster-scoped in SPO v1
    # gVisor's clone3 adjustment travels too (it is part of the filter the runtime loads)
    names = lambda p: {n for r in _compiled(p)["SeccompProfile"]["spec"]["syscalls"] if r["action"] == "SCMP_ACT_ALLOW"
                       for n in r["names"]}  # noqa: E731
    assert "clone3" in names("gvisor") and "clone3" not in names("default")


def test_seccomp_profile_name_follows_the_policy_digest():
    pol = load_policy("default")
    other = load_policy("tests/kube/fixtures/profiles/tmpfs-exec.yaml")
    assert kc.seccomp_profile_name(pol) != kc.seccomp_profile_name(other)
    tpl = _compiled()["SandboxTemplate"]
    ref = tpl["spec"]["podTemplate"]["spec"]["securityContext"]["seccompProfile"]
    assert ref == {"type": "Localhost", "localhostProfile": f"operator/{kc.seccomp_profile_name(pol)}.json"}


def test_template_pod_is_hardened_like_the_docker_sandbox():
    pol = load_policy("worker")
    spec = _compiled("worker")["SandboxTemplate"]["spec"]["podTemplate"]["spec"]
    assert spec["automountServiceAccountToken"] is False and spec["enableServiceLinks"] is False
    assert not spec["hostNetwork"] and not spec["hostPID"] and not spec["hostIPC"]
    (c,) = spec["containers"]
    sc_ = c["securityContext"]
    assert sc_["runAsNonRoot"] is True and sc_["runAsUser"] > 0 and sc_["runAsGroup"] > 0
    assert sc_["allowPrivilegeEscalation"] is False and sc_["privileged"] is False
    assert sc_["readOnlyRootFilesystem"] is True and sc_["capabilities"] == {"drop": ["ALL"]}
    assert sc_["seccompProfile"]["type"] == "Localhost"
    assert c["resources"]["limits"] == c["resources"]["requests"] == {"cpu": "2000m", "memory": "1024Mi"}
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["workspace"]["emptyDir"] == {"medium": "Memory", "sizeLimit": f"{pol.workspace.size_mb}Mi"}
    assert vols["tmpfs-0"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "128Mi"}
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/workspace", "/tmp", "/dev/shm", "/mnt/skills"}
    assert not c["stdin"]  # the agent never reads the container's stdin, nor writes its stdout
    assert "runtimeClassName" not in spec  # runc: the node's default runtime
    env = {e["name"] for e in c["env"]}
    assert not any(n.startswith("ANTHROPIC") for n in env), "no key ever enters a sandbox pod"


def test_runsc_policy_gets_the_runtime_class():
    spec = _compiled("gvisor", runtime_class="gvisor")["SandboxTemplate"]["spec"]["podTemplate"]["spec"]
    assert spec["runtimeClassName"] == "gvisor"


def test_no_egress_policy_denies_all_traffic_both_ways():
    d = _compiled("default")
    # present and empty: the controller's allow-public-egress default never applies
    assert d["SandboxTemplate"]["spec"]["networkPolicy"] == {}
    assert d["SandboxTemplate"]["spec"]["networkPolicyManagement"] == "Managed"
    np = d["NetworkPolicy"]["spec"]
    assert np["policyTypes"] == ["Ingress", "Egress"] and np["ingress"] == [] and np["egress"] == []
    assert np["podSelector"]["matchLabels"] == {kc.LABEL_TEMPLATE: "sandbox-default"}
    labels = d["SandboxTemplate"]["spec"]["podTemplate"]["metadata"]["labels"]
    assert labels[kc.LABEL_TEMPLATE] == "sandbox-default"  # the standalone policy selects the template's pods


def test_egress_policy_allows_the_proxy_pods_only():
    d = _compiled("python-packages", egress_proxy={"cluster_ip": "10.96.0.53", "port": 3128})
    (rule,) = d["NetworkPolicy"]["spec"]["egress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 3128}]
    assert rule["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "sandboxes"}},
                           "podSelector": {"matchLabels": {"app.kubernetes.io/name": "sandbox-egress"}}}]
    assert d["SandboxTemplate"]["spec"]["networkPolicy"]["egress"] == [rule]
    env = {e["name"]: e["value"] for e in d["SandboxTemplate"]["spec"]["podTemplate"]["spec"]["containers"][0]["env"]}
    assert env["HTTPS_PROXY"] == "http://10.96.0.53:3128"


def test_auto_uid_is_a_fixed_nonroot_uid_per_template_from_the_range():
    cfg = {"uid_range": [30000, 30099]}
    a = _compiled("default", **cfg)["SandboxTemplate"]["spec"]["podTemplate"]["spec"]["securityContext"]
    b = _compiled("default", **cfg)["SandboxTemplate"]["spec"]["podTemplate"]["spec"]["securityContext"]
    assert a["runAsUser"] == b["runAsUser"] and 30000 <= a["runAsUser"] <= 30099 and a["fsGroup"] == a["runAsGroup"]
    pinned = _compiled("tests/kube/fixtures/profiles/pinned-uid.yaml")["SandboxTemplate"]["spec"]["podTemplate"]["spec"]
    assert (pinned["securityContext"]["runAsUser"], pinned["securityContext"]["runAsGroup"]) == (4242, 4343)


def test_user_namespaces_sets_host_users_false():
    spec = _compiled("default", user_namespaces=True)["SandboxTemplate"]["spec"]["podTemplate"]["spec"]
    assert spec["hostUsers"] is False


def test_claim_expires_and_is_deleted_by_the_controller():
    pol = load_policy("default")
    c = kc.claim(pol, config_from_dict({}), "c-1", "sess_1", "2026-11-30T03:00:00Z")
    assert c["spec"]["lifecycle"] == {"shutdownTime": "2026-11-30T03:00:00Z", "shutdownPolicy": "Delete"}
    assert c["spec"]["warmPoolRef"] == {"name": "sandbox-default"} and "env" not in c["spec"]


def test_agent_launcher_sets_hard_rlimits_then_execs_the_agent():
    pol = load_policy("gvisor")
    argv = kc.agent_command(pol)
    code = argv[-1]
    assert argv[:4] == ["/usr/bin/python3", "-I", "-S", "-c"]
    compile(code, "launcher", "exec")
    assert f"(r.RLIMIT_NPROC,{pol.rlimits.nproc})" in code and "(r.RLIMIT_CORE,0)" in code
    assert "r.setrlimit(k,(v,v))" in code and "/opt/sandbox-agent/agent.py" in code


# ---- the CLI

def _cfg_file(tmp_path: Path, data: dict) -> str:
    p = tmp_path / "kube.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def test_cli_compile_prints_manifests_that_validate(tmp_path):
    r = CliRunner().invoke(main, ["policy", "compile", "gvisor", "--target", "kubernetes", "--namespace", "agents",
                                  "--config", _cfg_file(tmp_path, {"accept": ACCEPT_ALL})])
    assert r.exit_code == 0, r.output
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    assert [d["kind"] for d in docs] == ["SeccompProfile", "SandboxTemplate", "NetworkPolicy", "SandboxWarmPool"]
    for d in docs:
        validate(d)
    assert docs[1]["metadata"]["namespace"] == "agents"


def test_cli_compile_refuses_unaccepted_degradations_and_names_them(tmp_path):
    accept = dict(ACCEPT_ALL)
    del accept["limits.pids"]
    r = CliRunner().invoke(main, ["policy", "compile", "default", "--target", "kubernetes",
                                  "--config", _cfg_file(tmp_path, {"accept": accept})])
    assert r.exit_code == 2
    assert "limits.pids" in r.stderr and "rlimits:" not in r.stderr and "apiVersion" not in r.stdout


def test_cli_config_errors_name_file_and_key(tmp_path):
    f = _cfg_file(tmp_path, {"namspace": "x"})
    r = CliRunner().invoke(main, ["policy", "compile", "default", "--target", "kubernetes", "--config", f])
    assert r.exit_code == 2 and f"{f}: namspace: unknown key" in r.stderr


def test_cli_explain_lists_degradations_with_workarounds(tmp_path):
    r = CliRunner().invoke(main, ["policy", "explain", "python-packages", "--target", "kubernetes", "--json",
                                  "--config", _cfg_file(tmp_path, {"accept": {"rlimits": "the launcher sets them"}})])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["compiles"] is False
    by_id = {d["id"]: d for d in doc["degradations"]}
    assert {"limits.pids", "rlimits", "network.dns"} <= set(by_id)
    assert by_id["rlimits"]["accepted"] == "the launcher sets them" and by_id["limits.pids"]["accepted"] == ""
    assert all(d["workaround"] and d["lost"] for d in doc["degradations"])


def test_a_pod_with_egress_gets_the_same_proxy_and_ca_variables_as_a_docker_sandbox():
    from sandbox import spec as specmod
    from sandbox.egress.manager import CA_ENV_VARS

    cfg = config_from_dict({"accept": ACCEPT_ALL, "egress_proxy": {"cluster_ip": "10.96.0.53"}})
    pol = load_policy("python-packages")
    spec = kc.pod_spec(pol, cfg)
    (c,) = spec["containers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    docker = specmod.sandbox_env(pol, egress=True)
    assert set(env) == set(docker), set(env) ^ set(docker)
    bundle = f"{specmod.EGRESS_MOUNT}/ca-bundle.pem"
    assert CA_ENV_VARS and all(env[k] == docker[k] == bundle for k in CA_ENV_VARS)
    assert all(env[k] == "http://10.96.0.53:3128" for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy",
                                                             "ALL_PROXY"))
    # the bundle's directory is a small memory volume of the pod (the root filesystem is read-only)
    (mnt,) = [m for m in c["volumeMounts"] if m["mountPath"] == specmod.EGRESS_MOUNT]
    (vol,) = [v for v in spec["volumes"] if v["name"] == mnt["name"]]
    assert vol["emptyDir"]["medium"] == "Memory" and c["securityContext"]["readOnlyRootFilesystem"] is True
    # without egress: no proxy, no CA variables, no egress volume
    bare = kc.pod_spec(load_policy("default"), cfg)
    bare_env = {e["name"] for e in bare["containers"][0]["env"]}
    assert not bare_env & (set(CA_ENV_VARS) | {"HTTP_PROXY", "HTTPS_PROXY"})
    assert all(m["mountPath"] != specmod.EGRESS_MOUNT for m in bare["containers"][0]["volumeMounts"])
