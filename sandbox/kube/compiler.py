"""Compile a Policy into the manifests that enforce it on a cluster with agent-sandbox.

Pure functions, no cluster: ``compile_manifests(policy, config)`` returns, in apply order,

1. a security-profiles-operator ``SeccompProfile`` (cluster-scoped, ``v1``) holding the very
   filter the Docker backend loads (``Policy.seccomp_filter()``: allowlist resolved, runtime
   adjusted), named after the policy digest so a changed filter never rewrites a profile that
   running pods use;
2. an agent-sandbox ``SandboxTemplate`` (``extensions.agents.x-k8s.io/v1beta1``): the pod template
   (RuntimeClass, non-root uid/gid, no capabilities, no privilege escalation, read-only root,
   seccomp ``Localhost``, no service-account token, no service links, memory ``emptyDir``
   volumes with size limits (workspace, tmpfs, ``/dev/shm``, ``/mnt/skills``), limits == requests) and a ``networkPolicy`` that denies all
   ingress and all egress except TCP to the egress proxy pods;
3. the same deny-by-default rules as a standalone ``NetworkPolicy`` selecting the template's
   pods (a template without ``networkPolicy`` would get the controller's allow-public-egress
   default; the standalone object still holds if the controller runs Unmanaged or is older);
4. a ``SandboxWarmPool`` of that template.

Anything the policy says that a pod cannot express is a degradation
(:mod:`sandbox.kube.degradations`): compiling refuses unless the configuration accepts each.

How ``user: auto`` is handled: a template is one pod spec, so every pod of a warm pool runs as
the same uid. For ``auto`` the compiler picks one per template from ``uid_range`` (stable, by
policy name); a pinned uid is used as given. One identity per *live sandbox* then comes from
the runtime, not the uid: under runsc each pod has its own kernel, and with
``user_namespaces: true`` (``hostUsers: false``) each pod gets its own host id range; otherwise
the ``identity.shared_uid`` degradation says what is lost.
"""

from __future__ import annotations

import re
from typing import Any

from sandbox import seccomp as sc
from sandbox import spec as specmod
from sandbox.kube import degradations as dg
from sandbox.kube.config import KubeConfig
from sandbox.policy import Policy

SANDBOX_GROUP = "extensions.agents.x-k8s.io"
SANDBOX_VERSION = "v1beta1"
SANDBOX_API = f"{SANDBOX_GROUP}/{SANDBOX_VERSION}"
SPO_API = "security-profiles-operator.x-k8s.io/v1"
CONTAINER = "sandbox"
LABEL_TEMPLATE = "sandbox.dev/template"
LABEL_POLICY = "sandbox.dev/policy"
ANN_DIGEST = "sandbox.dev/policy-digest"
MANAGED_BY = {"app.kubernetes.io/managed-by": "sandbox"}
SKILLS_MOUNT = "/mnt/skills"  # where the worker copies a run's skills (sandbox.worker.worker.SKILLS_PATH)
SKILLS_MB = 64                # the worker's default skills cap (WorkerConfig.skills_mb)

# PID 1 of a sandbox pod: reaps orphans and nothing else. Signals from the workload (same uid)
# to PID 1 are dropped by the kernel unless a handler is installed, so SIGINT's is removed.
REAPER = ("import os,signal,time\n"
          "signal.signal(signal.SIGINT,signal.SIG_DFL)\n"
          "while True:\n"
          " try:os.waitpid(-1,0)\n"
          " except ChildProcessError:time.sleep(1)\n")


def _launcher(policy: Policy) -> str:
    r = policy.rlimits
    limits = [("RLIMIT_NOFILE", r.nofile), ("RLIMIT_NPROC", r.nproc), ("RLIMIT_FSIZE", r.fsize_mb << 20),
              ("RLIMIT_CORE", 0), ("RLIMIT_CPU", r.cpu_s), ("RLIMIT_STACK", r.stack_mb << 20)]
    pairs = ",".join(f"(r.{n},{v})" for n, v in limits)
    agent = specmod.AGENT_CMD
    return ("import os,resource as r\n"
            f"for k,v in ({pairs},):\n"
            " h=r.getrlimit(k)[1]\n"
            " v=v if h==r.RLIM_INFINITY else min(v,h)\n"
            " r.setrlimit(k,(v,v))\n"
            f"os.execv({agent[0]!r},{agent!r})\n")


def agent_command(policy: Policy) -> list[str]:
    """What the backend runs through the exec stream: set the policy's rlimits as hard limits,
    then exec the same agent the Docker backend runs (it reads the hello line first)."""
    return [specmod.AGENT_CMD[0], "-I", "-S", "-c", _launcher(policy)]


def k8s_name(*parts: str, limit: int = 63) -> str:
    s = re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")
    s = re.sub(r"-+", "-", s)[:limit].strip("-")
    return s or "sandbox"


def template_name(policy: Policy) -> str:
    return k8s_name("sandbox", policy.name)


def seccomp_profile_name(policy: Policy) -> str:
    return k8s_name("sandbox", policy.name, policy.digest().removeprefix("sha256:")[:12])


def _quantity_mi(mb: int) -> str:
    return f"{mb}Mi"


def _cpu(cpus: float) -> str:
    return f"{int(round(cpus * 1000))}m"


def seccomp_profile(policy: Policy, config: KubeConfig) -> dict[str, Any]:
    """The SPO SeccompProfile: the Docker backend's OCI profile, minus defaultErrnoRet (SPO has no
    such field; runc's default errno for SCMP_ACT_ERRNO is EPERM, the same value)."""
    oci = sc.to_oci(policy.seccomp_filter())
    if oci.pop("defaultErrnoRet", None) not in (None, 1):
        raise dg.KubeRefused(policy.name, [("seccomp.default_action", "needs an errno other than EPERM")])
    syscalls = []
    for rule in oci["syscalls"]:
        out: dict[str, Any] = {"names": list(rule["names"]), "action": rule["action"]}
        if "errnoRet" in rule:
            out["errnoRet"] = int(rule["errnoRet"])
        if rule.get("args"):
            for a in rule["args"]:
                for key in ("value", "valueTwo"):
                    if not 0 <= a[key] < 2**63:
                        raise dg.KubeRefused(policy.name, [(f"seccomp.{rule['names'][0]}",
                                                            f"argument value {a[key]:#x} does not fit SPO's int64")])
            out["args"] = [{"index": a["index"], "value": a["value"], "valueTwo": a["valueTwo"], "op": a["op"]}
                           for a in rule["args"]]
        syscalls.append(out)
    return {
        "apiVersion": SPO_API,
        "kind": "SeccompProfile",
        "metadata": {"name": seccomp_profile_name(policy), "labels": {**MANAGED_BY, LABEL_POLICY: k8s_name(policy.name)},
                     "annotations": {ANN_DIGEST: policy.digest()}},
        "spec": {"defaultAction": oci["defaultAction"], "architectures": list(config.architectures),
                 "syscalls": syscalls},
    }


def network_rules(policy: Policy, config: KubeConfig) -> dict[str, list[dict[str, Any]]]:
    """Ingress: none. Egress: TCP to the egress proxy pods when the policy has egress (plus DNS to
    kube-dns only under the accepted ``network.dns`` degradation); nothing otherwise."""
    egress: list[dict[str, Any]] = []
    if policy.egress.enabled:
        p = config.egress_proxy
        egress.append({"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": p.namespace}},
                               "podSelector": {"matchLabels": dict(p.pod_labels)}}],
                       "ports": [{"protocol": "TCP", "port": p.port}]})
        if not p.cluster_ip:
            egress.append({"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                                   "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
                           "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]})
    return {"ingress": [], "egress": egress}


def pod_spec(policy: Policy, config: KubeConfig) -> dict[str, Any]:
    if isinstance(policy.user.uid, int) and isinstance(policy.user.gid, int):
        uid, gid = policy.user.uid, policy.user.gid
    else:
        uid, gid = config.template_ids(policy.name)
    seccomp = {"type": "Localhost", "localhostProfile": f"operator/{seccomp_profile_name(policy)}.json"}
    ws = policy.workspace
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    if ws.backing == "tmpfs":
        volumes.append({"name": "workspace", "emptyDir": {"medium": "Memory", "sizeLimit": _quantity_mi(ws.size_mb)}})
    elif config.disk_storage_class:
        volumes.append({"name": "workspace", "ephemeral": {"volumeClaimTemplate": {
            "metadata": {"labels": dict(MANAGED_BY)},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": config.disk_storage_class,
                     "resources": {"requests": {"storage": _quantity_mi(ws.size_mb)}}}}}})
    else:
        volumes.append({"name": "workspace", "emptyDir": {"sizeLimit": _quantity_mi(ws.size_mb)}})
    mounts.append({"name": "workspace", "mountPath": ws.path})
    for i, t in enumerate(policy.tmpfs):
        volumes.append({"name": f"tmpfs-{i}", "emptyDir": {"medium": "Memory", "sizeLimit": _quantity_mi(t.size_mb)}})
        mounts.append({"name": f"tmpfs-{i}", "mountPath": t.path})
    volumes.append({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": _quantity_mi(specmod.SHM_SIZE_MB)}})
    mounts.append({"name": "shm", "mountPath": "/dev/shm"})
    # The session agent's skills, copied in by the worker when a run starts (sandbox.worker.pool.install_skills).
    volumes.append({"name": "skills", "emptyDir": {"medium": "Memory", "sizeLimit": _quantity_mi(SKILLS_MB)}})
    mounts.append({"name": "skills", "mountPath": SKILLS_MOUNT})
    env = specmod.sandbox_env(policy, egress=policy.egress.enabled)
    if policy.egress.enabled:
        # The same variables as on Docker (sandbox.spec.egress_env): the proxy URLs point at the proxy
        # Service instead of the in-sandbox forwarder, and the CA variables at the same bundle path, a
        # small memory volume the backend fills at claim time (the session's trust bundle).
        url = f"http://{config.proxy_address()}"
        for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
            env[k] = url
        env.update(dict(policy.env))  # the policy's own env still wins, as on Docker
        volumes.append({"name": "egress", "emptyDir": {"medium": "Memory", "sizeLimit": "4Mi"}})
        mounts.append({"name": "egress", "mountPath": specmod.EGRESS_MOUNT})
    resources = {"cpu": _cpu(policy.limits.cpus), "memory": _quantity_mi(policy.limits.memory_mb)}
    container = {
        "name": CONTAINER,
        "image": config.image or policy.image,
        "imagePullPolicy": "IfNotPresent",
        "command": [specmod.AGENT_CMD[0], "-I", "-S", "-c", REAPER],
        "workingDir": ws.path,
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "resources": {"limits": dict(resources), "requests": dict(resources)},
        "securityContext": {
            "runAsNonRoot": True, "runAsUser": uid, "runAsGroup": gid,
            "allowPrivilegeEscalation": False, "privileged": False, "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": dict(seccomp), "procMount": "Default",
        },
        "volumeMounts": mounts,
        "stdin": False,
        "tty": False,
        "terminationMessagePolicy": "File",
    }
    spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "hostNetwork": False, "hostPID": False, "hostIPC": False,
        "shareProcessNamespace": False,
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": 0,
        "securityContext": {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": gid, "fsGroup": gid,
                            "supplementalGroups": [], "seccompProfile": dict(seccomp)},
        "containers": [container],
        "volumes": volumes,
    }
    rc = config.runtime_class if policy.runtime == "runsc" else config.runc_runtime_class
    if rc:
        spec["runtimeClassName"] = rc
    if config.user_namespaces:
        spec["hostUsers"] = False
    if config.node_selector:
        spec["nodeSelector"] = dict(config.node_selector)
    if config.tolerations:
        spec["tolerations"] = [t.model_dump(exclude_none=True) for t in config.tolerations]
    return spec


def pod_labels(policy: Policy) -> dict[str, str]:
    return {**MANAGED_BY, LABEL_TEMPLATE: template_name(policy), LABEL_POLICY: k8s_name(policy.name)}


def sandbox_template(policy: Policy, config: KubeConfig) -> dict[str, Any]:
    rules = network_rules(policy, config)
    return {
        "apiVersion": SANDBOX_API,
        "kind": "SandboxTemplate",
        "metadata": {"name": template_name(policy), "namespace": config.namespace, "labels": pod_labels(policy),
                     "annotations": {ANN_DIGEST: policy.digest()}},
        "spec": {
            "podTemplate": {"metadata": {"labels": pod_labels(policy), "annotations": {ANN_DIGEST: policy.digest()}},
                            "spec": pod_spec(policy, config)},
            # Present (even when empty) so the controller applies these rules, never its default
            # allow-public-egress policy.
            "networkPolicy": {k: v for k, v in rules.items() if v},
            "networkPolicyManagement": "Managed",
            # No claim may add environment variables (a claim's env would also force a cold start).
            "envVarsInjectionPolicy": "Disallowed",
            "volumeClaimTemplatesPolicy": "Disallowed",
        },
    }


def network_policy(policy: Policy, config: KubeConfig) -> dict[str, Any]:
    rules = network_rules(policy, config)
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": k8s_name(template_name(policy), "deny"), "namespace": config.namespace,
                     "labels": dict(MANAGED_BY)},
        "spec": {"podSelector": {"matchLabels": {LABEL_TEMPLATE: template_name(policy)}},
                 "policyTypes": ["Ingress", "Egress"], "ingress": rules["ingress"], "egress": rules["egress"]},
    }


def warm_pool(policy: Policy, config: KubeConfig) -> dict[str, Any]:
    return {
        "apiVersion": SANDBOX_API,
        "kind": "SandboxWarmPool",
        "metadata": {"name": template_name(policy), "namespace": config.namespace, "labels": dict(MANAGED_BY)},
        # Recreate: after a policy change no stale pod (old filter, old limits) waits in the pool.
        "spec": {"replicas": config.warm_pool_replicas, "sandboxTemplateRef": {"name": template_name(policy)},
                 "updateStrategy": {"type": "Recreate"}},
    }


def compile_manifests(policy: Policy, config: KubeConfig) -> list[dict[str, Any]]:
    """The manifests, in apply order; :class:`~sandbox.kube.degradations.KubeRefused` when the
    policy has a degradation the configuration does not accept, or a refusal."""
    dg.check_accepted(policy, config)
    return [seccomp_profile(policy, config), sandbox_template(policy, config), network_policy(policy, config),
            warm_pool(policy, config)]


def claim(policy: Policy, config: KubeConfig, name: str, session_id: str, shutdown_time: str) -> dict[str, Any]:
    """A SandboxClaim for one session: from the policy's warm pool, deleted by the controller at
    ``shutdown_time`` (RFC 3339) even if the worker is gone."""
    return {
        "apiVersion": SANDBOX_API,
        "kind": "SandboxClaim",
        "metadata": {"name": name, "namespace": config.namespace,
                     "labels": {**MANAGED_BY, LABEL_POLICY: k8s_name(policy.name),
                                "sandbox.dev/session": k8s_name(session_id)}},
        "spec": {"warmPoolRef": {"name": template_name(policy)},
                 "lifecycle": {"shutdownTime": shutdown_time, "shutdownPolicy": "Delete"}},
    }
