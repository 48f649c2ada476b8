"""Checks of what the Kubernetes backend relies on, through the API (no pod is started here).

CRDs (agent-sandbox's, served at v1beta1; security-profiles-operator's SeccompProfile at v1), the
RuntimeClass for runsc policies, the namespace's Pod Security level (``restricted`` as a
server-side floor), and the worker's own permissions (SelfSubjectAccessReview). Whether the
network plugin enforces NetworkPolicy cannot be read from the API: only a canary pod proves it,
so without canaries that row is a warning.

With a profile (``sandbox doctor --backend kubernetes``, and the worker before it serves), the
attack canaries then run in a real cluster sandbox claimed through the backend
(:func:`run_cluster_canaries`): the same probes as on Docker except the two a pod cannot pass by
construction (it has an interface and a default route: the ``network.interface`` degradation),
and in their place the proof that matters there: connections from inside the pod to
``canary_targets`` (a public address, the metadata service; add the API server) must all fail.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from sandbox.audit.model import CheckResult
from sandbox.doctor import Check
from sandbox.kube import compiler as kc

CRDS = {
    "sandboxtemplates.extensions.agents.x-k8s.io": kc.SANDBOX_VERSION,
    "sandboxwarmpools.extensions.agents.x-k8s.io": kc.SANDBOX_VERSION,
    "sandboxclaims.extensions.agents.x-k8s.io": kc.SANDBOX_VERSION,
    "seccompprofiles.security-profiles-operator.x-k8s.io": "v1",
}
PERMISSIONS = (  # (verb, group, resource, subresource)
    ("create", kc.SANDBOX_GROUP, "sandboxclaims", ""),
    ("delete", kc.SANDBOX_GROUP, "sandboxclaims", ""),
    ("watch", kc.SANDBOX_GROUP, "sandboxclaims", ""),
    ("list", "", "pods", ""),
    ("create", "", "pods", "exec"),
)


def _status(e: Exception) -> str:
    return f"{getattr(e, 'status', '')} {getattr(e, 'reason', '') or e}".strip()


# The Docker canaries minus the two a pod fails by construction (its interface and default route).
POD_EXEMPT = ("inside.no_route", "inside.metadata")
CONNECT_SOURCE = (
    "import json,socket,sys\n"
    "out={}\n"
    "for t in json.loads(sys.argv[1]):\n"
    " h,_,p=t.rpartition(':')\n"
    " try:\n"
    "  socket.create_connection((h.strip('[]'),int(p)),3).close();out[t]='connected'\n"
    " except OSError as e:\n"
    "  out[t]=type(e).__name__\n"
    "print('CANARY-CONNECT '+json.dumps(out))\n"
)
CONNECT_ID = "cluster.networkpolicy_enforced"


def run_cluster_canaries(backend: Any, policy: Any, *, timeout: float | None = None) -> list[CheckResult]:
    """The canaries in a sandbox claimed through ``backend`` (then deleted); one row per canary."""
    from sandbox.audit import checks as chk
    from sandbox.audit.catalog import result
    from sandbox.audit.runner import parse_probe_output, probe_argv, probe_config
    from sandbox.audit.selftest import CANARY_IDS, CANARY_PROBES, CANARY_SYSCALLS, CANARY_TIMEOUT_S
    from sandbox.audit.syscalls import sample_table

    ids = tuple(i for i in CANARY_IDS if i not in POD_EXEMPT)
    targets = list(backend.config.canary_targets)
    sb = backend.create(policy, session_id=f"selftest_{uuid.uuid4().hex[:10]}")
    try:
        cfg = probe_config(CANARY_PROBES)
        cfg["syscalls"] = sample_table(list(CANARY_SYSCALLS))
        res = sb.exec(probe_argv(cfg), timeout=timeout or CANARY_TIMEOUT_S)
        net = sb.exec(["python3", "-I", "-S", "-c", CONNECT_SOURCE, json.dumps(targets)], timeout=60)
    finally:
        sb.destroy()
    probe = parse_probe_output(res.stdout)
    if probe is None:
        why = f"no probe output (exit {res.exit_code}{', ' + res.error[:120] if res.error else ''})"
        rows = [result(i, "fail", why) for i in ids]
    else:
        rows = [result(r.id, "fail", r.observed) if r.status == "skip" else r
                for r in chk.evaluate_inside(probe, chk.Expectations.from_policy(policy), only=ids)]
    line = next((ln for ln in net.stdout.decode("utf-8", "replace").splitlines() if ln.startswith("CANARY-CONNECT ")), "")
    try:
        seen = {str(k): str(v)[:40] for k, v in json.loads(line.split(" ", 1)[1]).items()} if line else {}
    except ValueError:
        seen = {}
    reached = [t for t, v in seen.items() if v == "connected"]
    if not seen or set(seen) != set(targets):
        row = _row("fail", "critical", f"the connection canary gave no result (exit {net.exit_code})")
    elif reached:
        row = _row("fail", "critical", f"a sandbox pod connected to {', '.join(reached)}: the network plugin "
                                       "does not enforce the template's NetworkPolicy")
    else:
        row = _row("pass", "critical", "from inside a sandbox pod: " + ", ".join(f"{t} {v}" for t, v in seen.items()))
    return [*rows, row]


def _row(status: Any, severity: Any, observed: str) -> CheckResult:
    return CheckResult(CONNECT_ID, "NetworkPolicy enforced", status, "every connection from a sandbox pod to "
                       "anything but the egress proxy fails", observed, severity, "inside")


def require_cluster_canaries(backend: Any, policy: Any) -> list[CheckResult]:
    """Raise :class:`sandbox.audit.selftest.SelfTestFailed` naming every failing canary (fail closed,
    as on Docker: a canary that could not run did not pass)."""
    from sandbox.audit.selftest import require_rows

    return require_rows(lambda: run_cluster_canaries(backend, policy), policy, " in a cluster sandbox")


def run_checks(backend: Any, profile: str | None = None) -> list[Check]:
    """The API checks; with ``profile``, and none of them failing, the canaries in a cluster sandbox."""
    from kubernetes import client

    api = backend.api_client
    ns = backend.config.namespace
    out: list[Check] = []
    ext = client.ApiextensionsV1Api(api)
    for name, version in CRDS.items():
        try:
            crd = api.sanitize_for_serialization(ext.read_custom_resource_definition(name))
            served = [v["name"] for v in crd["spec"]["versions"] if v.get("served")]
            out.append(Check(f"crd {name}", "ok" if version in served else "fail", f"served: {', '.join(served)}",
                             "" if version in served else f"install a release serving {version}"))
        except Exception as e:  # noqa: BLE001 - each check reports for itself
            out.append(Check(f"crd {name}", "fail", f"cannot read it: {_status(e)}",
                             "install agent-sandbox (with extensions) and security-profiles-operator"))
    rc = backend.config.runtime_class
    try:
        obj = api.sanitize_for_serialization(client.NodeV1Api(api).read_runtime_class(rc))
        out.append(Check(f"runtimeclass {rc}", "ok", f"handler {obj.get('handler')}"))
    except Exception as e:  # noqa: BLE001
        out.append(Check(f"runtimeclass {rc}", "fail", f"cannot read it: {_status(e)}",
                         "install gVisor on a node pool (kind: containerd runsc handler; GKE: Sandbox node pool)"))
    try:
        labels = (api.sanitize_for_serialization(client.CoreV1Api(api).read_namespace(ns)).get("metadata") or {}).get("labels") or {}
        level = labels.get("pod-security.kubernetes.io/enforce", "")
        out.append(Check(f"namespace {ns} pod security", "ok" if level == "restricted" else "warn",
                         f"enforce={level or 'unset'}",
                         "" if level == "restricted" else
                         f"kubectl label ns {ns} pod-security.kubernetes.io/enforce=restricted"))
    except Exception as e:  # noqa: BLE001
        out.append(Check(f"namespace {ns}", "fail", f"cannot read it: {_status(e)}", f"kubectl create ns {ns}"))
    authz = client.AuthorizationV1Api(api)
    for verb, group, resource, sub in PERMISSIONS:
        what = f"{verb} {resource}{'/' + sub if sub else ''}"
        try:
            body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                    "spec": {"resourceAttributes": {"namespace": ns, "verb": verb, "group": group,
                                                    "resource": resource, "subresource": sub}}}
            res = api.sanitize_for_serialization(authz.create_self_subject_access_review(body))
            allowed = bool((res.get("status") or {}).get("allowed"))
            out.append(Check(f"rbac {what}", "ok" if allowed else "fail", "allowed" if allowed else "denied",
                             "" if allowed else "apply deploy/kubernetes/rbac.yaml"))
        except Exception as e:  # noqa: BLE001
            out.append(Check(f"rbac {what}", "fail", f"cannot ask: {_status(e)}"))
    if profile is None or any(c.status == "fail" for c in out):
        out.append(Check("networkpolicy enforcement", "warn",
                         "not visible through the API: a plugin that ignores NetworkPolicy leaves sandboxes on the network",
                         "run the canary: sandbox doctor --backend kubernetes (it needs the checks above to pass)"))
        return out
    from sandbox.audit.selftest import SelfTestFailed
    from sandbox.policy import load_policy

    try:
        rows = require_cluster_canaries(backend, load_policy(profile))
    except SelfTestFailed as e:
        out.append(Check("self-test (cluster sandbox)", "fail", str(e)[:400],
                         f"run `sandbox audit --profile {profile}` on a pod; see deploy/kubernetes/README.md"))
        net = [f for f in e.failures if f.id == CONNECT_ID]
        out.append(Check("networkpolicy enforcement", "fail" if net else "warn",
                         net[0].observed[:300] if net else "not proven: the self-test failed first",
                         "use a network plugin that enforces NetworkPolicy (Calico, Cilium, GKE Dataplane V2)"))
        return out
    except Exception as e:  # noqa: BLE001 - the profile did not load
        out.append(Check("self-test (cluster sandbox)", "fail", f"{str(e)[:300] or type(e).__name__}"))
        return out
    net_row = next(r for r in rows if r.id == CONNECT_ID)
    out.append(Check("self-test (cluster sandbox)", "ok", f"{len(rows)} canaries held in a {profile} pod"))
    out.append(Check("networkpolicy enforcement", "ok", net_row.observed[:300]))
    return out
