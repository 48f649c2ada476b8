"""Credential injection on a cluster: the egress proxy in cluster mode, run as its own process
(`python -m sandbox.egress.cluster`, standing for the proxy pod), resolves the policy's
credential sources itself - a variable of ITS environment, a file in ITS --credential-dir - and
injects the value on the upstream side of a terminated host. This test process plays the worker
and the sandbox pod: it never has the value, sends only the policy (names and sources), and the
"pod" (a plain client bound to a pod address on loopback) sees only the session CA's leaf.

The value must reach the upstream and nothing else: not the registration request, not its reply,
not the proxy's logs, not the audit (the proxy's and the worker's copy), not an error message.
Loopback only: the proxy process resolves names through a fixed table to 127.0.0.2."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.egress.cluster import ClusterEgressClient, ClusterEgressError
from sandbox.egress.rules import EgressPolicy
from tests.egress.egress_helpers import ALLOWED_ADDR, recv_all
from tests.egress.tls_helpers import TestCA, TlsTarget
from tests.kube.pod_client import https_from_pod

pytestmark = pytest.mark.timeout(90)

POD_A, POD_B = "127.0.0.5", "127.0.0.6"
TOKEN = "t0ken-" + "7e" * 20
SECRET_ENV = "ghp_CLUSTERSECRETenv0123456789abcdef"
SECRET_FILE = "sk_CLUSTERSECRETfile9876543210fedcba"
SECRET_LOOSE = "sk_CLUSTERSECRETloose55555555555555"
ENV_NAME = "EGRESS_CLUSTER_TEST_TOKEN"
ROOT = Path(__file__).resolve().parents[2]

# The proxy process: the real entry point, with names resolved from a fixed table (loopback only).
_PROXY = f"""
import sys
import sandbox.egress.proxy as p
p.system_resolver = p.StaticResolver({{"allowed.test": ["{ALLOWED_ADDR}"]}})
from sandbox.egress.cluster import main
sys.exit(main(sys.argv[1:]))
"""


class ProxyPod:
    """The cluster proxy as a child process; its environment and files are the "pod's"."""

    def __init__(self, tmp: Path, env_dir: bool = False) -> None:
        self.tmp = tmp
        self.creds = tmp / "proxy-credentials"
        self.creds.mkdir(mode=0o700)
        (self.creds / "api-key").write_text(SECRET_FILE + "\n")
        (self.creds / "api-key").chmod(0o600)
        if env_dir:  # as deployed: the Secret's keys are files, `env:` sources read them there
            (self.creds / ENV_NAME).write_text(SECRET_ENV + "\n")
            (self.creds / ENV_NAME).chmod(0o600)
        (self.creds / "loose").write_text(SECRET_LOOSE + "\n")
        (self.creds / "loose").chmod(0o644)
        self.state = tmp / "proxy-state"
        token = tmp / "admin-token"
        token.write_text(TOKEN + "\n")
        token.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC", "SANDBOX_"))}
        extra = ["--credential-env-dir", str(self.creds)] if env_dir else []
        if not env_dir:
            env[ENV_NAME] = SECRET_ENV  # only the proxy's environment has it
        env["SANDBOX_EGRESS_LOOP"] = "asyncio"
        self.stderr_path = tmp / "proxy.log"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _PROXY, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
             "--token-file", str(token), "--state-dir", str(self.state), "--credential-dir", str(self.creds), *extra],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr)
        end = time.monotonic() + 30
        m = None
        while time.monotonic() < end and self.proc.poll() is None:
            m = re.search(r"on [\d.]+:(\d+), admin endpoint on [\d.]+:(\d+)", self.logs())
            if m:
                break
            time.sleep(0.05)
        assert m, f"the proxy process did not start: {self.logs()}"
        self.port, self.admin_port = int(m.group(1)), int(m.group(2))
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"

    def logs(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def sessions(self) -> int:
        with urllib.request.urlopen(f"{self.admin_url}/healthz", timeout=5) as r:
            return int(json.loads(r.read())["sessions"])

    def files_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.state.rglob("*") if p.is_file())

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._stderr.close()


class SpyClient(ClusterEgressClient):
    """The worker's client, keeping every request body it sends to the proxy."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.sent: list[str] = []
        self.replies: list[str] = []

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None, base: str | None = None) -> dict[str, Any]:
        self.sent.append(f"{method} {path} {json.dumps(body)}")
        reply = super()._call(method, path, body, base)
        self.replies.append(json.dumps(reply))
        return reply


@pytest.fixture(params=["proxy-environment", "credential-env-dir"])
def pod(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ProxyPod]:
    p = ProxyPod(tmp_path, env_dir=request.param == "credential-env-dir")
    yield p
    p.close()


def policy(t: TlsTarget, ca_file: Path, source: dict[str, Any], credential: dict[str, Any] | None = None) -> EgressPolicy:
    rule: dict[str, Any] = {"host": "allowed.test", "ports": [t.port], "tls_ports": [t.port],
                            "upstream_ca": str(ca_file), "credential": credential or {"name": "gh"}}
    return EgressPolicy.model_validate({"rules": [rule], "allow_cidrs": [f"{t.addr}/32"],
                                        "credentials": {(credential or {"name": "gh"})["name"]: source}})




def test_the_proxy_pod_injects_credentials_it_resolves_itself_and_the_worker_never_holds_a_value(
        pod: ProxyPod, upstream: TlsTarget, up_ca: TestCA, tmp_path: Path) -> None:
    assert ENV_NAME not in os.environ  # the worker's side never had the value
    ca_file = up_ca.write(tmp_path / "upstream-ca.pem")  # read by the proxy process, in its "pod"
    client = SpyClient(pod.admin_url, TOKEN, mirror_dir=tmp_path / "worker-egress")
    bundle_a = client.register("sess_env", POD_A, policy(upstream, ca_file, {"env": ENV_NAME}), ttl_s=600)
    bundle_b = client.register("sess_file", POD_B, policy(
        upstream, ca_file, {"file": str(pod.creds / "api-key")},
        {"name": "apikey", "header": "X-Api-Key", "format": "{secret}"}), ttl_s=600)
    try:
        ra = https_from_pod(pod.port, POD_A, bundle_a, upstream.port, "/user", extra="Authorization: Bearer sandbox-own\r\n")
        rb = https_from_pod(pod.port, POD_B, bundle_b, upstream.port, "/user")
        assert ra.status == 200 and rb.status == 200
        assert [s.header("authorization") for s in upstream.requests].count([f"Bearer {SECRET_ENV}"]) == 1
        assert [s.header("x-api-key") for s in upstream.requests].count([SECRET_FILE]) == 1
        assert "sandbox-own" not in b"".join(s.head for s in upstream.requests).decode()  # replaced, not passed on
        end = time.monotonic() + 10
        while len(client.records("sess_env")) + len(client.records("sess_file")) < 2 and time.monotonic() < end:
            time.sleep(0.05)
    finally:
        client.unregister("sess_env")
        client.unregister("sess_file")
    recs = client.records("sess_env") + client.records("sess_file")
    assert sorted((r["credential"], r["tls"], r["status"]) for r in recs) == [
        ("apikey", "terminated", 200), ("gh", "terminated", 200)]
    worker_copy = "".join(p.read_text() for p in (tmp_path / "worker-egress").rglob("*") if p.is_file())
    for secret in (SECRET_ENV, SECRET_FILE):
        for where, text in (("a registration request", "\n".join(client.sent)),
                            ("a registration reply", "\n".join(client.replies)),
                            ("what the pod received", (ra.raw + rb.raw).decode("latin-1")),
                            ("the proxy's logs", pod.logs()), ("the proxy's audit", pod.files_text()),
                            ("the worker's copy of the audit", worker_copy)):
            assert secret not in text, f"the value reached {where}"
    assert ENV_NAME in "\n".join(client.sent)  # what did travel: the source's name


def test_a_source_the_proxy_pod_cannot_read_refuses_the_registration_naming_the_credential(
        pod: ProxyPod, upstream: TlsTarget, up_ca: TestCA, tmp_path: Path) -> None:
    ca_file = up_ca.write(tmp_path / "upstream-ca.pem")
    outside = tmp_path / "outside-key"
    outside.write_text(SECRET_FILE)
    outside.chmod(0o600)
    client = ClusterEgressClient(pod.admin_url, TOKEN)
    cases = [
        ({"env": "EGRESS_CLUSTER_NOT_SET"}, r"credential 'gh' \(env EGRESS_CLUSTER_NOT_SET\): the variable is not "
                                            r"set in the egress proxy's pod"),
        ({"file": str(pod.creds / "absent")}, rf"credential 'gh' \(file {re.escape(str(pod.creds))}/absent\): no such file"),
        ({"file": str(pod.creds / "loose")}, r"credential 'gh' \(file .*/loose\): readable or writable by group or others"),
        ({"file": str(outside)}, r"credential 'gh' \(file .*/outside-key\): the egress proxy reads credential files "
                                 r"only under its --credential-dir"),
        ({"file": str(pod.creds / ".." / "outside-key")}, r"only under its --credential-dir"),
        ({"command": ["cat", str(pod.creds / "api-key")]}, r"credential 'gh' \(command cat\): the egress proxy runs "
                                                           r"no credential commands"),
    ]
    for source, why in cases:
        with pytest.raises(ClusterEgressError, match=why) as err:
            client.register("sess_bad", POD_A, policy(upstream, ca_file, source), ttl_s=60)
        for secret in (SECRET_ENV, SECRET_FILE, SECRET_LOOSE):
            assert secret not in str(err.value)
    assert pod.sessions() == 0
    # nothing is served to the pod it was meant for: not one byte
    with socket.socket() as s:
        s.bind((POD_A, 0))
        s.settimeout(5)
        try:
            s.connect(("127.0.0.1", pod.port))
            s.sendall(b"CONNECT allowed.test:443 HTTP/1.1\r\n\r\n")
            assert recv_all(s) == b""
        except (BrokenPipeError, ConnectionResetError):
            pass
    assert not upstream.received_any
    for secret in (SECRET_ENV, SECRET_FILE, SECRET_LOOSE):
        assert secret not in pod.logs() and secret not in pod.files_text()


def test_a_session_whose_credential_is_missing_fails_to_start_on_the_backend_and_leaves_no_claim(
        pod: ProxyPod, upstream: TlsTarget, up_ca: TestCA, tmp_path: Path) -> None:
    from sandbox.kube.backend import KubeBackend
    from sandbox.kube.config import config_from_dict
    from sandbox.kube.degradations import KNOWN_IDS
    from sandbox.policy import load_policy
    from tests.kube.fake_apiserver import FakeCluster, api_client

    token_file = tmp_path / "worker-admin-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o400)
    cfg = config_from_dict({"accept": {k: "accepted in this test on purpose" for k in KNOWN_IDS},
                            "egress_proxy": {"cluster_ip": "10.96.0.53", "admin_url": pod.admin_url,
                                             "admin_token_file": str(token_file)}})
    base = load_policy("python-packages")
    ca_file = up_ca.write(tmp_path / "upstream-ca.pem")
    pol = base.model_copy(update={"egress": policy(upstream, ca_file, {"env": "EGRESS_CLUSTER_NOT_SET"})})
    api = FakeCluster(tmp_path / "k8s")
    try:
        b = KubeBackend(cfg, api_client=api_client(api.url), ready_timeout=30)
        with pytest.raises(Exception, match=r"egress proxy refused pod .*credential 'gh' \(env EGRESS_CLUSTER_NOT_SET\)"):
            b.create(pol, session_id="sess_nocred")
        assert not api.claims and pod.sessions() == 0
        # the same policy with a source the proxy's pod has: the session starts
        ok = base.model_copy(update={"egress": policy(upstream, ca_file, {"env": ENV_NAME})})
        sb = b.create(ok, session_id="sess_cred")
        try:
            assert pod.sessions() == 1
        finally:
            sb.destroy()
        assert not api.claims and pod.sessions() == 0
    finally:
        api.close()
