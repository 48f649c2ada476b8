"""Several egress proxy replicas on a cluster, as real processes through the real entry point
(`python -m sandbox.egress.cluster`, each standing for one proxy pod) on loopback: the worker's
client registers each session with every replica; a "pod" (a client bound to 127.0.0.5/6) reaches
whichever replica the Service would pick (here: the test picks), and is served by either; a
replica that restarts or appears gets the live sessions again; a replica that lacks a pod's
registration refuses it (deny by default); the session CA is the worker's, the same on every
replica; each decision reaches the session's trail exactly once; no admin token, CA key or
credential value in a log, a reply, an error or the proxy's files. Loopback only: the proxies
resolve names through a fixed table to 127.0.0.2/3."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sandbox.egress.audit import session_file
from sandbox.egress.cluster import ClusterEgressClient, ClusterEgressError, dns_endpoints
from sandbox.egress.rules import EgressPolicy
from tests.egress.egress_helpers import ALLOWED_ADDR, OTHER_ADDR, Target
from tests.egress.tls_helpers import TestCA, TlsTarget
from tests.kube.pod_client import get_from_pod, https_from_pod

pytestmark = pytest.mark.timeout(120)

POD_A, POD_B = "127.0.0.5", "127.0.0.6"
TOKEN = "t0ken-" + "5d" * 20
SECRET = "ghp_HAREPLICASECRET0123456789abcdef"
ENV_NAME = "EGRESS_HA_TEST_TOKEN"
ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"

_PROXY = f"""
import sys
import sandbox.egress.proxy as p
p.system_resolver = p.StaticResolver({{"allowed.test": ["{ALLOWED_ADDR}"], "other.test": ["{OTHER_ADDR}"]}})
from sandbox.egress.cluster import main
sys.exit(main(sys.argv[1:]))
"""


class Replica:
    """One proxy pod: a child process with its own state dir, environment and log; restartable on
    the same ports (a container restart) with a fresh process (an empty session table)."""

    def __init__(self, tmp: Path, name: str, env: dict[str, str] | None = None, drain: tuple[float, float] = (0, 0),
                 tls: tuple[Path, Path] | None = None) -> None:
        self.tmp, self.name, self.extra_env, self.drain, self.tls = tmp / name, name, env or {}, drain, tls
        self.tmp.mkdir()
        self.token = self.tmp / "admin-token"
        self.token.write_text(TOKEN + "\n")
        self.token.chmod(0o600)
        self.port = self.admin_port = 0
        self.runs = 0
        self.log_text = ""
        self.start()

    def start(self) -> None:
        self.runs += 1
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC", "SANDBOX_", "EGRESS_HA"))}
        env.update(self.extra_env, SANDBOX_EGRESS_LOOP="asyncio")
        self.log_path = self.tmp / f"proxy-{self.runs}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _PROXY, "--listen", f"127.0.0.1:{self.port}", "--admin-listen",
             f"127.0.0.1:{self.admin_port}", "--token-file", str(self.token), "--state-dir", str(self.tmp / "state"),
             "--drain-seconds", str(self.drain[0]), "--drain-fetch-seconds", str(self.drain[1]),
             *(["--admin-tls-cert", str(self.tls[0]), "--admin-tls-key", str(self.tls[1])] if self.tls else [])],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log)
        end, m = time.monotonic() + 30, None
        while time.monotonic() < end and self.proc.poll() is None and not m:
            m = re.search(r"on [\d.]+:(\d+), admin endpoint on [\d.]+:(\d+)", self.log_path.read_text(errors="replace"))
            time.sleep(0.05)
        assert m, f"replica {self.name} did not start: {self.log_path.read_text(errors='replace')}"
        self.port, self.admin_port = int(m.group(1)), int(m.group(2))

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.admin_port}"

    def health(self) -> dict[str, Any]:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # (the kubelet's probe does not verify either)
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=5, context=ctx if self.tls else None) as r:
                return dict(json.loads(r.read()))
        except urllib.error.HTTPError as e:
            return dict(json.loads(e.read()))

    def sessions(self) -> int:
        return int(self.health()["sessions"])

    def stop(self, sig: int = signal.SIGKILL, wait: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(wait)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(5)
        self._log.close()
        self.log_text += self.log_path.read_text(errors="replace")
        return rc

    def logs_and_files(self) -> str:
        live = "" if self._log.closed else self.log_path.read_text(errors="replace")
        files = "".join(p.read_text(errors="replace") for p in (self.tmp / "state").rglob("*") if p.is_file())
        return self.log_text + live + files

    def get(self, src: str, url: str) -> Any:
        """A plain HTTP request from pod address ``src`` through this replica."""
        return get_from_pod(self.port, src, url)

    def https(self, src: str, bundle: bytes, port: int, path: str = "/") -> Any:
        """What a sandbox pod does for a terminated host: CONNECT, then TLS trusting its one bundle."""
        return https_from_pod(self.port, src, bundle, port, path)


class SpyClient(ClusterEgressClient):
    """The worker's client, keeping every reply and error the proxies gave it."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.replies: list[str] = []

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None, base: str | None = None) -> dict[str, Any]:
        try:
            reply = super()._call(method, path, body, base)
        except ClusterEgressError as e:
            self.replies.append(str(e))
            raise
        self.replies.append(json.dumps(reply))
        return reply


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[Callable[..., Replica]]:
    made: list[Replica] = []

    def make(name: str, **kw: Any) -> Replica:
        r = Replica(tmp_path, name, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.stop()


@pytest.fixture
def http_target() -> Iterator[Target]:
    t = Target(ALLOWED_ADDR).start()
    yield t
    t.close()


@pytest.fixture
def other_target() -> Iterator[Target]:
    t = Target(OTHER_ADDR).start()
    yield t
    t.close()


def http_policy(t: Target, host: str = "allowed.test") -> EgressPolicy:
    return EgressPolicy.model_validate({"rules": [{"host": host, "ports": [t.port]}], "allow_cidrs": [f"{t.addr}/32"]})


def tls_policy(t: TlsTarget, ca_file: Path) -> EgressPolicy:
    return EgressPolicy.model_validate({"rules": [{"host": "allowed.test", "ports": [t.port], "tls_ports": [t.port],
                                                   "terminate": True, "upstream_ca": str(ca_file)}],
                                        "allow_cidrs": [f"{t.addr}/32"]})


def wait_for(cond: Callable[[], Any], what: str, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def trail(mirror: Path, sid: str) -> list[dict[str, Any]]:
    path = session_file(mirror / "audit.jsonl", sid)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def paths(recs: list[dict[str, Any]]) -> list[str]:
    return sorted(str(r.get("path")) for r in recs)


def no_secret(texts: dict[str, str], secrets: list[str]) -> None:
    for secret in secrets:
        assert secret, "an empty secret checks nothing"
        for where, text in texts.items():
            assert secret not in text, f"a secret reached {where}"


def test_a_session_registered_with_both_replicas_is_served_by_either_and_each_decision_reaches_the_trail_once(
        replicas: Callable[..., Replica], http_target: Target, tmp_path: Path) -> None:
    r1, r2 = replicas("r1"), replicas("r2")
    client = SpyClient([r1.url, r2.url], TOKEN, mirror_dir=tmp_path / "mirror")
    try:
        client.register("sess_a", POD_A, http_policy(http_target), ttl_s=600)
        assert r1.sessions() == 1 and r2.sessions() == 1
        for i in range(3):  # the Service spreads the pod's connections over both replicas
            assert r1.get(POD_A, f"http://allowed.test:{http_target.port}/r1-{i}").status == 200
            assert r2.get(POD_A, f"http://allowed.test:{http_target.port}/r2-{i}").status == 200
        # the other pod address is nobody's: refused by both, before a byte
        assert r1.get(POD_B, f"http://allowed.test:{http_target.port}/x").raw == b""
        assert r2.get(POD_B, f"http://allowed.test:{http_target.port}/x").raw == b""
        wait_for(lambda: len(trail(tmp_path / "mirror", "sess_a")) >= 4, "some decisions copied while live")
        assert r2.get(POD_A, f"http://allowed.test:{http_target.port}/last").status == 200  # comes with the unregistration
    finally:
        client.unregister("sess_a")
        client.close()
    want = sorted([f"/r1-{i}" for i in range(3)] + [f"/r2-{i}" for i in range(3)] + ["/last"])
    assert paths(trail(tmp_path / "mirror", "sess_a")) == want  # every decision, once, from both replicas
    assert r1.sessions() == 0 and r2.sessions() == 0
    assert len(http_target.requests) == 7
    no_secret({"a reply or error": "\n".join(client.replies), "r1's logs/files": r1.logs_and_files(),
               "r2's logs/files": r2.logs_and_files()}, [TOKEN])


def test_the_session_ca_is_the_workers_and_the_same_on_every_replica_even_after_a_restart(
        replicas: Callable[..., Replica], upstream: TlsTarget, up_ca: TestCA, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    r1, r2 = replicas("r1"), replicas("r2")
    ca_file = up_ca.write(tmp_path / "upstream-ca.pem")
    client = SpyClient([r1.url, r2.url], TOKEN, mirror_dir=tmp_path / "mirror")
    try:
        bundle = client.register("sess_tls", POD_A, tls_policy(upstream, ca_file), ttl_s=600)
        reg = client._regs["sess_tls"]
        assert reg.ca is not None
        ca_key = reg.ca.key_pem().decode()
        key_body = "".join(ca_key.splitlines()[1:-1])
        assert bundle.count(reg.ca.pem) == 1  # one session CA in the pod's bundle, the worker's
        # the pod's one bundle verifies the leaf of whichever replica answers
        assert r1.https(POD_A, bundle, upstream.port, "/one").status == 200
        assert r2.https(POD_A, bundle, upstream.port, "/two").status == 200
        wait_for(lambda: len(trail(tmp_path / "mirror", "sess_tls")) == 2, "both decisions copied")
        # r2 restarts (a new process: an empty table): the worker registers the session there again,
        # with the same CA, so the bundle the pod already has still verifies
        r2.stop()
        r2.start()
        wait_for(lambda: r2.sessions() == 1, "the restarted replica to get the live session again")
        assert r2.https(POD_A, bundle, upstream.port, "/three").status == 200
        assert r1.https(POD_A, bundle, upstream.port, "/four").status == 200
    finally:
        client.unregister("sess_tls")
        client.close()
    assert paths(trail(tmp_path / "mirror", "sess_tls")) == ["/four", "/one", "/three", "/two"]
    assert len(upstream.requests) == 4
    no_secret({"a reply or error": "\n".join(client.replies), "r1's logs/files": r1.logs_and_files(),
               "r2's logs/files": r2.logs_and_files(), "the worker's log": caplog.text,
               "the worker's copy of the audit": "".join(p.read_text() for p in (tmp_path / "mirror").rglob("*")
                                                         if p.is_file())},
              [TOKEN, key_body])


def test_a_pod_unknown_to_one_replica_is_refused_there_until_the_worker_registers_it(
        replicas: Callable[..., Replica], http_target: Target, tmp_path: Path) -> None:
    r1, r2 = replicas("r1"), replicas("r2")
    only_r1 = ClusterEgressClient([r1.url], TOKEN)  # a worker that does not know r2 (yet)
    try:
        only_r1.register("sess_a", POD_A, http_policy(http_target), ttl_s=600)
        assert r1.get(POD_A, f"http://allowed.test:{http_target.port}/ok").status == 200
        refused = r2.get(POD_A, f"http://allowed.test:{http_target.port}/no")
        assert refused.raw == b"", "a replica without the pod's registration gives it nothing, not a default"
        assert len(http_target.requests) == 1
    finally:
        only_r1.unregister("sess_a")
        only_r1.close()
    # A replica down when the session starts: the session starts on the others (it refuses the pod
    # meanwhile), and the worker registers it there once it answers.
    r2.stop()
    client = ClusterEgressClient([r1.url, r2.url], TOKEN)
    try:
        client.register("sess_b", POD_B, http_policy(http_target), ttl_s=600)
        assert r1.get(POD_B, f"http://allowed.test:{http_target.port}/b1").status == 200
        r2.start()
        wait_for(lambda: r2.sessions() == 1, "the replica that was down to get the session")
        assert r2.get(POD_B, f"http://allowed.test:{http_target.port}/b2").status == 200
        # none answering: no session
        r1.stop()
        r2.stop()
        with pytest.raises(ClusterEgressError, match="no egress proxy replica accepted session sess_c"):
            client.register("sess_c", POD_A, http_policy(http_target), ttl_s=600)
    finally:
        client.close()


def test_a_replica_that_refuses_a_session_fails_its_start_and_no_replica_keeps_it(
        replicas: Callable[..., Replica], upstream: TlsTarget, up_ca: TestCA, tmp_path: Path) -> None:
    # r1's pod has the credential, r2's not (a Secret rotated half-way): the session must not start
    # on r1 alone, whose pods would then work on one replica and fail on the other.
    r1, r2 = replicas("r1", env={ENV_NAME: SECRET}), replicas("r2")
    ca_file = up_ca.write(tmp_path / "upstream-ca.pem")
    pol = EgressPolicy.model_validate({
        "rules": [{"host": "allowed.test", "ports": [upstream.port], "tls_ports": [upstream.port],
                   "upstream_ca": str(ca_file), "credential": {"name": "gh"}}],
        "allow_cidrs": [f"{upstream.addr}/32"], "credentials": {"gh": {"env": ENV_NAME}}})
    client = SpyClient([r1.url, r2.url], TOKEN)
    try:
        with pytest.raises(ClusterEgressError, match=rf"credential 'gh' \(env {ENV_NAME}\): the variable is not set"):
            client.register("sess_cred", POD_A, pol, ttl_s=600)
        assert r1.sessions() == 0 and r2.sessions() == 0
        assert r1.get(POD_A, "http://allowed.test/").raw == b""
    finally:
        client.close()
    no_secret({"a reply or error": "\n".join(client.replies), "r1's logs/files": r1.logs_and_files(),
               "r2's logs/files": r2.logs_and_files()}, [SECRET, TOKEN])


class Link:
    """The network between the worker and one replica's admin port: a loopback relay that can be
    cut (connections refused) and mended on the same address, the replica running on meanwhile."""

    def __init__(self, port: int) -> None:
        self.target, self.port = port, 0
        self.mend()

    def mend(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, args=(self.sock,), daemon=True).start()

    def cut(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked on it: closing alone would not
        self.sock.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self, lsock: socket.socket) -> None:
        while True:
            try:
                c, _ = lsock.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for x in (a, b):
                with contextlib.suppress(OSError):
                    x.shutdown(socket.SHUT_RDWR)


def test_a_replica_that_missed_an_unregistration_is_told_again_and_cuts_the_pod_off(
        replicas: Callable[..., Replica], http_target: Target) -> None:
    r1, r2 = replicas("r1"), replicas("r2")
    link = Link(r2.admin_port)
    client = ClusterEgressClient([r1.url, link.url], TOKEN, timeout=2)
    try:
        client.register("sess_a", POD_A, http_policy(http_target), ttl_s=600)
        assert r2.sessions() == 1
        link.cut()  # the worker cannot reach r2 now; r2 still serves pods
        client.unregister("sess_a")  # r1 forgets it; r2 cannot be told
        assert r1.sessions() == 0 and r2.sessions() == 1
        link.mend()
        wait_for(lambda: r2.sessions() == 0, "the replica that missed the unregistration to be told again")
        assert r2.get(POD_A, f"http://allowed.test:{http_target.port}/after").raw == b""
        time.sleep(1.5)  # and nobody puts it back
        assert r2.sessions() == 0
    finally:
        client.close()
        link.cut()
    assert not http_target.requests


def test_a_replica_that_appears_later_gets_every_live_session(
        replicas: Callable[..., Replica], http_target: Target, tmp_path: Path) -> None:
    r1 = replicas("r1")
    listed = [r1.url]  # what the headless Service's DNS answers, as replicas come and go
    client = ClusterEgressClient([], TOKEN, mirror_dir=tmp_path / "mirror", discover=lambda: list(listed))
    try:
        client.register("sess_a", POD_A, http_policy(http_target), ttl_s=600)
        client.register("sess_b", POD_B, http_policy(http_target), ttl_s=600)
        r2 = replicas("r2")  # scaled up, or the surge pod of a rolling update
        assert r2.get(POD_A, f"http://allowed.test:{http_target.port}/early").raw == b""  # not registered yet: nothing
        listed.append(r2.url)
        wait_for(lambda: r2.sessions() == 2, "the new replica to get both live sessions")
        assert r2.get(POD_A, f"http://allowed.test:{http_target.port}/a").status == 200
        assert r2.get(POD_B, f"http://allowed.test:{http_target.port}/b").status == 200
        listed.remove(r1.url)  # r1 scaled down: the sessions stay on r2
        r1.stop()
        time.sleep(1.5)  # a few polls
        assert r2.get(POD_A, f"http://allowed.test:{http_target.port}/a2").status == 200
    finally:
        client.unregister("sess_a")
        client.unregister("sess_b")
        client.close()
    assert paths(trail(tmp_path / "mirror", "sess_a")) == ["/a", "/a2"]
    assert paths(trail(tmp_path / "mirror", "sess_b")) == ["/b"]
    assert r2.sessions() == 0


def test_an_older_session_put_back_on_a_restarted_replica_never_takes_a_newer_sessions_pod_address(
        replicas: Callable[..., Replica], http_target: Target, other_target: Target) -> None:
    r1 = replicas("r1")
    # Worker 1's pod of sess_old died and the cluster gave its IP to worker 2's new pod, before
    # worker 1 noticed: both workers hold a live registration for one address.
    w1, w2 = ClusterEgressClient([r1.url], TOKEN), ClusterEgressClient([r1.url], TOKEN)
    try:
        w1.register("sess_old", POD_A, http_policy(other_target, "other.test"), ttl_s=600)
        w2.register("sess_new", POD_A, http_policy(http_target), ttl_s=600)
        assert r1.get(POD_A, f"http://allowed.test:{http_target.port}/new").status == 200
        r1.stop()
        r1.start()  # both workers put their sessions back, in whatever order their polls come
        wait_for(lambda: r1.sessions() >= 1, "a session put back")
        for _ in range(8):  # across several polls of both workers: the address stays the newer session's
            assert r1.get(POD_A, f"http://allowed.test:{http_target.port}/new").status == 200
            assert r1.get(POD_A, f"http://other.test:{other_target.port}/old").status == 403
            time.sleep(0.3)
        assert r1.sessions() == 1
    finally:
        for w, sid in ((w1, "sess_old"), (w2, "sess_new")):
            w.close()
            w.unregister(sid)
    assert not other_target.requests


def test_a_replica_stopped_gracefully_serves_on_briefly_and_hands_over_its_last_decisions(
        replicas: Callable[..., Replica], http_target: Target, tmp_path: Path) -> None:
    r1, r2 = replicas("r1", drain=(2.0, 20.0)), replicas("r2")
    client = SpyClient([r1.url, r2.url], TOKEN, mirror_dir=tmp_path / "mirror")
    try:
        client.register("sess_a", POD_A, http_policy(http_target), ttl_s=600)
        r1.proc.send_signal(signal.SIGTERM)  # a rolling update or a node drain
        wait_for(lambda: r1.health().get("draining") is True, "the replica to report draining")
        # not ready (the Service drops it), but a connection that still lands on it is served
        assert r1.get(POD_A, f"http://allowed.test:{http_target.port}/during-drain").status == 200
        assert r2.get(POD_A, f"http://allowed.test:{http_target.port}/other").status == 200
        # a session that starts now is not registered with the draining replica, and starts
        client.register("sess_b", POD_B, http_policy(http_target), ttl_s=600)
        assert r1.stop(signal.SIGTERM, wait=30) == 0  # it exits once its decisions were fetched
        assert "not fetched" not in r1.log_text
        assert paths(trail(tmp_path / "mirror", "sess_a")) == ["/during-drain", "/other"]
        assert r2.get(POD_B, f"http://allowed.test:{http_target.port}/b").status == 200
    finally:
        client.unregister("sess_a")
        client.unregister("sess_b")
        client.close()
    assert paths(trail(tmp_path / "mirror", "sess_a")) == ["/during-drain", "/other"]  # still once each
    assert paths(trail(tmp_path / "mirror", "sess_b")) == ["/b"]


def _admin(r: Replica, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    req = urllib.request.Request(f"{r.url}{path}", method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return dict(json.loads(resp.read()))


def test_a_cursor_into_a_stream_the_replica_no_longer_has_reads_the_new_stream_from_its_start(
        replicas: Callable[..., Replica], http_target: Target) -> None:
    # The replica forgot the session and got it again (its stream numbers anew) between two fetches
    # of a worker: "after 2" of the old stream must not skip the new stream's first decisions.
    r1 = replicas("r1")
    reg = {"pod_ip": POD_A, "policy": http_policy(http_target).model_dump(mode="json"), "ttl_s": 600}
    _admin(r1, "PUT", "/v1/sessions/sess_a", reg)
    for i in range(2):
        assert r1.get(POD_A, f"http://allowed.test:{http_target.port}/old{i}").status == 200
    first = _admin(r1, "GET", "/v1/sessions/sess_a/records?after=0")
    assert first["next"] == 2 and first["stream"]
    _admin(r1, "DELETE", "/v1/sessions/sess_a")
    assert _admin(r1, "PUT", "/v1/sessions/sess_a", reg)["stream"] != first["stream"]
    assert r1.get(POD_A, f"http://allowed.test:{http_target.port}/new").status == 200
    got = _admin(r1, "GET", f"/v1/sessions/sess_a/records?after=2&stream={first['stream']}")
    assert [r["path"] for r in got["records"]] == ["/new"] and got["next"] == 1
    same = _admin(r1, "GET", f"/v1/sessions/sess_a/records?after=1&stream={got['stream']}")
    assert same["records"] == []  # the current stream: from the cursor on
    gone = _admin(r1, "DELETE", f"/v1/sessions/sess_a?after=1&stream={first['stream']}")
    assert [r["path"] for r in gone["records"]] == ["/new"]


def test_the_backend_finds_the_replicas_through_the_headless_service_name(tmp_path: Path) -> None:
    from sandbox.kube.config import config_from_dict

    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    cfg = config_from_dict({"egress_proxy": {"admin_dns": "localhost", "admin_port": 3999,
                                             "admin_token_file": str(token)}}).egress_proxy
    client = ClusterEgressClient.from_config(cfg)
    assert "http://127.0.0.1:3999" in client.endpoints()  # every A (and AAAA) record is a replica
    assert dns_endpoints("localhost", 3999)() == client.endpoints()
    listed = ClusterEgressClient.from_config(config_from_dict({"egress_proxy": {
        "admin_urls": ["http://10.0.0.1:3129", "http://10.0.0.2:3129/"], "admin_token_file": str(token),
        "allow_plain_admin": True}}).egress_proxy)  # (plain HTTP beyond loopback only when allowed by name)
    assert listed.endpoints() == ["http://10.0.0.1:3129", "http://10.0.0.2:3129"]
    with pytest.raises(Exception, match="admin_dns and admin_urls both name the replicas"):
        config_from_dict({"egress_proxy": {"admin_dns": "x.test", "admin_urls": ["http://10.0.0.1:3129"]}})


def test_the_kubernetes_backend_registers_its_pod_with_every_replica_for_the_claims_life(
        replicas: Callable[..., Replica], tmp_path: Path) -> None:
    from sandbox.kube.backend import KubeBackend
    from sandbox.kube.config import config_from_dict
    from sandbox.kube.degradations import KNOWN_IDS
    from sandbox.policy import load_policy
    from tests.kube.fake_apiserver import FakeCluster, api_client

    r1, r2 = replicas("r1"), replicas("r2")
    token = tmp_path / "admin-token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o400)
    cfg = config_from_dict({"accept": {k: "accepted in this test on purpose" for k in KNOWN_IDS},
                            "egress_proxy": {"cluster_ip": "10.96.0.53", "admin_urls": [r1.url, r2.url],
                                             "admin_token_file": str(token)}})
    api = FakeCluster(tmp_path / "k8s")
    b = KubeBackend(cfg, api_client=api_client(api.url), ready_timeout=30, state_dir=tmp_path / "worker-state")
    try:
        sb = b.create(load_policy("python-packages"), session_id="sess_pod")
        try:
            assert r1.sessions() == 1 and r2.sessions() == 1
        finally:
            sb.destroy()
        assert r1.sessions() == 0 and r2.sessions() == 0 and not api.claims
        # one replica refusing (here: the wrong token there) means no sandbox, no claim, and no
        # registration left on the replica that accepted
        r2.stop()
        r2.token.write_text("w" * 40)
        r2.start()
        with pytest.raises(Exception, match="egress proxy refused pod .*401"):
            b.create(load_policy("python-packages"), session_id="sess_refused")
        assert not api.claims and r1.sessions() == 0
    finally:
        b.egress.close()  # type: ignore[union-attr]
        api.close()


def _docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / "proxy.yaml").read_text()) if d]


def test_the_proxy_deployment_runs_several_replicas_that_the_worker_can_each_reach() -> None:
    from sandbox.egress.cluster import parser
    from sandbox.kube.config import config_from_dict

    docs = _docs()
    dep = next(d for d in docs if d["kind"] == "Deployment")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["replicas"] >= 2 and dep["spec"]["strategy"]["type"] == "RollingUpdate"
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pdb = next(d for d in docs if d["kind"] == "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] >= 1 and pdb["spec"]["selector"]["matchLabels"] == labels
    cfg = config_from_dict(yaml.safe_load(yaml.safe_load((DEPLOY / "backend-config.yaml").read_text())["data"]["kube.yaml"]))
    headless = next(d for d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None")
    name, ns = cfg.egress_proxy.admin_dns.split(".")[:2]  # type: ignore[union-attr]
    assert (headless["metadata"]["name"], headless["metadata"]["namespace"]) == (name, ns)
    assert headless["spec"]["selector"] == labels and headless["spec"]["publishNotReadyAddresses"] is True
    assert [p["targetPort"] for p in headless["spec"]["ports"]] == [cfg.egress_proxy.admin_port]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    args = parser().parse_args(c["command"][3:])
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert args.drain_seconds > 0 and args.drain_seconds + args.drain_fetch_seconds < grace


def test_the_worker_fetches_every_sessions_decisions_in_one_request_per_replica_within_a_budget(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, http_target: Target) -> None:
    # One request per replica and poll for all sessions (not one per session: the admin endpoint
    # shares the proxy's event loop with the pods' traffic); a reply carries at most
    # POLL_MAX_RECORDS decisions in all, and a session past the budget gets the rest next time.
    import sandbox.egress.cluster as cl
    from tests.kube.test_egress_cluster import TOKEN as IN_PROCESS_TOKEN
    from tests.kube.test_egress_cluster import Cluster

    monkeypatch.setattr(cl, "POLL_MAX_RECORDS", 3)
    c = Cluster(tmp_path)  # the proxy in this process, for the smaller budget
    client = SpyClient([c.admin_url], IN_PROCESS_TOKEN, mirror_dir=tmp_path / "mirror")
    sids = ["sess_a", "sess_b"]
    try:
        for sid, pod in zip(sids, (POD_A, POD_B), strict=True):
            client.register(sid, pod, http_policy(http_target), ttl_s=600)
        for i in range(4):
            for pod in (POD_A, POD_B):
                assert c.get(pod, f"http://other.test:{http_target.port}/{pod}-{i}").status == 403
        wait_for(lambda: sum(len(trail(tmp_path / "mirror", s)) for s in sids) == 8, "every decision copied")
        time.sleep(1.2)  # more polls: nothing copied twice
        polls = [r for r in client.replies if '"sessions"' in r]
        assert polls and all(len(json.loads(r)["sessions"]) == 2 for r in polls)  # both sessions in each
        assert all(sum(len(v["records"]) for v in json.loads(r)["sessions"].values()) <= 3 for r in polls)
        assert not any('"registered"' in r and '"sessions"' not in r for r in client.replies)  # no per-session GET
    finally:
        for sid in sids:
            client.unregister(sid)
        client.close()
        c.close()
    for sid, pod in zip(sids, (POD_A, POD_B), strict=True):
        assert paths(trail(tmp_path / "mirror", sid)) == [f"/{pod}-{i}" for i in range(4)]


def test_a_replica_without_the_batched_fetch_still_gets_its_decisions_fetched_one_session_at_a_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, http_target: Target) -> None:
    # During a rolling upgrade a worker may be newer than a replica: a 404 for /v1/poll means
    # one GET per session there, nothing lost.
    import sandbox.egress.cluster as cl
    from tests.kube.test_egress_cluster import TOKEN as IN_PROCESS_TOKEN
    from tests.kube.test_egress_cluster import Cluster

    monkeypatch.setattr(cl.AdminServer, "_poll", lambda self, body: (404, {"error": "no such endpoint"}))
    c = Cluster(tmp_path)
    client = ClusterEgressClient([c.admin_url], IN_PROCESS_TOKEN, mirror_dir=tmp_path / "mirror")
    try:
        client.register("sess_a", POD_A, http_policy(http_target), ttl_s=600)
        assert c.get(POD_A, f"http://other.test:{http_target.port}/x").status == 403
        wait_for(lambda: len(trail(tmp_path / "mirror", "sess_a")) == 1, "the decision copied by a per-session fetch")
    finally:
        client.unregister("sess_a")
        client.close()
        c.close()
    assert paths(trail(tmp_path / "mirror", "sess_a")) == ["/x"]


def test_a_replica_that_accepted_a_session_that_failed_to_start_and_missed_the_undo_is_told_again(
        replicas: Callable[..., Replica], http_target: Target) -> None:
    r1, r2 = replicas("r1"), replicas("r2")
    r2.stop()
    r2.token.write_text("w" * 40)  # r2 refuses this worker (401): the session must not start
    r2.start()

    class FlakyDelete(ClusterEgressClient):
        """The first DELETE to r1 is lost on the way (the network, not the proxy)."""

        lost = False

        def _call(self, method: str, path: str, body: dict[str, Any] | None = None,
                  base: str | None = None) -> dict[str, Any]:
            if method == "DELETE" and base == r1.url and not self.lost:
                self.lost = True
                raise ClusterEgressError(f"cannot reach the egress proxy's admin endpoint {base}: timed out")
            return super()._call(method, path, body, base)

    client = FlakyDelete([r1.url, r2.url], TOKEN)
    try:
        with pytest.raises(ClusterEgressError, match="401"):
            client.register("sess_a", POD_A, http_policy(http_target), ttl_s=600)
        assert client.lost
        wait_for(lambda: r1.sessions() == 0, "the replica that accepted to be told to forget the session")
        assert r1.get(POD_A, f"http://allowed.test:{http_target.port}/").raw == b""
    finally:
        client.close()


def test_the_admin_channel_over_tls_takes_only_a_worker_that_verifies_the_replicas_certificate(
        replicas: Callable[..., Replica], http_target: Target, upstream: TlsTarget, up_ca: TestCA,
        tmp_path: Path) -> None:
    # The registrations carry the session CA's key (and the token): with --admin-tls-* the
    # replicas serve the admin endpoint over TLS only, and the worker checks their certificate
    # against its CA for one fixed name (replicas are reached by pod IP).
    admin_ca = TestCA("egress admin CA")
    cert, key = admin_ca.issue(["sandbox-egress-admin"], tmp_path)
    ca_file = admin_ca.write(tmp_path / "admin-ca.pem")
    r1, r2 = replicas("r1", tls=(cert, key)), replicas("r2", tls=(cert, key))
    client = ClusterEgressClient([r1.url, r2.url], TOKEN, tls_ca_file=ca_file, tls_name="sandbox-egress-admin")
    try:
        bundle = client.register("sess_tls", POD_A, tls_policy(upstream, up_ca.write(tmp_path / "up.pem")), ttl_s=600)
        assert r1.sessions() == 1 and r2.sessions() == 1
        assert r2.https(POD_A, bundle, upstream.port, "/over-tls").status == 200
    finally:
        client.unregister("sess_tls")
        client.close()
    assert r1.sessions() == 0 and r2.sessions() == 0
    plain = f"http://127.0.0.1:{r1.admin_port}"
    other_ca = TestCA("some other CA").write(tmp_path / "other-ca.pem")
    for bad, why in ((ClusterEgressClient([plain], TOKEN), "cannot reach"),  # no plaintext on a TLS admin port
                     (ClusterEgressClient([r1.url], TOKEN, tls_ca_file=other_ca), "CERTIFICATE_VERIFY_FAILED"),
                     (ClusterEgressClient([r1.url], TOKEN, tls_ca_file=ca_file, tls_name="someone-else"),
                      "CERTIFICATE_VERIFY_FAILED")):
        with pytest.raises(ClusterEgressError, match=why) as e:
            bad.register("sess_x", POD_B, http_policy(http_target), ttl_s=60)
        assert TOKEN not in str(e.value)
    assert r1.sessions() == 0
    with pytest.raises(ClusterEgressError, match="https:// URLs"):
        ClusterEgressClient([plain], TOKEN, tls_ca_file=ca_file)
    from sandbox.kube.config import config_from_dict

    with pytest.raises(Exception, match="with admin_tls_ca_file the admin endpoints are https:// URLs"):
        config_from_dict({"egress_proxy": {"admin_urls": [plain], "admin_tls_ca_file": str(ca_file)}})
    cfg = config_from_dict({"egress_proxy": {"admin_dns": "localhost", "admin_tls_ca_file": str(ca_file),
                                             "admin_token_file": str(r1.token)}}).egress_proxy
    assert all(u.startswith("https://") for u in ClusterEgressClient.from_config(cfg).endpoints())


def test_the_proxy_refuses_to_start_with_half_or_unreadable_admin_tls_material(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sandbox.egress.cluster import main

    token = tmp_path / "token"
    token.write_text(TOKEN)
    cert, key = TestCA("egress admin CA").issue(["sandbox-egress-admin"], tmp_path)
    base = ["--token-file", str(token), "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]
    assert main([*base, "--admin-tls-cert", str(cert)]) == 2
    assert "--admin-tls-cert and --admin-tls-key go together" in capsys.readouterr().err
    assert main([*base, "--admin-tls-cert", str(key), "--admin-tls-key", str(cert)]) == 2  # swapped
    err = capsys.readouterr().err
    assert "cannot load the admin TLS certificate" in err and "PRIVATE KEY" not in err and TOKEN not in err
