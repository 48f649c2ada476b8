"""The Kubernetes backend's configuration: one YAML file, strict like a policy.

Everything here is about the cluster, never about what a sandbox may do: that stays in the
policy. A platform team states where sandboxes run (namespace, RuntimeClass, a dedicated node
pool), how the egress proxy is reached, and which degradations (see
:mod:`sandbox.kube.degradations`) it accepts, each with a written reason, like a policy's
``unsafe:``. Example (every key optional)::

    namespace: sandboxes
    image: registry.example.com/sandbox-runtime@sha256:...   # default: the policy's image
    runtime_class: gvisor            # for policies with runtime: runsc
    uid_range: [20000, 29999]        # user: auto -> one uid per template from this range
    user_namespaces: false           # hostUsers: false (Kubernetes >= 1.33 and a runtime that supports it)
    warm_pool_replicas: 2
    egress_proxy: {service: sandbox-egress, namespace: sandboxes, port: 3128, cluster_ip: 10.96.0.53,
                   pod_labels: {app.kubernetes.io/name: sandbox-egress},
                   admin_token_file: /run/sandbox-egress-admin/token,
                   admin_tls_ca_file: /etc/sandbox-egress-admin-ca/ca.crt,   # `sandbox kube admin-tls`
                   admin_tls_name: sandbox-egress-admin}   # plain HTTP beyond loopback: allow_plain_admin: true
    node_selector: {sandbox.dev/pool: sandboxes}
    tolerations: [{key: sandbox.gke.io/runtime, operator: Equal, value: gvisor, effect: NoSchedule}]
    accept:
      limits.pids: "dedicated node pool with kubelet podPidsLimit=512; RLIMIT_NPROC set by the agent"
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from sandbox.policy_base import PolicyError, _Strict, read_yaml

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*$")
_DEGRADATION_ID = re.compile(r"^[a-z_]+(\.[A-Za-z0-9_:/.-]+)*$")
_MIN_REASON = 8


class EgressProxy(_Strict):
    """Where the egress proxy (a Deployment behind a Service, deploy/kubernetes) is reached.
    With ``cluster_ip`` the sandbox gets the address itself and needs no DNS; without it the
    sandbox must resolve the Service name, which the ``network.dns`` degradation names."""

    service: str = "sandbox-egress"
    namespace: str | None = None  # default: the sandboxes' namespace
    port: int = Field(3128, ge=1, le=65535)
    cluster_ip: str | None = None
    pod_labels: dict[str, str] = {"app.kubernetes.io/name": "sandbox-egress"}
    # The proxy's admin endpoint (sandbox/egress/cluster.py), where the backend registers each pod's
    # address: its own port on the Service (sandbox pods' NetworkPolicy never allows it), and the
    # token file mounted into the worker only (a Secret). Without a token file the backend has no
    # egress registry and refuses policies with egress.
    admin_port: int = Field(3129, ge=1, le=65535)
    admin_url: str | None = None  # default http://<service>.<namespace>.svc:<admin_port>
    admin_token_file: str | None = None
    # Several proxy replicas (deploy/kubernetes/proxy.yaml): the worker registers every session with
    # each (sandbox/egress/cluster.py). admin_dns: a headless Service whose A/AAAA records are the
    # replicas (re-resolved every half second; admin_port on each); admin_urls: a fixed list.
    admin_dns: str | None = None
    admin_urls: list[str] = []
    # TLS to the admin endpoints (registrations carry the token and session CA keys): the CA that
    # signed the proxy's --admin-tls-cert (`sandbox kube admin-tls` makes both), and the one name
    # that certificate carries (replicas are reached by pod IP; the name is checked instead).
    # Without a CA the admin channel is plain HTTP, which the worker refuses for any endpoint
    # beyond loopback unless allow_plain_admin is true (an explicit opt-in, e.g. on a pod network
    # that encrypts every packet itself: WireGuard, IPsec, a mesh with mTLS).
    admin_tls_ca_file: str | None = None
    admin_tls_name: str = "sandbox-egress-admin"
    allow_plain_admin: bool = False

    @field_validator("admin_tls_name")
    @classmethod
    def _tls_name(cls, v: str) -> str:
        if not _DNS_NAME.match(v) or len(v) > 253:
            raise ValueError(f"{v!r} is not a DNS name (the one name the replicas' admin certificate carries)")
        return v

    @model_validator(mode="after")
    def _ports(self) -> "EgressProxy":
        if self.admin_port == self.port:
            raise ValueError("admin_port must differ from port (sandbox pods may reach only the proxy port)")
        if self.admin_dns and self.admin_urls:
            raise ValueError("admin_dns and admin_urls both name the replicas: give one")
        for u in self.admin_urls:
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"admin_urls: {u!r} is not an http(s) URL")
        if self.admin_tls_ca_file:
            if self.allow_plain_admin:
                raise ValueError("allow_plain_admin contradicts admin_tls_ca_file (TLS to every admin endpoint): "
                                 "give one")
            for u in [*self.admin_urls, *([self.admin_url] if self.admin_url else [])]:
                if not u.startswith("https://"):
                    raise ValueError(f"{u!r}: with admin_tls_ca_file the admin endpoints are https:// URLs")
        return self

    def admin_base_url(self) -> str:
        scheme = "https" if self.admin_tls_ca_file else "http"
        return (self.admin_url or f"{scheme}://{self.service}.{self.namespace}.svc:{self.admin_port}").rstrip("/")

    def plain_admin_refusal(self) -> str | None:
        """Why the worker must not use these admin endpoints, or None. The admin channel carries
        the admin token and, for policies that terminate TLS, every session CA's private key: in
        clear text only to loopback, or where ``allow_plain_admin`` says the network protects it."""
        if self.admin_tls_ca_file or self.allow_plain_admin:
            return None
        if self.admin_dns:
            where = [("egress_proxy.admin_dns", self.admin_dns)]
        elif self.admin_urls:
            where = [("egress_proxy.admin_urls", u) for u in self.admin_urls]
        else:
            where = [("egress_proxy.admin_url", self.admin_base_url())]
        far = [(k, v) for k, v in where if not _loopback(v)]
        if not far:
            return None
        key, value = far[0]
        return (f"{key}: {value} would be reached over plain HTTP beyond loopback, and the admin channel carries "
                "the admin token and session CA keys: set egress_proxy.admin_tls_ca_file (the CA of the proxy's "
                "--admin-tls-cert; `sandbox kube admin-tls` makes both) with https:// admin URLs, or "
                "egress_proxy.allow_plain_admin: true if the pod network encrypts this traffic itself")


def _loopback(url_or_host: str) -> bool:
    """Whether an admin URL (or a DNS name) names this machine only."""
    import ipaddress
    from urllib.parse import urlsplit

    host = (urlsplit(url_or_host).hostname if "://" in url_or_host else url_or_host) or ""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Toleration(_Strict):
    key: str | None = None
    operator: str | None = None
    value: str | None = None
    effect: str | None = None


class KubeConfig(_Strict):
    namespace: str = "sandboxes"
    image: str | None = None               # the policy's image as the cluster pulls it (a registry reference)
    runtime_class: str = "gvisor"          # runtimeClassName for policies with runtime: runsc
    runc_runtime_class: str | None = None  # runtimeClassName for runtime: runc (None: the node default)
    uid_range: tuple[int, int] = (20000, 29999)
    user_namespaces: bool = False
    warm_pool_replicas: int = Field(2, ge=0, le=10000)
    architectures: list[str] = ["SCMP_ARCH_X86_64"]
    disk_storage_class: str | None = None  # disk workspaces as generic ephemeral volumes (real ENOSPC)
    egress_proxy: EgressProxy = EgressProxy()
    node_selector: dict[str, str] = {}
    tolerations: list[Toleration] = []
    accept: dict[str, str] = {}
    # Where the start-up canary tries to connect from inside a sandbox pod (IP:port, no DNS): every
    # attempt must fail, or NetworkPolicy is not enforced. Add the API server's Service address.
    canary_targets: list[str] = ["1.1.1.1:443", "169.254.169.254:80"]

    @field_validator("canary_targets")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        import ipaddress

        for t in v:
            host, sep, port = t.rpartition(":")
            try:
                ipaddress.ip_address(host.strip("[]"))
                ok = bool(sep) and 1 <= int(port) <= 65535
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"{t!r} is not IP:port (an address literal: the pod has no DNS)")
        return v

    @field_validator("namespace", "runtime_class")
    @classmethod
    def _dns_label(cls, v: str) -> str:
        if not _DNS_LABEL.match(v):
            raise ValueError(f"{v!r} is not a DNS label (lower-case letters, digits, '-', at most 63)")
        return v

    @field_validator("uid_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        lo, hi = v
        if not 1 <= lo <= hi <= 2**31 - 2:
            raise ValueError("must be [low, high] with 1 <= low <= high <= 2147483646 (never 0: not root)")
        return v

    @field_validator("architectures")
    @classmethod
    def _arches(cls, v: list[str]) -> list[str]:
        ok = {"SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"}
        bad = [a for a in v if a not in ok]
        if bad or not v:
            raise ValueError(f"must name one or more of {sorted(ok)} (got {v})")
        return v

    @field_validator("accept")
    @classmethod
    def _reasons(cls, v: dict[str, str]) -> dict[str, str]:
        for did, reason in v.items():
            if not _DEGRADATION_ID.match(did):
                raise ValueError(f"{did!r} is not a degradation id (like limits.pids)")
            if not isinstance(reason, str) or len(reason.strip()) < _MIN_REASON:
                raise ValueError(f"{did}: needs a written reason (at least {_MIN_REASON} characters)")
        return {k: r.strip() for k, r in v.items()}

    @model_validator(mode="after")
    def _proxy_ns(self) -> "KubeConfig":
        if self.egress_proxy.namespace is None:
            object.__setattr__(self, "egress_proxy", self.egress_proxy.model_copy(update={"namespace": self.namespace}))
        return self

    def template_ids(self, policy_name: str) -> tuple[int, int]:
        """The uid/gid of a template whose policy says ``user: auto``: a fixed number per
        template, taken from ``uid_range`` by the policy's name (stable across compiles, so a
        re-apply does not churn the warm pool; different templates rarely share one)."""
        lo, hi = self.uid_range
        n = int.from_bytes(hashlib.sha256(policy_name.encode()).digest()[:8], "big")
        uid = lo + n % (hi - lo + 1)
        return uid, uid

    def proxy_address(self) -> str:
        p = self.egress_proxy
        host = p.cluster_ip or f"{p.service}.{p.namespace}.svc.cluster.local"
        return f"{host}:{p.port}"


class KubeConfigError(PolicyError):
    """The backend configuration is invalid: (file, key, reason) triples like a policy's."""

    def __init__(self, problems: list[tuple[str, str, str]]):
        super().__init__(problems)
        self.args = ("invalid Kubernetes backend configuration:\n  " + "\n  ".join(f"{f}: {k}: {r}" for f, k, r in problems),)

    def __str__(self) -> str:
        return str(self.args[0])


def load_config(path: str | Path | None) -> KubeConfig:
    """The configuration from a YAML file, or the defaults (``path`` None)."""
    if path is None:
        return KubeConfig()
    data: Any = read_yaml(Path(path))
    return config_from_dict(data or {}, source=str(path))


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> KubeConfig:
    if not isinstance(data, dict):
        raise KubeConfigError([(source, "-", "the Kubernetes backend configuration must be a YAML mapping")])
    try:
        return KubeConfig.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(x) for x in err["loc"]) or "-"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
            problems.append((source, key, msg))
        raise KubeConfigError(problems) from None
