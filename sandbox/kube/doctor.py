"""Checks of what the Kubernetes backend relies on, through the API (no pod is started here).

CRDs (agent-sandbox's, served at v1beta1; security-profiles-operator's SeccompProfile at v1), the
RuntimeClass for runsc policies, the namespace's Pod Security level (``restricted`` as a
server-side floor), and the worker's own permissions (SelfSubjectAccessReview). Whether the
network plugin enforces NetworkPolicy cannot be read from the API: only a canary pod proves it
(deploy/kubernetes/README.md), so that check is a warning naming the by-hand step.
"""

from __future__ import annotations

from typing import Any

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


def run_checks(backend: Any) -> list[Check]:
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
    out.append(Check("networkpolicy enforcement", "warn",
                     "not visible through the API: a plugin that ignores NetworkPolicy leaves sandboxes on the network",
                     "run the canary in deploy/kubernetes/README.md (a sandbox pod must fail to reach anything "
                     "but the egress proxy)"))
    return out
