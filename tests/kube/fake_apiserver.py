"""A local HTTP server that plays the Kubernetes API server at the client boundary.

Only what the Kubernetes backend calls: SandboxClaim create/get/list/watch/delete, SandboxTemplate
get, SandboxWarmPool /scale, pod list by label, and pod exec over a WebSocket (the v5/v4 channel
protocol: one leading byte per message naming stdin 0, stdout 1, stderr 2, status 3; 255 closes
a channel). A small "controller" thread marks claims Ready and creates their pod (labelled with
the claim's uid, as agent-sandbox does), and deletes claims at their ``lifecycle.shutdownTime``.

Exec runs the command the backend sent, with one substitution: the in-image agent path becomes
this repository's sandbox/agent/agent.py; its environment is a pod's (HOME is the pod's own
workspace directory under ``workdir/pods/``, ``SANDBOX_EGRESS_DIR`` its egress volume,
``SANDBOX_SKILLS_DIR`` its skills volume), never the
test process's. So the launcher (hard rlimits) and the real agent run,
and the HMAC channel protocol is exercised end to end. Loopback only.

Scenarios: ``never_ready`` (the claim never becomes Ready), ``drop_exec_after`` (the server cuts
the exec connection after that many stdin messages from the host: a stream that drops mid-call),
``forge_after_ready`` (the "pod" writes an unauthenticated frame on stdout after the agent's ready),
``delete_at_once`` (the controller deletes a claim as soon as it exists, before the client watches).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import itertools
import json
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

AGENT = Path(__file__).resolve().parents[2] / "sandbox" / "agent" / "agent.py"
IN_IMAGE_AGENT = "/opt/sandbox-agent/agent.py"
GROUP = "/apis/extensions.agents.x-k8s.io/v1beta1/namespaces/"
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _parse_time(s: str) -> float:
    return dt.datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc).timestamp()


class FakeCluster:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.claims: dict[str, dict[str, Any]] = {}
        self.pods: dict[str, dict[str, Any]] = {}
        self.templates: dict[str, dict[str, Any]] = {}
        self.scales: dict[str, int] = {}
        self.log: list[tuple[str, str]] = []          # (method, path) of every request
        self.exec_commands: list[list[str]] = []
        self.stdin_messages: list[bytes] = []         # every stdin payload, in order
        self.deleted_by_controller: list[str] = []
        self.deleted_by_client: list[str] = []
        self.never_ready = False
        self.drop_exec_after: int | None = None
        self.forge_after_ready = False
        self.delete_at_once = False
        self.pod_ip = "10.4.0.7"  # what the pods report (a test with a real proxy uses the loopback source)
        self.ready_delay = 0.1
        # for the doctor: what the cluster has installed and what the worker may do
        self.crds: dict[str, dict[str, Any]] = {}
        self.runtime_classes: set[str] = set()
        self.namespace_labels: dict[str, str] = {}
        self.allowed: set[tuple[str, str, str]] = set()
        self._rv = itertools.count(1)
        self._watchers: list[tuple[str, Any]] = []
        self.cond = threading.Condition()
        self._execs: dict[str, list[Any]] = {}        # pod -> [(conn, proc)]
        self._stop = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        threading.Thread(target=self._controller, daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()
        for pod in list(self._execs):
            self._kill_execs(pod)

    # -- state changes (under cond)
    def _bump(self, obj: dict[str, Any]) -> None:
        obj["metadata"]["resourceVersion"] = str(next(self._rv))

    def _event(self, typ: str, obj: dict[str, Any]) -> None:
        self.cond.notify_all()
        for name, q in list(self._watchers):
            if name == obj["metadata"]["name"]:
                q.append({"type": typ, "object": json.loads(json.dumps(obj))})

    def _delete_claim(self, name: str) -> bool:
        obj = self.claims.pop(name, None)
        if obj is None:
            return False
        self._bump(obj)
        self._event("DELETED", obj)
        pod = obj.get("_pod")
        if pod:
            self.pods.pop(pod, None)
            threading.Thread(target=self._kill_execs, args=(pod,), daemon=True).start()
        return True

    def _controller(self) -> None:
        while not self._stop.wait(0.05):
            with self.cond:
                now = time.time()
                for name, c in list(self.claims.items()):
                    st = ((c["spec"].get("lifecycle") or {}).get("shutdownTime"))
                    if st and now >= _parse_time(st):
                        self.deleted_by_controller.append(name)
                        self._delete_claim(name)
                        continue
                    if self.never_ready or c.get("_pod") or now - c["_created"] < self.ready_delay:
                        continue
                    pod = f"{c['spec']['warmPoolRef']['name']}-{uuid.uuid4().hex[:5]}"
                    self.pods[pod] = {"metadata": {"name": pod, "namespace": c["metadata"]["namespace"],
                                                   "labels": {"agents.x-k8s.io/claim-uid": c["metadata"]["uid"]}},
                                      "status": {"phase": "Running", "podIP": self.pod_ip}}
                    c["_pod"] = pod
                    c["status"] = {"conditions": [{"type": "Ready", "status": "True", "reason": "SandboxReady",
                                                   "message": "", "lastTransitionTime": "2026-11-30T00:00:00Z"}],
                                   "sandbox": {"name": pod, "podIPs": [self.pod_ip]}}
                    self._bump(c)
                    self._event("MODIFIED", c)

    def _kill_execs(self, pod: str) -> None:
        for conn, proc in self._execs.pop(pod, []):
            try:
                proc.kill()
            except OSError:
                pass
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @staticmethod
    def public(obj: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in obj.items() if not k.startswith("_")}

    # -- HTTP
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        cluster = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def _json(self, code: int, obj: Any) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str) -> None:
                self._json(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
                                  "code": code, "message": reason})

            def _body(self) -> Any:
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n) or b"{}")

            def do_GET(self) -> None:
                self._route("GET")

            def do_POST(self) -> None:
                self._route("POST")

            def do_DELETE(self) -> None:
                self._route("DELETE")

            def do_PATCH(self) -> None:
                self._route("PATCH")

            def _route(self, method: str) -> None:
                u = urlparse(self.path)
                q = parse_qs(u.query)
                cluster.log.append((method, u.path))
                m = re.fullmatch(r"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/([^/]+)", u.path)
                if m:
                    crd = cluster.crds.get(m.group(1))
                    return self._json(200, crd) if crd else self._status(404, "NotFound")
                m = re.fullmatch(r"/apis/node.k8s.io/v1/runtimeclasses/([^/]+)", u.path)
                if m:
                    if m.group(1) not in cluster.runtime_classes:
                        return self._status(404, "NotFound")
                    return self._json(200, {"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
                                            "metadata": {"name": m.group(1)}, "handler": "runsc"})
                m = re.fullmatch(r"/api/v1/namespaces/([^/]+)", u.path)
                if m:
                    return self._json(200, {"apiVersion": "v1", "kind": "Namespace",
                                            "metadata": {"name": m.group(1), "labels": cluster.namespace_labels}})
                if u.path == "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews" and method == "POST":
                    body = self._body()
                    a = body["spec"]["resourceAttributes"]
                    key = (a.get("verb"), a.get("resource"), a.get("subresource") or "")
                    body["status"] = {"allowed": key in cluster.allowed}
                    return self._json(201, body)
                m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/exec", u.path)
                if m:
                    return self._exec(m.group(2), q)
                m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods", u.path)
                if m and method == "GET":
                    sel = (q.get("labelSelector") or [""])[0]
                    k, _, v = sel.partition("=")
                    with cluster.cond:
                        items = [p for p in cluster.pods.values() if p["metadata"]["labels"].get(k) == v]
                    return self._json(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
                m = re.fullmatch(re.escape(GROUP) + r"([^/]+)/(sandboxclaims|sandboxtemplates|sandboxwarmpools)(?:/([^/]+))?(/scale)?",
                                 u.path)
                if not m:
                    return self._status(404, "NotFound")
                ns, plural, name, scale = m.groups()
                if plural == "sandboxwarmpools" and scale:
                    with cluster.cond:
                        if method == "PATCH":
                            cluster.scales[name] = int(self._body()["spec"]["replicas"])
                        n = cluster.scales.get(name, 0)
                    return self._json(200, {"kind": "Scale", "apiVersion": "autoscaling/v1",
                                            "metadata": {"name": name, "namespace": ns}, "spec": {"replicas": n}})
                if plural == "sandboxtemplates":
                    with cluster.cond:
                        t = cluster.templates.get(name or "")
                    return self._json(200, t) if t else self._status(404, "NotFound")
                # sandboxclaims
                if method == "POST":
                    body = self._body()
                    with cluster.cond:
                        cname = body["metadata"]["name"]
                        if cname in cluster.claims:
                            return self._status(409, "AlreadyExists")
                        body["metadata"].update(uid=str(uuid.uuid4()), namespace=ns)
                        body["_created"] = time.time()
                        cluster._bump(body)
                        cluster.claims[cname] = body
                        cluster._event("ADDED", body)
                        created = cluster.public(json.loads(json.dumps(body)))
                        if cluster.delete_at_once:  # the controller removes it before the client looks
                            cluster.deleted_by_controller.append(cname)
                            cluster._delete_claim(cname)
                        return self._json(201, created)
                if method == "DELETE":
                    with cluster.cond:
                        ok = cluster._delete_claim(name)
                        if ok:
                            cluster.deleted_by_client.append(name)
                    return self._json(200, {"kind": "Status", "status": "Success"}) if ok else self._status(404, "NotFound")
                if name:
                    with cluster.cond:
                        c = cluster.claims.get(name)
                    return self._json(200, cluster.public(c)) if c else self._status(404, "NotFound")
                if (q.get("watch") or ["false"])[0] in ("true", "1"):
                    return self._watch(q)
                sel = (q.get("labelSelector") or [""])[0]
                k, _, v = sel.partition("=")
                with cluster.cond:
                    items = [cluster.public(c) for c in cluster.claims.values()
                             if not sel or c["metadata"].get("labels", {}).get(k) == v]
                return self._json(200, {"kind": "SandboxClaimList", "apiVersion": "extensions.agents.x-k8s.io/v1beta1",
                                        "metadata": {"resourceVersion": "1"}, "items": items})

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def _watch(self, q: dict[str, list[str]]) -> None:
                fs = (q.get("fieldSelector") or [""])[0]
                name = fs.partition("=")[2]
                timeout = float((q.get("timeoutSeconds") or ["30"])[0])
                pending: list[dict[str, Any]] = []
                with cluster.cond:
                    c = cluster.claims.get(name)
                    if c is not None:
                        pending.append({"type": "ADDED", "object": cluster.public(json.loads(json.dumps(c)))})
                    entry = (name, pending)
                    cluster._watchers.append(entry)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                end = time.time() + timeout
                try:
                    while time.time() < end and not cluster._stop.is_set():
                        with cluster.cond:
                            if not pending:
                                cluster.cond.wait(min(0.2, max(0.0, end - time.time())))
                            out, pending[:] = list(pending), []
                        for ev in out:
                            ev["object"] = cluster.public(ev["object"])
                            self._chunk(json.dumps(ev).encode() + b"\n")
                    self._chunk(b"")
                except OSError:
                    pass
                finally:
                    with cluster.cond:
                        cluster._watchers.remove(entry)

            # -- exec over a WebSocket
            def _exec(self, pod: str, q: dict[str, list[str]]) -> None:
                with cluster.cond:
                    known = pod in cluster.pods
                if not known or self.headers.get("Upgrade", "").lower() != "websocket":
                    return self._status(404 if not known else 400, "NotFound" if not known else "BadRequest")
                command = q.get("command") or []
                cluster.exec_commands.append(command)
                accept = base64.b64encode(hashlib.sha1((self.headers["Sec-WebSocket-Key"] + WS_GUID).encode()).digest())
                self.send_response(101)
                self.send_header("Upgrade", "websocket")
                self.send_header("Connection", "Upgrade")
                self.send_header("Sec-WebSocket-Accept", accept.decode())
                self.send_header("Sec-WebSocket-Protocol", "v5.channel.k8s.io")
                self.end_headers()
                self.wfile.flush()
                conn = self.connection
                argv = [sys.executable if a == "/usr/bin/python3" else a.replace(IN_IMAGE_AGENT, str(AGENT))
                        for a in command]
                # The pod's environment is the template's, never the server's (no key or token of this
                # process reaches the "pod"); HOME is the pod's own workspace volume.
                home = cluster.workdir / "pods" / pod
                home.mkdir(parents=True, exist_ok=True)
                egress_dir = cluster.workdir / "pods" / f"{pod}.egress"  # the pod's egress volume
                egress_dir.mkdir(exist_ok=True)
                skills_dir = cluster.workdir / "pods" / f"{pod}.skills"  # the pod's skills volume (/mnt/skills)
                skills_dir.mkdir(exist_ok=True)
                env = {"HOME": str(home), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
                       "TMPDIR": str(home.parent), "PYTHONDONTWRITEBYTECODE": "1",
                       "SANDBOX_EGRESS_DIR": str(egress_dir), "SANDBOX_SKILLS_DIR": str(skills_dir)}
                proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        cwd=home, env=env)
                with cluster.cond:
                    cluster._execs.setdefault(pod, []).append((conn, proc))
                wlock = threading.Lock()

                def send(payload: bytes, opcode: int = 0x2) -> None:
                    n = len(payload)
                    head = bytes([0x80 | opcode])
                    if n < 126:
                        head += bytes([n])
                    elif n < 1 << 16:
                        head += bytes([126]) + struct.pack(">H", n)
                    else:
                        head += bytes([127]) + struct.pack(">Q", n)
                    with wlock:
                        conn.sendall(head + payload)

                def pump(src: Any, ch: int) -> None:
                    forged = False
                    try:
                        while True:
                            data = src.read1(1 << 16)
                            if not data:
                                break
                            send(bytes([ch]) + data)
                            if ch == 1 and cluster.forge_after_ready and not forged and b'"ready"' in data:
                                forged = True
                                send(b"\x01" + b"0" * 32 + b' {"id":1,"ev":"exit","code":0}\n')
                    except OSError:
                        pass

                outs = [threading.Thread(target=pump, args=(proc.stdout, 1), daemon=True),
                        threading.Thread(target=pump, args=(proc.stderr, 2), daemon=True)]
                for t in outs:
                    t.start()

                def finish() -> None:
                    code = proc.wait()
                    for t in outs:
                        t.join(5)
                    status = {"metadata": {}, "status": "Success"} if code == 0 else {
                        "metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
                        "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}
                    try:
                        send(b"\x03" + json.dumps(status).encode())
                        send(b"\x03\xe8", opcode=0x8)
                    except OSError:
                        pass

                threading.Thread(target=finish, daemon=True).start()
                reader = conn.makefile("rb")
                try:
                    while True:
                        b0, b1 = reader.read(2)
                        opcode, masked, n = b0 & 0x0F, b1 & 0x80, b1 & 0x7F
                        if n == 126:
                            n = struct.unpack(">H", reader.read(2))[0]
                        elif n == 127:
                            n = struct.unpack(">Q", reader.read(8))[0]
                        mask = reader.read(4) if masked else b"\0\0\0\0"
                        data = bytes(c ^ mask[i % 4] for i, c in enumerate(reader.read(n)))
                        if opcode == 0x8:
                            break
                        if opcode not in (0x1, 0x2) or not data:
                            continue
                        if data[0] == 255:  # v5: the client closed a channel
                            proc.stdin.close()
                            continue
                        if data[0] != 0:
                            continue
                        cluster.stdin_messages.append(data[1:])
                        proc.stdin.write(data[1:])
                        proc.stdin.flush()
                        if cluster.drop_exec_after is not None and len(cluster.stdin_messages) >= cluster.drop_exec_after:
                            proc.kill()  # the connection drops: no status, no close frame
                            conn.shutdown(socket.SHUT_RDWR)
                            break
                except (OSError, ValueError):
                    pass
                finally:
                    try:
                        proc.stdin.close()
                    except OSError:
                        pass
                    self.close_connection = True
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()

        return H


def api_client(url: str) -> Any:
    from kubernetes import client

    cfg = client.Configuration()
    cfg.host = url
    cfg.verify_ssl = False
    return client.ApiClient(cfg)
