"""The worker's /metrics and /healthz where Prometheus can scrape them: loopback by default, another
address only when asked by name (--metrics-host), and nothing a scrape returns holds a secret, a
session id or a session's content. Real sockets on this machine only (loopback, and the
machine's own interface addresses: nothing leaves it)."""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from sandbox.controlplane import ControlPlane, LocalAdmin
from sandbox.worker import Worker, WorkerConfig, logs
from sandbox.worker.metrics import TOOL_NAMES, HealthServer, MetricsHostError, WorkerMetrics, check_metrics_host
from tests.kube.test_worker_kube import cluster, kube_worker  # noqa: F401  (fixtures, registered by import)
from tests.worker.helpers import LogCapture, call, wait_for


def _own_address() -> str:
    """An IPv4 address of one of this machine's interfaces that is not loopback (connecting to it
    stays on this machine)."""
    import psutil

    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback:
                return str(a.address)
    pytest.fail("this machine has no non-loopback IPv4 address to test a non-loopback bind with")


def _get(host: str, port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as r:  # noqa: S310 - this machine
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _server(**kw: str) -> HealthServer:
    srv = HealthServer(WorkerMetrics(), lambda: {"status": "ok"}, 0, **kw)
    srv.start()
    return srv


def test_the_endpoint_is_loopback_only_by_default_and_unreachable_at_the_machines_own_address() -> None:
    from sandbox.worker.cli import worker_cmd

    assert WorkerConfig.__dataclass_fields__["metrics_host"].default == "127.0.0.1"
    assert next(p for p in worker_cmd.params if p.name == "metrics_host").default == "127.0.0.1"
    srv = _server()
    try:
        assert srv._server.socket.getsockname()[0] == "127.0.0.1" and srv.loopback
        assert _get("127.0.0.1", srv.port, "/metrics")[0] == 200
        with pytest.raises(urllib.error.URLError):  # connection refused: nothing listens there
            _get(_own_address(), srv.port, "/metrics")
    finally:
        srv.stop()


def test_a_non_loopback_bind_asked_for_by_name_is_scrapable_at_the_machines_own_address(
        worker_logs: LogCapture) -> None:
    srv = _server(host="0.0.0.0")  # noqa: S104 - the point of the test
    try:
        assert not srv.loopback and srv._server.socket.getsockname()[0] == "0.0.0.0"  # noqa: S104
        code, body = _get(_own_address(), srv.port, "/metrics")
        assert code == 200 and b"sandbox_worker_work_claimed_total" in body
        assert _get(_own_address(), srv.port, "/healthz") == (200, b'{"status": "ok"}')
        # the probes, which ask 127.0.0.1, still reach it
        assert _get("127.0.0.1", srv.port, "/healthz")[0] == 200
        (said,) = worker_logs.events("metrics_exposed")
        assert said["host"] == "0.0.0.0" and said["port"] == srv.port  # noqa: S104
    finally:
        srv.stop()
    own = _own_address()
    srv = _server(host=own)  # one address: that one, not loopback
    try:
        assert _get(own, srv.port, "/healthz")[0] == 200
        with pytest.raises(urllib.error.URLError):
            _get("127.0.0.1", srv.port, "/healthz")
    finally:
        srv.stop()


def test_a_metrics_host_that_is_not_an_address_is_refused_naming_the_flag(monkeypatch: pytest.MonkeyPatch,
                                                                           tmp_path: Path) -> None:
    assert check_metrics_host("localhost") == ("127.0.0.1", True)
    assert check_metrics_host("::") == ("::", False) and check_metrics_host("[::1]") == ("::1", True)
    for bad in ("metrics.example.com", "0.0.0.0:9464", "", "999.1.1.1"):
        with pytest.raises(MetricsHostError, match=r"--metrics-host .*not an IP address"):
            check_metrics_host(bad)
    from sandbox.worker.cli import worker_cmd

    for var in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ANTHROPIC_ENVIRONMENT_KEY", "test-environment-key-value")
    res = CliRunner().invoke(worker_cmd, ["--base-url", "http://127.0.0.1:9", "--environment-id", "env_x",
                                          "--state-dir", str(tmp_path / "w"), "--metrics-port", "0",
                                          "--metrics-host", "metrics.example.com"])
    assert res.exit_code == 2, res.output
    assert "--metrics-host 'metrics.example.com': not an IP address" in res.output
    assert "test-environment-key-value" not in res.output


def test_a_registered_secret_never_leaves_in_a_scrape_even_if_the_health_state_held_one() -> None:
    secret = "sk-test-" + "q" * 24 + "-scrape-guard"
    logs.secrets.add(secret)
    srv = HealthServer(WorkerMetrics(), lambda: {"status": "ok", "admission": f"odd state {secret}"}, 0)
    srv.start()
    try:
        code, body = _get("127.0.0.1", srv.port, "/healthz")
        assert code == 200 and secret.encode() not in body and b"odd state" in body
    finally:
        srv.stop()


LABEL_VALUES = {
    "tool": TOOL_NAMES | {"other"},
    "le": None,  # histogram bucket bounds: numbers
    "outcome": None, "reason": None, "resource": None,  # our own words
}
WORD = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def test_a_scrape_after_a_served_session_holds_no_key_session_id_path_or_content(
        cp: ControlPlane, admin: LocalAdmin, kube_worker: Callable[..., Worker], tmp_path: Path,  # noqa: F811
        worker_logs: LogCapture) -> None:
    worker = kube_worker(metrics_port=0, metrics_host="0.0.0.0", archive_interval=0.5)  # noqa: S104
    wait_for(lambda: worker.health_port is not None, what="the health endpoint")
    port = worker.health_port
    assert port is not None
    sid = admin.create_session(cp.environment_id)
    marker = "session-content-7f3a9c"
    assert call(admin, sid, "write", {"file_path": "notes.txt", "content": marker + "\n"}, timeout=60)[0] is False
    assert call(admin, sid, "bash", {"command": "cat notes.txt; cat /nonexistent-x"})[1].startswith(marker)
    wait_for(lambda: worker_logs.events("workspace_archived"), timeout=30, what="a periodic archive")
    work_ids = {r["work_id"] for r in worker_logs.events("work_claimed")}
    scraped = {path: _get(_own_address(), port, path) for path in ("/metrics", "/healthz")}
    admin.terminate(sid)
    for path, (code, body) in scraped.items():
        assert code in (200, 503), (path, code)
        text = body.decode()
        for forbidden in (cp.environment_key, sid, marker, str(tmp_path), *work_ids):
            assert forbidden not in text, f"{path} holds {forbidden[:12]}..."
    json.loads(scraped["/healthz"][1])
    # Every label is one of the bounded ones, with a value from a fixed set or a short word of ours.
    seen = set()
    for family in text_string_to_metric_families(scraped["/metrics"][1].decode()):
        for sample in family.samples:
            for name, value in sample.labels.items():
                assert name in LABEL_VALUES, (family.name, name)
                allowed = LABEL_VALUES[name]
                if name == "le":
                    float(value)
                else:
                    assert (value in allowed) if allowed is not None else WORD.match(value), (family.name, name, value)
                seen.add((family.name, name, value))
    assert ("sandbox_worker_tool_calls", "tool", "bash") in seen
    assert ("sandbox_worker_workspace_archives", "outcome", "ok") in seen


def test_a_client_that_connects_and_says_nothing_is_cut_off_rather_than_holding_a_thread() -> None:
    # (slowloris against an endpoint that now listens beyond loopback; the real bound is 10 s)
    srv = HealthServer(WorkerMetrics(), lambda: {"status": "ok"}, 0, client_timeout=0.5)
    srv.start()
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as idle:
            idle.sendall(b"GET /metr")  # and then nothing
            assert idle.recv(1024) == b"", "the server closes the silent connection"
        assert _get("127.0.0.1", srv.port, "/healthz")[0] == 200
    finally:
        srv.stop()
