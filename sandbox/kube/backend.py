"""The Kubernetes backend: a sandbox is an agent-sandbox claim on a warm pool; the agent channel
runs over the pod exec stream.

create(policy, session):
  1. POST a ``SandboxClaim`` on the policy's ``SandboxWarmPool`` with ``lifecycle.shutdownTime`` =
     now + the policy's session limit and ``shutdownPolicy: Delete``: the controller removes the
     claim, its Sandbox and its pod at that time even if this worker is gone;
  2. watch the claim until its ``Ready`` condition is true (a claim deleted meanwhile, or no
     readiness before the deadline, ends in an error and a deleted claim);
  3. find the pod by the ``agents.x-k8s.io/claim-uid`` label the controller puts on it;
  4. register the pod's IP with the egress proxy (a Deployment + Service; sessions are told
     apart by source address, see deploy/kubernetes/README.md) when the policy has egress;
  5. exec the agent launcher (hard rlimits, then the same agent as on Docker) in the pod's
     ``sandbox`` container over the WebSocket exec stream of the official ``kubernetes``
     client, and run the unchanged :class:`sandbox.channel.AgentChannel` over it: the hello
     line with the fresh per-sandbox key first, then HMAC-authenticated frames both ways. The
     container's own stdout is never used (it lands in the node's logs).

The result is a :class:`sandbox.runtime.Sandbox`, as on Docker: the worker and the tools do not
know the difference. Teardown closes the stream and deletes the claim; so does losing the
stream (the agent is then gone and nothing inside is trusted), and a failed frame
authentication. No key or token is ever put into the pod: the claim carries no env.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import secrets
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from sandbox.backend import Prepared, SandboxInfo
from sandbox import spec as specmod
from sandbox.channel import AgentChannel
from sandbox.egress.rules import EgressPolicy
from sandbox.kube import compiler as kc
from sandbox.kube import degradations as dg
from sandbox.kube.config import KubeConfig, load_config
from sandbox.policy import Policy
from sandbox.runtime import WATCHDOG_S, Sandbox, SandboxError

log = logging.getLogger(__name__)

CLAIMS = "sandboxclaims"
CLAIM_UID_LABEL = "agents.x-k8s.io/claim-uid"
LABEL_OWNER = "sandbox.dev/owner"
LABEL_SESSION = "sandbox.dev/session"
CONFIG_ENV = "SANDBOX_KUBE_CONFIG"
_FRAME = struct.Struct(">BxxxI")  # Docker's multiplexed-stream header, what AgentChannel reads


class PodEgress(Protocol):
    """The egress proxy's session table on a cluster: a session is known by its pod's address
    (:class:`sandbox.egress.cluster.ClusterEgressClient`). ``register`` returns the trust bundle
    (PEM) the pod must use, or None; ``ttl_s`` bounds the registration (the session limit)."""

    def register(self, session_id: str, pod_ip: str, policy: EgressPolicy, ttl_s: float) -> bytes | None: ...

    def unregister(self, session_id: str) -> None: ...


@dataclass
class _PodIdentity:
    """The template's uid/gid (every pod of a template runs as it; see sandbox.kube.compiler)."""

    uid: int
    gid: int

    def release(self) -> None:
        pass


class _NoCounters:
    """No host cgroup to read: limits show up as the pod's termination reason instead."""

    def snapshot(self) -> dict[str, int | None]:
        return {}


class ExecBridge:
    """Carries the agent channel over a pod exec WebSocket.

    The unchanged :class:`AgentChannel` gets one end of a socketpair: what it writes goes to the
    exec stream's stdin channel; the stream's stdout and stderr channels come back re-framed as
    Docker's multiplexed stream (stderr is the agent's diagnostics, as on Docker). When the
    stream ends - the agent exited, the pod went away, the connection dropped - the channel sees
    EOF (the backend then deletes the claim)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.host, self._inner = socket.socketpair()
        self.status: str | None = None  # the exec stream's status channel (3), if it said anything
        self._closed = threading.Event()
        threading.Thread(target=self._from_pod, name="kube-exec-read", daemon=True).start()
        threading.Thread(target=self._to_pod, name="kube-exec-write", daemon=True).start()

    def _from_pod(self) -> None:
        try:
            while not self._closed.is_set():
                self.ws.update(timeout=1)
                for ch in (1, 2):
                    data = self.ws.read_channel(ch)
                    if data:
                        if isinstance(data, str):
                            data = data.encode()
                        self._inner.sendall(_FRAME.pack(ch, len(data)) + data)
                status = self.ws.read_channel(3)
                if status:
                    self.status = (status.decode("utf-8", "replace") if isinstance(status, bytes) else status)[:2000]
                if not self.ws.is_open():
                    break
        except Exception as e:  # noqa: BLE001 - any transport failure is the end of the channel
            if not self._closed.is_set():
                log.warning("pod exec stream failed: %s: %s", type(e).__name__, e)
        finally:
            try:
                self._inner.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.close()
            self._inner.close()

    def _to_pod(self) -> None:
        try:
            while True:
                data = self._inner.recv(1 << 16)
                if not data:
                    break
                self.ws.write_stdin(data)
        except Exception as e:  # noqa: BLE001
            if not self._closed.is_set():
                log.warning("pod exec stream write failed: %s: %s", type(e).__name__, e)
        finally:
            self.close()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001
            pass
        try:
            self._inner.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def rfc3339(t: _dt.datetime) -> str:
    return t.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ready(obj: dict[str, Any]) -> tuple[bool, str]:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return c.get("status") == "True", f"{c.get('reason', '')}: {c.get('message', '')}"[:300]
    return False, "no Ready condition yet"


class KubeBackend:
    """Sandboxes as agent-sandbox claims. ``api_client``: a ``kubernetes.client.ApiClient``
    (default: in-cluster configuration, else the kubeconfig). ``egress``: the proxy's session
    table; without one, a policy with egress is refused."""

    name = "kubernetes"
    mounts_host_paths = False  # a pod takes no host path: the worker keeps workspaces as archives

    def __init__(self, config: KubeConfig | None = None, api_client: Any = None, egress: PodEgress | None = None,
                 ready_timeout: float = 120.0, owner_kind: str = "worker", state_dir: Path | None = None) -> None:
        self.config = config or load_config(os.environ.get(CONFIG_ENV) or None)
        self._api_client = api_client
        if egress is None and self.config.egress_proxy.admin_token_file:
            # The cluster proxy's admin endpoints (sandbox/egress/cluster.py): every replica (the
            # headless Service of egress_proxy.admin_dns, or admin_urls), each session registered
            # with all of them; the token mounted into this worker's pod only. With a state dir,
            # the sessions' egress decisions (from every replica, each once) are copied there for
            # the worker's trail (as the host daemon's files are on Docker).
            from sandbox.egress.cluster import ClusterEgressClient

            egress = ClusterEgressClient.from_config(self.config.egress_proxy,
                                                     mirror_dir=Path(state_dir) / "egress" if state_dir else None)
        self.egress = egress
        self.ready_timeout = ready_timeout
        self.owner = kc.k8s_name(owner_kind, socket.gethostname(), str(os.getpid()))
        self.event_hook: Callable[[str, Sandbox], None] | None = None
        self._bridges: dict[str, ExecBridge] = {}
        self._lock = threading.Lock()

    # -- clients (the kubernetes package is imported only here)
    @property
    def api_client(self) -> Any:
        if self._api_client is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                # $KUBECONFIG as it is now (the client reads it once, at import)
                config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)
            self._api_client = client.ApiClient()
        return self._api_client

    def _custom(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self.api_client)

    def _core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.api_client)

    @property
    def ns(self) -> str:
        return self.config.namespace

    # -- Backend
    def prepare(self, policy: Policy) -> Prepared:
        from kubernetes.client.exceptions import ApiException

        try:
            dg.check_accepted(policy, self.config)
        except dg.KubeRefused as e:
            raise SandboxError(str(e)) from None
        if policy.egress.enabled and self.egress is None:
            raise SandboxError(f"policy {policy.name} has egress, and this backend has no egress proxy registry")
        name = kc.template_name(policy)
        hint = f"apply it: sandbox policy compile {policy.name} --target kubernetes | kubectl apply -f -"
        try:
            tpl = self._custom().get_namespaced_custom_object(kc.SANDBOX_GROUP, kc.SANDBOX_VERSION, self.ns,
                                                              "sandboxtemplates", name)
        except ApiException as e:
            if e.status == 404:
                raise SandboxError(f"SandboxTemplate {self.ns}/{name} does not exist; {hint}") from None
            raise SandboxError(f"cannot read SandboxTemplate {self.ns}/{name}: {e.status} {e.reason}") from None
        have = ((tpl.get("metadata") or {}).get("annotations") or {}).get(kc.ANN_DIGEST)
        if have != policy.digest():
            raise SandboxError(f"SandboxTemplate {self.ns}/{name} enforces {have or 'an unknown policy'}, "
                               f"not {policy.name} {policy.digest()}; {hint}")
        return Prepared(self.name, policy.name, policy.digest(), f"SandboxTemplate {self.ns}/{name}")

    def create(self, policy: Policy, session_id: str | None = None, workspace: Any = None,
               ro_mounts: Any = None, **_: Any) -> Sandbox:
        from kubernetes.client.exceptions import ApiException

        if workspace is not None or ro_mounts:
            raise SandboxError("a cluster sandbox cannot mount host paths (workspace, ro_mounts)")
        if _.get("identity") is not None:
            raise SandboxError("a cluster sandbox runs as its template's uid/gid; it cannot take a host uid lease")
        if policy.egress.enabled and self.egress is None:
            raise SandboxError(f"policy {policy.name} has egress, and this backend has no egress proxy registry")
        session_id = session_id or f"sess_{secrets.token_hex(8)}"
        name = kc.k8s_name("sbx", session_id[:40], secrets.token_hex(3))
        deadline = time.monotonic() + self.ready_timeout
        body = kc.claim(policy, self.config, name, session_id,
                        rfc3339(_now() + _dt.timedelta(seconds=math.ceil(policy.timeouts.session_s) + 1)))
        body["metadata"]["labels"][LABEL_OWNER] = self.owner
        registered = False
        bundle: bytes | None = None
        bridge: ExecBridge | None = None
        try:
            try:
                self._custom().create_namespaced_custom_object(kc.SANDBOX_GROUP, kc.SANDBOX_VERSION, self.ns, CLAIMS, body)
            except ApiException as e:
                raise SandboxError(f"the cluster refused the claim: {e.status} {e.reason}") from None
            claim = self._wait_ready(name, deadline)
            pod = self._pod_for(claim, deadline)
            pod_name, pod_ip = pod["metadata"]["name"], (pod.get("status") or {}).get("podIP")
            if policy.egress.enabled:
                if not pod_ip:
                    raise SandboxError(f"pod {pod_name} has no IP to register with the egress proxy")
                assert self.egress is not None
                try:
                    bundle = self.egress.register(session_id, pod_ip, policy.egress,
                                                  float(math.ceil(policy.timeouts.session_s) + 1))
                except Exception as e:  # noqa: BLE001 - ClusterEgressError and friends: no egress, no sandbox
                    raise SandboxError(f"the egress proxy refused pod {pod_name} of session {session_id}: {e}") from None
                registered = True
            ws = self._exec(pod_name, kc.agent_command(policy))
            bridge = ExecBridge(ws)
            channel = AgentChannel(bridge.host)
            channel.hello(policy.timeouts.session_s, WATCHDOG_S if policy.runtime == "runsc" else None)
            remaining = max(0.1, deadline - time.monotonic())
            try:
                ready = channel.ready.get(timeout=remaining)
            except Exception:  # queue.Empty
                ready = {"ev": "timeout"}
            if ready.get("ev") != "ready":
                diag = channel.diagnostics.decode("utf-8", "replace")[-1000:]
                channel.close()
                raise SandboxError(f"sandbox agent in pod {pod_name} did not start: "
                                   f"{channel.close_reason or 'no ready event in time'}; {diag}")
            uid, gid = self._template_ids(policy)
            with self._lock:
                self._bridges[name] = bridge
            sb = Sandbox(self, policy, session_id, name, channel, _NoCounters(), None, registered,
                         identity=_PodIdentity(uid, gid), owns_identity=False)
            if bundle:
                self._install_bundle(sb, bundle)
            # The channel's end, whatever caused it (the stream dropped, the pod went away, the agent
            # exited or expired, a frame failed authentication), is the sandbox's end: the claim goes.
            threading.Thread(target=self._watch_channel, args=(sb,), name=f"kube-channel-{name}", daemon=True).start()
            return sb
        except BaseException as e:
            if bridge is not None:
                bridge.close()
            self._delete_claim(name)
            if registered and self.egress is not None:
                self._unregister(session_id)
            if isinstance(e, SandboxError):
                raise
            if isinstance(e, Exception):
                raise SandboxError(f"could not start a cluster sandbox: {type(e).__name__}: {e}") from None
            raise

    def destroy(self, sandbox: Any) -> None:
        sandbox.destroy()

    def list(self) -> list[SandboxInfo]:
        items = self._custom().list_namespaced_custom_object(
            kc.SANDBOX_GROUP, kc.SANDBOX_VERSION, self.ns, CLAIMS,
            label_selector="app.kubernetes.io/managed-by=sandbox").get("items", [])
        out = []
        for c in items:
            meta = c.get("metadata") or {}
            lab = meta.get("labels") or {}
            ok, why = _ready(c)
            out.append(SandboxInfo(id=meta.get("name", ""), session=lab.get(LABEL_SESSION, ""),
                                   policy=lab.get(kc.LABEL_POLICY, ""), state="ready" if ok else why,
                                   owner=lab.get(LABEL_OWNER, ""),
                                   extra={"shutdownTime": str(((c.get("spec") or {}).get("lifecycle") or {}).get("shutdownTime", ""))}))
        return out

    def reap(self, everything: bool = False) -> list[str]:
        """Delete claims this worker made in an earlier life (same host name, other process):
        their channel died with that process. Others' claims are left to their owners and to the
        controller's shutdownTime. ``everything``: every claim this project made in the namespace."""
        host_prefix = self.owner.rsplit("-", 1)[0] + "-"
        removed = []
        for info in self.list():
            mine_before = info.owner.startswith(host_prefix) and info.owner != self.owner
            if everything or mine_before:
                self._delete_claim(info.id)
                removed.append(info.id)
        return removed

    def warm_pool_size(self, policy: Policy, size: int | None = None) -> int:
        """The SandboxWarmPool's replicas, through its /scale subresource."""
        custom = self._custom()
        name = kc.template_name(policy)
        if size is not None:
            if size < 0:
                raise ValueError("warm pool size must be >= 0")
            custom.patch_namespaced_custom_object_scale(kc.SANDBOX_GROUP, kc.SANDBOX_VERSION, self.ns,
                                                        "sandboxwarmpools", name, {"spec": {"replicas": size}})
        scale = custom.get_namespaced_custom_object_scale(kc.SANDBOX_GROUP, kc.SANDBOX_VERSION, self.ns,
                                                          "sandboxwarmpools", name)
        return int((scale.get("spec") or {}).get("replicas") or 0)

    def doctor(self, profile: str | None = None) -> list[Any]:
        """The API checks; with ``profile``, then the canaries in a sandbox claimed here."""
        from sandbox.kube.doctor import run_checks

        return run_checks(self, profile)

    def require_canaries(self, policy: Policy) -> list[Any]:
        """The worker's start-up self-test, in a cluster sandbox (sandbox.kube.doctor)."""
        from sandbox.kube.doctor import require_cluster_canaries

        return require_cluster_canaries(self, policy)

    def gc(self, owner_kind: str | None = None) -> list[str]:
        """What the worker calls at start (Runtime.gc's name): :meth:`reap`."""
        return self.reap()

    # -- what Sandbox calls back (the "runtime" it was made by)
    def log_event(self, what: str, sb: Sandbox) -> None:
        log.warning("cluster sandbox %s session=%s: %s", sb.id, sb.session_id, what)
        if self.event_hook:
            self.event_hook(what, sb)

    def _teardown(self, sb: Sandbox, wait: bool = True, **_: Any) -> None:
        # (wait: on Docker, whether to wait for the engine; a claim deletion is one call either way)
        sb.channel.close()
        with self._lock:
            bridge = self._bridges.pop(sb.id, None)
        if bridge is not None:
            bridge.close()
        self._delete_claim(sb.id)
        if sb.egress:
            self._unregister(sb.session_id)

    # -- helpers
    def _install_bundle(self, sb: Sandbox, bundle: bytes) -> None:
        """The trust bundle of the session (the proxy's roots plus the session CA when a host is
        terminated) into the pod's egress volume, where the CA variables the template sets point
        (the same names and path as on Docker: sandbox.spec.egress_env). Written through the agent,
        before the sandbox is handed out; the bundle is public (certificates only)."""
        argv = ["/bin/sh", "-c", f'd="${{SANDBOX_EGRESS_DIR:-{specmod.EGRESS_MOUNT}}}" && '
                'cat > "$d/.ca-bundle.pem.tmp" && mv -f "$d/.ca-bundle.pem.tmp" "$d/ca-bundle.pem"']
        res = sb.exec(argv, stdin=bundle, timeout=30)
        if res.exit_code != 0:
            sb.destroy()
            raise SandboxError(f"could not install the egress trust bundle in sandbox {sb.id}: "
                               f"{res.error or res.stderr.decode('utf-8', 'replace')[-300:] or res.exit_code}")

    def _watch_channel(self, sb: Sandbox) -> None:
        sb.channel.closed.wait()
        if sb._destroyed:
            return
        if sb.channel.violation:
            what = "channel integrity violation (a frame failed authentication); claim deleted"
        elif sb.channel.expired:
            sb.expired = True
            what = "session time limit reached; claim deleted"
        else:
            what = f"agent channel ended ({sb.channel.close_reason}); claim deleted"
        self.log_event(what, sb)
        sb.destroy()

    def _unregister(self, session_id: str) -> None:
        try:
            assert self.egress is not None
            self.egress.unregister(session_id)
        except Exception as e:  # noqa: BLE001 - teardown continues
            log.warning("egress unregister failed for %s: %s", session_id, e)

    def _template_ids(self, policy: Policy) -> tuple[int, int]:
        u = policy.user
        if isinstance(u.uid, int) and isinstance(u.gid, int):
            return u.uid, u.gid
        return self.config.template_ids(policy.name)

    def _delete_claim(self, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self._custom().delete_namespaced_custom_object(kc.SANDBOX_GROUP, kc.SANDBOX_VERSION, self.ns, CLAIMS, name)
        except ApiException as e:
            if e.status != 404:
                log.warning("could not delete claim %s/%s: %s %s", self.ns, name, e.status, e.reason)
        except Exception as e:  # noqa: BLE001 - the controller's shutdownTime is the second line
            log.warning("could not delete claim %s/%s: %s", self.ns, name, e)

    def _wait_ready(self, name: str, deadline: float) -> dict[str, Any]:
        """Watch the claim until Ready; a deleted claim or the deadline is an error."""
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        custom = self._custom()
        why = "no Ready condition yet"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SandboxError(f"claim {self.ns}/{name} not ready within {self.ready_timeout:.0f}s ({why}); "
                                   "is the warm pool's pod stuck (image, RuntimeClass, SeccompProfile, quota)?")
            # Read it first: a watch names no object that is already gone (a claim the controller
            # deleted before this watch began would otherwise be waited for until the deadline).
            try:
                obj = custom.get_namespaced_custom_object(kc.SANDBOX_GROUP, kc.SANDBOX_VERSION, self.ns, CLAIMS, name)
            except ApiException as e:
                if e.status == 404:
                    raise SandboxError(f"claim {self.ns}/{name} was deleted before it was ready") from None
                raise SandboxError(f"reading claim {self.ns}/{name} failed: {e.status} {e.reason}") from None
            ok, why = _ready(obj)
            if ok:
                return dict(obj)
            w = watch.Watch()
            try:
                for ev in w.stream(custom.list_namespaced_custom_object, kc.SANDBOX_GROUP, kc.SANDBOX_VERSION,
                                   self.ns, CLAIMS, field_selector=f"metadata.name={name}",
                                   resource_version=(obj.get("metadata") or {}).get("resourceVersion"),
                                   timeout_seconds=max(1, int(remaining + 0.999)), _request_timeout=remaining + 5):
                    typ, obj = ev.get("type"), ev.get("object") or {}
                    if typ == "DELETED":
                        raise SandboxError(f"claim {self.ns}/{name} was deleted before it was ready")
                    if typ == "ERROR":
                        break
                    ok, why = _ready(obj)
                    if ok:
                        return obj
                    if time.monotonic() >= deadline:
                        break
            except ApiException as e:
                raise SandboxError(f"watching claim {self.ns}/{name} failed: {e.status} {e.reason}") from None
            finally:
                w.stop()

    def _pod_for(self, claim: dict[str, Any], deadline: float) -> dict[str, Any]:
        uid = (claim.get("metadata") or {}).get("uid", "")
        core = self._core()
        while True:
            listed = core.list_namespaced_pod(self.ns, label_selector=f"{CLAIM_UID_LABEL}={uid}")
            pods = self.api_client.sanitize_for_serialization(listed).get("items") or []
            running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
            if running:
                return running[0]
            if time.monotonic() >= deadline:
                raise SandboxError(f"claim {self.ns}/{claim['metadata']['name']} is ready but no running pod carries "
                                   f"{CLAIM_UID_LABEL}={uid}")
            time.sleep(0.25)

    def _exec(self, pod: str, command: list[str]) -> Any:
        from kubernetes.stream import stream

        return stream(self._core().connect_get_namespaced_pod_exec, pod, self.ns, command=command,
                      container=kc.CONTAINER, stdin=True, stdout=True, stderr=True, tty=False,
                      _preload_content=False, binary=True)
