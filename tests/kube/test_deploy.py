"""deploy/kubernetes: every manifest validates strictly; the key reaches the worker pod only, as a
file; the worker's permissions are namespaced and least-privilege; the shipped backend
configuration compiles the worker's cluster policy and refuses what it does not accept."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sandbox.kube import compiler as kc
from sandbox.kube import degradations as dg
from sandbox.kube.config import config_from_dict
from sandbox.policy import load_policy
from tests.kube.k8s_schema import validate

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
FILES = sorted(p.name for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def _all() -> list[dict]:
    return [d for f in FILES for d in _docs(f)]


@pytest.mark.parametrize("name", FILES)
def test_deploy_manifests_validate_strictly(name):
    for d in _docs(name):
        validate(d)


def test_kustomization_names_existing_files():
    k = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert all((DEPLOY / r).is_file() for r in k["resources"])
    assert set(k["resources"]) == set(FILES) - {"rbac-doctor.yaml"}  # the proxy's cluster mode included


def test_environment_key_reaches_the_worker_pod_only_the_admin_token_the_worker_and_proxy_only_and_the_admin_tls_key_the_proxy_only():
    users: dict[str, set[str]] = {}
    config_users: dict[str, set[str]] = {}
    for d in _all():
        if d["kind"] != "Deployment":
            continue
        spec = d["spec"]["template"]["spec"]
        for v in spec.get("volumes", []):
            if v.get("configMap"):
                config_users.setdefault(v["configMap"]["name"], set()).add(d["metadata"]["name"])
            if v.get("secret"):
                users.setdefault(v["secret"]["secretName"], set()).add(d["metadata"]["name"])
                # mounted read-only wherever it is mounted, never world-readable
                assert v["secret"]["defaultMode"] & 0o007 == 0
                for c in spec.get("containers", []) + spec.get("initContainers", []):
                    for m in c.get("volumeMounts", []):
                        if m["name"] == v["name"]:
                            assert m.get("readOnly") is True, (d["metadata"]["name"], m)
        # no Secret at all in the sandboxes' namespace: it lives next to the worker
        assert d["metadata"]["namespace"] == "sandbox-system"
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            for e in c.get("env", []):
                assert "valueFrom" not in e or "secretKeyRef" not in e["valueFrom"], "no secret in an env var"
                assert not e["name"].startswith("ANTHROPIC"), e
            assert not any("secretRef" in f for f in c.get("envFrom", []))
    assert users == {"sandbox-environment-key": {"sandbox-worker"},
                     "sandbox-egress-admin": {"sandbox-worker", "sandbox-egress"},
                     "sandbox-egress-admin-tls": {"sandbox-egress"},  # the admin endpoint's key: the proxy only
                     "sandbox-egress-credentials": {"sandbox-egress"}}  # the injected values: the proxy only
    # ConfigMaps hold nothing secret: the backend configuration, the worker's settings, and the
    # public CA the worker verifies the proxy replicas' admin certificate with
    assert config_users == {"sandbox-backend": {"sandbox-worker"}, "sandbox-egress-admin-ca": {"sandbox-worker"}}
    # and the compiled sandbox templates never mount a secret or carry a token, and reach only the
    # proxy port (never the admin port where addresses are registered)
    cfg = config_from_dict(yaml.safe_load(_docs("backend-config.yaml")[0]["data"]["kube.yaml"]))
    for prof in ("gvisor", "python-packages"):
        pol = load_policy(prof)
        tpl = kc.sandbox_template(pol, cfg)["spec"]["podTemplate"]["spec"]
        assert tpl["automountServiceAccountToken"] is False and not any("secret" in v for v in tpl["volumes"])
        ports = {p["port"] for r in kc.network_rules(pol, cfg)["egress"] for p in r["ports"]}
        assert cfg.egress_proxy.admin_port not in ports and ports <= {cfg.egress_proxy.port}


def test_worker_rbac_is_namespaced_and_least_privilege():
    docs = _docs("rbac.yaml")
    kinds = [d["kind"] for d in docs]
    assert "ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds
    (role,) = [d for d in docs if d["kind"] == "Role"]
    assert role["metadata"]["namespace"] == "sandboxes"
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert ("extensions.agents.x-k8s.io", "sandboxclaims", "create") in granted
    assert ("", "pods/exec", "create") in granted
    assert not {r for _, r, _ in granted} & {"secrets", "configmaps", "serviceaccounts", "roles", "rolebindings",
                                             "sandboxtemplates/status", "pods/ephemeralcontainers"}
    assert not any(v in ("*", "escalate", "bind", "impersonate") or r == "*" for _, r, v in granted)
    assert ("", "pods", "create") not in granted and ("", "pods", "delete") not in granted
    # the doctor's extra rights are read-only and by name
    for rule in next(d for d in _docs("rbac-doctor.yaml") if d["kind"] == "ClusterRole")["rules"]:
        assert rule["verbs"] == ["get"] and rule["resourceNames"]


def test_shipped_backend_configuration_compiles_the_worker_cluster_policy(tmp_path):
    data = _docs("backend-config.yaml")[0]["data"]
    cfg = config_from_dict(yaml.safe_load(data["kube.yaml"]), source="deploy/kubernetes/backend-config.yaml")
    prof = tmp_path / "worker-gvisor.yaml"
    prof.write_text(data["worker-gvisor.yaml"])
    pol = load_policy(str(prof))
    for d in kc.compile_manifests(pol, cfg):
        validate(d)
    # the same configuration refuses the runc worker profile: its per-uid limits would be shared
    with pytest.raises(dg.KubeRefused) as e:
        kc.compile_manifests(load_policy("worker"), cfg)
    assert sorted(k for k, _ in e.value.problems) == ["identity.shared_uid", "proc.masked_paths"]


def test_proxy_service_address_matches_the_backend_configuration():
    data = _docs("backend-config.yaml")[0]["data"]
    cfg = config_from_dict(yaml.safe_load(data["kube.yaml"]))
    svc = next(d for d in _docs("proxy.yaml") if d["kind"] == "Service")
    dep = next(d for d in _docs("proxy.yaml") if d["kind"] == "Deployment")
    assert svc["spec"]["clusterIP"] == cfg.egress_proxy.cluster_ip
    assert svc["metadata"]["namespace"] == cfg.egress_proxy.namespace
    assert dep["spec"]["template"]["metadata"]["labels"] == cfg.egress_proxy.pod_labels
    assert cfg.egress_proxy.port in {p["targetPort"] for p in svc["spec"]["ports"]}
    assert cfg.egress_proxy.admin_port in {p["targetPort"] for p in svc["spec"]["ports"]}
    assert cfg.egress_proxy.admin_base_url() == f"https://{svc['spec']['clusterIP']}:{cfg.egress_proxy.admin_port}"


def test_the_proxy_deployment_runs_the_cluster_mode_with_the_token_the_worker_uses(tmp_path):
    from sandbox.egress.cluster import parser

    data = _docs("backend-config.yaml")[0]["data"]
    cfg = config_from_dict(yaml.safe_load(data["kube.yaml"]))
    dep = next(d for d in _docs("proxy.yaml") if d["kind"] == "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["command"][:3] == ["/opt/sandbox/bin/python", "-m", "sandbox.egress.cluster"]
    args = parser().parse_args(c["command"][3:])  # the flags the module takes
    assert args.listen.endswith(f":{cfg.egress_proxy.port}") and args.admin_listen.endswith(f":{cfg.egress_proxy.admin_port}")
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert str(Path(args.token_file).parent) in mounts
    worker = next(d for d in _docs("worker.yaml") if d["kind"] == "Deployment")
    wmounts = {m["mountPath"] for m in worker["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert str(Path(cfg.egress_proxy.admin_token_file).parent) in wmounts
    assert c["readinessProbe"]["httpGet"]["port"] == cfg.egress_proxy.admin_port


def _proxy_pod() -> dict:
    return next(d for d in _docs("proxy.yaml") if d["kind"] == "Deployment")["spec"]["template"]["spec"]


def test_the_proxy_reads_injected_credentials_from_the_copied_secret_through_flags_it_accepts():
    from sandbox.egress.cluster import parser

    spec = _proxy_pod()
    proxy = next(c for c in spec["containers"] if c["name"] == "proxy")
    cmd = proxy["command"]
    args = parser().parse_args(cmd[cmd.index("sandbox.egress.cluster") + 1:])
    mounts = {m["mountPath"]: m for m in proxy["volumeMounts"]}
    assert args.credential_dir == [args.credential_env_dir] and not args.allow_credential_commands
    m = mounts[args.credential_env_dir]
    assert m["readOnly"] is True and m["name"] == "credentials"
    vol = {v["name"]: v for v in spec["volumes"]}
    assert vol["credentials"]["emptyDir"]["medium"] == "Memory"  # never on a node's disk
    assert vol["credentials-secret"]["secret"]["optional"] is True  # no Secret: the proxy still starts
    assert not any(m["name"] == "credentials-secret" for m in proxy["volumeMounts"])  # the copy step's only


def test_the_proxy_credential_copy_step_copies_a_secret_volumes_keys_0600_and_tolerates_no_secret(tmp_path: Path):
    """The init container's shell line, run here on a directory laid out as the kubelet lays out a
    Secret volume (KEY -> ..data/KEY, ..data -> ..<timestamp>): regular files, mode 0600, no dot entries."""
    import subprocess

    init = next(c for c in _proxy_pod()["initContainers"] if c["name"] == "credentials")
    line = init["command"][2]
    src, dst = tmp_path / "secret-in", tmp_path / "out"
    for case in ("with-secret", "no-secret"):
        for d in (src, dst):
            subprocess.run(["rm", "-rf", str(d)], check=True)
            d.mkdir()
        if case == "with-secret":
            (src / "..2026_11_30").mkdir()
            (src / "..2026_11_30" / "GITHUB_TOKEN").write_text("v1\n")
            (src / "..2026_11_30" / "github").write_text("v2\n")
            (src / "..data").symlink_to("..2026_11_30")
            for k in ("GITHUB_TOKEN", "github"):
                (src / k).symlink_to(f"..data/{k}")
        ours = line.replace("/run/secret-in", str(src)).replace("/run/sandbox-egress-credentials", str(dst))
        r = subprocess.run(["/bin/sh", "-c", ours], capture_output=True, text=True, check=False)
        assert r.returncode == 0, (case, r.stderr)
        got = {p.name: (p.is_symlink(), oct(p.stat().st_mode & 0o777), p.read_text()) for p in dst.iterdir()}
        expected = {"GITHUB_TOKEN": (False, "0o600", "v1\n"), "github": (False, "0o600", "v2\n")}
        assert got == (expected if case == "with-secret" else {}), case


def _worker_container() -> tuple[dict, dict]:
    spec = next(d for d in _docs("worker.yaml") if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    return spec, next(c for c in spec["containers"] if c["name"] == "worker")


def test_the_worker_probes_exec_the_probe_module_on_the_workers_own_metrics_port_with_room_to_start_and_drain():
    from sandbox.kube.probe import main as probe_main  # noqa: F401 - the module the probes run exists
    from sandbox.worker.worker import WorkerConfig

    spec, c = _worker_container()
    port = c["command"][c["command"].index("--metrics-port") + 1]
    kinds = {}
    for name in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = c[name]
        cmd = probe["exec"]["command"]
        assert cmd[:3] == ["/opt/sandbox/bin/python", "-m", "sandbox.kube.probe"], cmd
        assert cmd[cmd.index("--port") + 1] == port, "the probe must ask the port the worker serves /healthz on"
        assert probe["timeoutSeconds"] > 3  # the probe's own HTTP timeout is 3 s
        kinds[name] = cmd[3]
    assert kinds == {"startupProbe": "live", "livenessProbe": "live", "readinessProbe": "ready"}
    s = c["startupProbe"]
    assert s["periodSeconds"] * s["failureThreshold"] >= 300, "the start-up canaries claim a pod first"
    # SIGTERM: the drain (in-flight calls, then hand-back) fits in the grace period
    assert spec["terminationGracePeriodSeconds"] >= WorkerConfig.__dataclass_fields__["drain_timeout"].default + 15 + 30


@pytest.fixture
def health_server():
    from sandbox.worker.metrics import HealthServer, WorkerMetrics

    state: dict = {"status": "ok", "reasons": [], "sessions": 0, "max_sessions": 2}
    srv = HealthServer(WorkerMetrics(), lambda: dict(state), 0)
    srv.start()
    yield srv, state
    srv.stop()


def test_liveness_holds_at_the_session_limit_and_while_draining_readiness_does_not_and_a_dead_worker_fails_both(
        health_server):
    """The probe commands of worker.yaml, run as written (the image's python replaced by this one,
    the port by the test server's), against the worker's real health server."""
    import subprocess
    import sys

    srv, state = health_server
    _, c = _worker_container()

    def run(name: str) -> tuple[int, str]:
        cmd = list(c[name]["exec"]["command"])
        cmd[0] = sys.executable
        cmd[cmd.index("--port") + 1] = str(srv.port)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        return r.returncode, r.stdout.strip()

    assert run("livenessProbe")[0] == 0 and run("readinessProbe") == (0, "ready: status ok, sessions 0/2")
    state.update(status="degraded", reasons=["at_session_limit"], sessions=2)
    assert run("livenessProbe") == (0, "alive: status degraded (at_session_limit), sessions 2/2")
    assert run("readinessProbe") == (1, "not ready: status degraded (at_session_limit), sessions 2/2")
    state.update(status="stopping", reasons=[], sessions=1)
    assert run("livenessProbe")[0] == 0 and run("readinessProbe")[0] == 1
    state.update(status="degraded", reasons=["circuit_open"], sessions=0)
    assert run("startupProbe")[0] == 0 and run("readinessProbe")[0] == 1
    # the event loop stuck while the health thread answers: neither alive nor ready past the threshold
    state.update(status="ok", reasons=[], loop_beat_age_s=600.0)
    for name in ("livenessProbe", "readinessProbe"):
        code, out = run(name)
        assert code == 1 and out.startswith("stalled: the worker's event loop has not run for 600s"), (name, out)
    state.update(loop_beat_age_s=0.4)
    assert run("livenessProbe")[0] == 0 and run("readinessProbe")[0] == 0
    srv.stop()  # the worker is gone (or its health server is)
    for name in ("startupProbe", "livenessProbe", "readinessProbe"):
        code, out = run(name)
        assert code == 1 and "no answer from the worker's health endpoint" in out, (name, out)


def test_a_probe_refuses_an_answer_that_is_not_the_workers_health_state():
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from sandbox.kube.probe import check

    class Other(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html>something else on the port</html>")

        def log_message(self, *a: object) -> None:
            return

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Other)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        for kind in ("live", "ready"):
            ok, why = check(kind, srv.server_address[1])
            assert not ok and "without the worker's health state" in why
    finally:
        srv.shutdown()
        srv.server_close()


def test_the_worker_pod_serves_metrics_on_its_declared_port_to_prometheus_with_options_the_worker_accepts():
    """Prometheus scrapes pod IPs: the Deployment binds /metrics beyond loopback (asked for by name),
    declares that port, and its scrape annotations name it; the command parses as the worker's CLI."""
    import ipaddress

    from sandbox.worker.cli import worker_cmd

    spec, c = _worker_container()
    cmd = c["command"]
    port, host = cmd[cmd.index("--metrics-port") + 1], cmd[cmd.index("--metrics-host") + 1]
    assert not ipaddress.ip_address(host).is_loopback
    assert {"name": "metrics", "containerPort": int(port)} in c["ports"]
    meta = next(d for d in _docs("worker.yaml") if d["kind"] == "Deployment")["spec"]["template"]["metadata"]
    assert meta["annotations"]["prometheus.io/port"] == port and meta["annotations"]["prometheus.io/scrape"] == "true"
    args = [a.replace("$(SANDBOX_CONTROL_PLANE_URL)", "https://cp.example").replace("$(SANDBOX_ENVIRONMENT_ID)", "env_x")
            for a in cmd[2:]]
    ctx = worker_cmd.make_context("worker", args)
    assert ctx.params["metrics_host"] == host and ctx.params["metrics_port"] == int(port)


def test_only_the_scraper_may_connect_to_the_worker_and_only_on_its_metrics_port():
    """/metrics has no authentication and listens on the pod's IP: the worker's NetworkPolicy admits
    the scraper's namespace on that port and nothing else, and leaves the worker's own connections alone."""
    (pol,) = [d for d in _docs("worker-netpol.yaml") if d["kind"] == "NetworkPolicy"]
    _, c = _worker_container()
    port = int(c["command"][c["command"].index("--metrics-port") + 1])
    worker = next(d for d in _docs("worker.yaml") if d["kind"] == "Deployment")
    assert pol["metadata"]["namespace"] == worker["metadata"]["namespace"]
    assert pol["spec"]["podSelector"]["matchLabels"].items() <= worker["spec"]["template"]["metadata"]["labels"].items()
    assert pol["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = pol["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": port}]
    assert [list(f) for f in rule["from"]] == [["namespaceSelector"]] and rule["from"][0]["namespaceSelector"]["matchLabels"]


def _mount_source(spec: dict, container: dict, path: str) -> tuple[dict, str]:
    """The volume a file path in a container comes from, and the file's name in that volume."""
    for m in container["volumeMounts"]:
        if path.startswith(m["mountPath"].rstrip("/") + "/"):
            vol = next(v for v in spec["volumes"] if v["name"] == m["name"])
            return vol | {"_mount": m}, path[len(m["mountPath"].rstrip("/")) + 1:]
    raise AssertionError(f"{path} is on no volume the {container['name']} container mounts")


def test_the_admin_channel_is_tls_by_default_with_the_material_the_admin_tls_command_makes_wired_end_to_end(tmp_path):
    """One consistent chain: the Secret and ConfigMap that `sandbox kube admin-tls` tells the operator
    to create are the ones mounted; the proxy's --admin-tls-cert/--admin-tls-key name files of the
    Secret (the keys `kubectl create secret tls` makes), mounted read-only into the proxy only; the
    worker's admin_tls_ca_file is the ConfigMap's key where the worker mounts it; admin_tls_name is
    the name the certificate is made for; the admin URLs are https; the probe speaks HTTPS."""
    import json
    import shlex

    from click.testing import CliRunner

    from sandbox.cli import main
    from sandbox.egress.cluster import ClusterEgressClient, parser

    res = CliRunner().invoke(main, ["kube", "admin-tls", str(tmp_path / "m"), "--json"])
    assert res.exit_code == 0, res.output
    made = json.loads(res.output)
    secret_cmd, cm_cmd = (shlex.split(c) for c in made["commands"])
    assert secret_cmd[:6] == ["kubectl", "-n", "sandbox-system", "create", "secret", "tls"]
    secret_name, cm_name = secret_cmd[6], cm_cmd[5]
    assert cm_cmd[:5] == ["kubectl", "-n", "sandbox-system", "create", "configmap"]
    assert f"--cert={made['cert']}" in secret_cmd and f"--key={made['key']}" in secret_cmd
    (from_file,) = [a for a in cm_cmd if a.startswith("--from-file=")]
    cm_key, _, cm_src = from_file.removeprefix("--from-file=").partition("=")
    assert cm_src == made["ca"]

    cfg = config_from_dict(yaml.safe_load(_docs("backend-config.yaml")[0]["data"]["kube.yaml"])).egress_proxy
    # the proxy: serves the admin port with the Secret's tls.crt/tls.key, mounted here read-only
    dep = next(d for d in _docs("proxy.yaml") if d["kind"] == "Deployment")
    assert dep["metadata"]["namespace"] == "sandbox-system"
    spec = dep["spec"]["template"]["spec"]
    proxy = next(c for c in spec["containers"] if c["name"] == "proxy")
    cmd = proxy["command"]
    args = parser().parse_args(cmd[cmd.index("sandbox.egress.cluster") + 1:])
    for path, key in ((args.admin_tls_cert, "tls.crt"), (args.admin_tls_key, "tls.key")):
        vol, name = _mount_source(spec, proxy, path)
        assert vol["secret"]["secretName"] == secret_name and name == key, (path, vol)
        assert vol["_mount"]["readOnly"] is True and vol["secret"]["defaultMode"] & 0o007 == 0
        assert "optional" not in vol["secret"]  # no Secret: the pod does not start (never plain HTTP instead)
    probe = proxy["readinessProbe"]["httpGet"]
    assert probe["scheme"] == "HTTPS" and probe["port"] == cfg.admin_port and args.admin_listen.endswith(f":{probe['port']}")
    # the worker: verifies against the ConfigMap's CA, for the name the certificate carries, over https
    wspec, worker = _worker_container()
    vol, name = _mount_source(wspec, worker, cfg.admin_tls_ca_file)
    assert vol["configMap"]["name"] == cm_name and name == cm_key and vol["_mount"]["readOnly"] is True
    assert cfg.admin_tls_name == made["name"] == "sandbox-egress-admin"
    assert not cfg.allow_plain_admin and cfg.plain_admin_refusal() is None
    assert cfg.admin_base_url().startswith("https://") and cfg.admin_dns
    token = tmp_path / "token"
    token.write_text("t" * 40)
    client = ClusterEgressClient.from_config(cfg.model_copy(update={
        "admin_token_file": str(token), "admin_tls_ca_file": made["ca"], "admin_dns": "localhost"}))
    assert client.endpoints() and all(u.startswith("https://") for u in client.endpoints())
    # and without the CA the same configuration is refused, not used in clear
    plain = cfg.model_copy(update={"admin_tls_ca_file": None, "admin_token_file": str(token)})
    with pytest.raises(Exception, match="egress_proxy.admin_dns: .* plain HTTP beyond loopback"):
        ClusterEgressClient.from_config(plain)
