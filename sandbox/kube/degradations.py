"""What a policy asks for that Kubernetes cannot express: named, explained, refused unless accepted.

The Docker backend enforces every key of a policy. A pod spec cannot say some of them (no
per-pod pids limit, no rlimits, no ``noexec`` or mode on an ``emptyDir``, ...). The compiler
never drops such a key silently: :func:`find` lists each *degradation* for a policy with what is
lost and the workaround the compiler or the backend applies instead, and
:func:`check_accepted` refuses to compile unless the backend configuration accepts every one by
id, with a written reason (``accept:`` in :mod:`sandbox.kube.config`). Some things are
*refusals*: no workaround makes them mean the same on a cluster (host-path mounts), so no
acceptance lets them through.

``sandbox policy explain PROFILE --target kubernetes`` prints the list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from sandbox.kube.config import KubeConfig
from sandbox.policy import Policy


@dataclass(frozen=True)
class Degradation:
    id: str
    lost: str          # what the policy says that the cluster will not enforce
    workaround: str    # what the compiler / backend does instead
    accepted: str = ""  # the configuration's reason, when accepted

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "lost": self.lost, "workaround": self.workaround, "accepted": self.accepted}


class KubeRefused(ValueError):
    """The policy cannot be compiled for this cluster configuration. ``problems``: (key, reason)."""

    def __init__(self, policy: str, problems: list[tuple[str, str]]):
        self.policy = policy
        self.problems = problems
        super().__init__(f"policy {policy} cannot run on Kubernetes as configured:\n  "
                         + "\n  ".join(f"{k}: {r}" for k, r in problems))


def _pids(p: Policy, c: KubeConfig) -> Degradation | None:
    return Degradation(
        "limits.pids",
        f"limits.pids={p.limits.pids}: a pod has no process limit of its own (the kubelet's podPidsLimit is "
        "one node-wide setting; a per-pod field is only a proposal)",
        f"the agent's launcher sets a hard RLIMIT_NPROC={p.rlimits.nproc} before the agent or any workload "
        "process exists; run sandboxes on a dedicated node pool (node_selector/tolerations) whose kubelet sets "
        f"podPidsLimit to at most {p.limits.pids} (checked by hand: deploy/kubernetes/README.md)")


def _rlimits(p: Policy, c: KubeConfig) -> Degradation | None:
    r = p.rlimits
    return Degradation(
        "rlimits",
        f"rlimits (nofile={r.nofile} nproc={r.nproc} fsize={r.fsize_mb}MiB core=0 cpu={r.cpu_s}s stack={r.stack_mb}MiB): "
        "a pod spec has no rlimits field (the securityContext.ulimits proposal lacks nproc, fsize and cpu)",
        "the agent is started through a launcher that sets each of them as a hard limit (soft == hard) and then "
        "execs the agent: every workload process inherits them and, with all capabilities dropped, cannot raise them")


def _noexec(p: Policy, c: KubeConfig) -> Degradation | None:
    paths = [t.path for t in p.tmpfs if not t.exec]
    if not paths:
        return None
    return Degradation(
        "tmpfs.noexec",
        f"noexec on {', '.join(paths)}: an emptyDir takes no mount options (files written there can be executed)",
        "none inside the pod: the root filesystem stays read-only and the uid non-root, so only files the session "
        "itself wrote can run, under the same seccomp filter and limits; accept it, or keep such policies on Docker")


def _mode(p: Policy, c: KubeConfig) -> Degradation | None:
    return Degradation(
        "volumes.mode",
        "tmpfs mode (workspace 0700 owned by the sandbox's uid, /tmp 1777): an emptyDir has no mode option",
        "the pod runs one uid only, and fsGroup makes the volumes group-owned by the sandbox's gid: no other "
        "user exists in the pod to use the wider mode")


def _disk(p: Policy, c: KubeConfig) -> Degradation | None:
    if p.workspace.backing != "disk" or c.disk_storage_class:
        return None
    return Degradation(
        "workspace.disk_eviction",
        f"a {p.workspace.size_mb} MiB disk workspace that fails writes with ENOSPC when full: a disk emptyDir's "
        "sizeLimit evicts the whole pod instead (the session ends)",
        "set disk_storage_class in the backend configuration: the workspace becomes a generic ephemeral volume "
        "of that size, whose filesystem answers ENOSPC like the Docker backend's loop-mounted image")


def _masked(p: Policy, c: KubeConfig) -> Degradation | None:
    if p.runtime == "runsc":
        return None
    return Degradation(
        "proc.masked_paths",
        "the extra masked /proc and /sys paths (kallsyms, modules, cmdline, boot_id, CPU vulnerability and DMI "
        "data, ...): a pod can only choose procMount Default, the container runtime's own short list",
        "none under runc; policies with runtime: runsc get gVisor's /proc and /sys, which show nothing of the host")


def _oom(p: Policy, c: KubeConfig) -> Degradation | None:
    return Degradation(
        "limits.oom_score_adj",
        "oom_score_adj 500 (sandboxes die first when the node runs out of memory): a Guaranteed pod gets -997",
        "limits == requests, so the scheduler never overcommits the node's memory; a dedicated node pool "
        "(node_selector/tolerations) keeps the worker and system pods off the sandboxes' nodes")


def _identity(p: Policy, c: KubeConfig) -> Degradation | None:
    if p.runtime == "runsc" or c.user_namespaces:
        return None
    return Degradation(
        "identity.shared_uid",
        "one uid per live sandbox: every pod of a template runs as the same uid (a template is one pod spec), "
        "so per-uid kernel limits (RLIMIT_NPROC, inotify instances) are shared by the sessions on one node",
        "set user_namespaces: true (hostUsers: false; Kubernetes >= 1.33 and a runtime that supports it): each "
        "pod then gets its own host uid range; or use runtime: runsc, where each pod has its own kernel")


def _pid1(p: Policy, c: KubeConfig) -> Degradation | None:
    return Degradation(
        "agent.not_pid1",
        "the agent as PID 1 (signal-proof, and its exit ends every workload process): a warm-pool pod starts "
        "before its session, so the agent arrives through the exec stream as an ordinary process",
        "PID 1 is a minimal reaper that ignores signals; the workload can signal the agent (same uid), which ends "
        "only its own session; the backend deletes the claim (and so the pod) when the channel ends, and the "
        "claim's shutdownTime removes it if the worker dies")


def _cni(p: Policy, c: KubeConfig) -> Degradation | None:
    return Degradation(
        "network.interface",
        "no network interface at all (Docker NetworkDisabled): every pod has one",
        "a NetworkPolicy denying all ingress and all egress except TCP to the egress proxy pods (and nothing when "
        "the policy has no egress), set both as the template's networkPolicy and as a standalone object; it "
        "holds only where the network plugin enforces NetworkPolicy, which only a canary pod proves (by hand, "
        "deploy/kubernetes/README.md; the doctor warns)")


def _dns(p: Policy, c: KubeConfig) -> Degradation | None:
    if not p.egress.enabled or c.egress_proxy.cluster_ip:
        return None
    return Degradation(
        "network.dns",
        "no DNS inside the sandbox (the proxy resolves): without a fixed proxy address the sandbox must resolve "
        "the proxy Service's name, so the NetworkPolicy allows DNS to kube-dns, and lookups can carry data out",
        "set egress_proxy.cluster_ip (give the proxy Service a fixed clusterIP): the sandbox then gets the "
        "address itself and the NetworkPolicy allows no DNS")


CATALOGUE: tuple[Callable[[Policy, KubeConfig], Degradation | None], ...] = (
    _pids, _rlimits, _noexec, _mode, _disk, _masked, _oom, _identity, _pid1, _cni, _dns)
KNOWN_IDS = ("limits.pids", "rlimits", "tmpfs.noexec", "volumes.mode", "workspace.disk_eviction", "proc.masked_paths",
             "limits.oom_score_adj", "identity.shared_uid", "agent.not_pid1", "network.interface", "network.dns")


def find(policy: Policy, config: KubeConfig) -> list[Degradation]:
    """Every degradation this policy has on a cluster so configured, with the configuration's
    reason filled in where it accepts one."""
    out = []
    for f in CATALOGUE:
        d = f(policy, config)
        if d is not None:
            out.append(Degradation(d.id, d.lost, d.workaround, config.accept.get(d.id, "")))
    return out


def refusals(policy: Policy, config: KubeConfig) -> list[tuple[str, str]]:
    """What no acceptance lets through."""
    out = []
    for m in policy.read_only_mounts:
        out.append((f"read_only_mounts.{m.target}",
                    f"host path {m.source}: a pod cannot mount an arbitrary host path portably (hostPath is refused "
                    "by the restricted Pod Security level); bake the files into the image, or keep this policy on Docker"))
    return out


def check_accepted(policy: Policy, config: KubeConfig) -> list[Degradation]:
    """The degradations, all accepted; else :class:`KubeRefused` naming every problem."""
    problems = refusals(policy, config)
    unknown = [k for k in config.accept if k not in KNOWN_IDS]
    for k in unknown:
        problems.append((f"accept.{k}", f"not a degradation id; known: {', '.join(KNOWN_IDS)}"))
    found = find(policy, config)
    for d in found:
        if not d.accepted:
            problems.append((d.id, f"{d.lost}. Workaround applied: {d.workaround}. Not accepted: add "
                                   f"accept: {{{d.id}: <reason>}} to the backend configuration to run it anyway"))
    if problems:
        raise KubeRefused(policy.name, problems)
    return found
