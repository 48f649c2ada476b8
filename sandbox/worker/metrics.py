"""Prometheus metrics and the health endpoint (loopback unless asked otherwise).

Labels are bounded on purpose: tool names come from a fixed set (anything else
is `other`), outcomes and reasons are our own words. No session id, key, token
or path is ever a label value.

`/metrics` and `/healthz` listen on 127.0.0.1 by default. A cluster's Prometheus scrapes pod
IPs, so `--metrics-host` can bind another address (``0.0.0.0``, ``::``, or one of the host's
own): that must be asked for by name, and the worker says so in its log when it happens.
What a scrape returns is counters, gauges and histograms with the bounded labels above, and
the health state (counts, status words, the worker id, the admission reason in numbers): no
session id, work id, token, key, path or content of a session. As a second guard, every body
goes through the log redaction (the registered secrets: the environment key, work secrets,
session tokens) before it is sent. The endpoint has no authentication: restrict who reaches it
(a NetworkPolicy that admits only the scraper, deploy/kubernetes/README.md).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TOOL_NAMES = frozenset({"bash", "read", "write", "edit", "glob", "grep"})
DEFAULT_HOST = "127.0.0.1"

log = logging.getLogger("sandbox.worker.metrics")


class MetricsHostError(ValueError):
    pass


def check_metrics_host(host: str) -> tuple[str, bool]:
    """(the address to bind, whether it is loopback) for ``--metrics-host``: an IP address
    (``localhost`` means 127.0.0.1); a name is refused (which interface it would bind is not obvious)."""
    value = (host or "").strip()
    if value.lower() == "localhost":
        return DEFAULT_HOST, True
    try:
        ip = ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        raise MetricsHostError(f"--metrics-host {host[:80]!r}: not an IP address (127.0.0.1 by default; "
                               "0.0.0.0 or :: to let a cluster's Prometheus scrape the pod)") from None
    return str(ip), ip.is_loopback


def scrub(body: bytes) -> bytes:
    """The registered secrets (sandbox.worker.logs) redacted from a response body: a second guard,
    nothing the endpoint serves is meant to hold one."""
    from .logs import secrets

    text = body.decode("utf-8", "replace")
    clean = secrets.redact(text)
    return body if clean == text else clean.encode()


def tool_label(name: str) -> str:
    return name if name in TOOL_NAMES else "other"


class WorkerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "sandbox_worker_"
        self.work_claimed = Counter(p + "work_claimed", "Work items claimed", registry=r)
        self.work_failed = Counter(p + "work_failed", "Work items that ended in an error", ["reason"], registry=r)
        self.sessions_in_flight = Gauge(p + "sessions_in_flight", "Sessions being served", registry=r)
        self.at_session_limit = Gauge(p + "at_session_limit",
                                      "1 while the worker serves --max-sessions sessions and claims no new work",
                                      registry=r)
        self.sandboxes_live = Gauge(p + "sandboxes_live", "Sandboxes alive (assigned, parked and warm)", registry=r)
        self.pool_ready = Gauge(p + "pool_ready", "Warm sandboxes ready for a new session", registry=r)
        self.queue_depth = Gauge(p + "queue_depth", "Work items queued, from the work stats endpoint", registry=r)
        self.queue_pending = Gauge(p + "queue_pending", "Work items delivered but not acked, from stats", registry=r)
        self.tool_seconds = Histogram(
            p + "tool_call_seconds", "Tool call latency inside the worker", ["tool"], registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 150),
        )
        self.tool_calls = Counter(p + "tool_calls", "Tool calls by outcome", ["tool", "outcome"], registry=r)
        self.egress_denials = Counter(p + "egress_denials", "Egress requests the proxy denied", registry=r)
        self.outbox_pending = Gauge(p + "outbox_pending", "Results stored but not yet accepted", registry=r)
        self.results_posted = Counter(p + "results_posted", "Tool results the control plane accepted", registry=r)
        self.heartbeat_failures = Counter(p + "heartbeat_failures", "Failed lease heartbeats", ["reason"], registry=r)
        self.circuit_open = Gauge(p + "circuit_open", "1 while the control-plane circuit breaker is open", registry=r)
        self.admission_deferred = Counter(p + "admission_deferred", "Polls deferred for lack of headroom",
                                          ["resource"], registry=r)
        self.handed_back = Counter(p + "work_handed_back", "Work items handed back on shutdown", registry=r)
        self.workspace_archives = Counter(p + "workspace_archives",
                                          "Periodic workspace archives of cluster sandboxes during runs "
                                          "(not_taken: failed, one in flight, or the sandbox was gone)",
                                          ["outcome"], registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class HealthServer:
    """`GET /healthz` (JSON) and `GET /metrics`, on loopback unless `host` names another address."""

    def __init__(self, metrics: WorkerMetrics, health: Callable[[], dict[str, Any]], port: int,
                 host: str = DEFAULT_HOST, client_timeout: float = 10.0) -> None:
        host, loopback = check_metrics_host(host)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            # A client that connects and says nothing (or trickles) holds its thread this long at most:
            # beyond loopback, anyone the network lets in can connect.
            timeout = client_timeout

            def do_GET(self) -> None:  # noqa: N802 - http.server API
                if self.path == "/metrics":
                    body, ctype, code = metrics.exposition(), CONTENT_TYPE_LATEST, 200
                elif self.path in ("/healthz", "/health"):
                    state = health()
                    code = 200 if state.get("status") == "ok" else 503
                    body, ctype = json.dumps(state).encode(), "application/json"
                else:
                    body, ctype, code = b"not found\n", "text/plain", 404
                body = scrub(body)
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
                return

        server_cls = ThreadingHTTPServer
        if ":" in host:
            class Server6(ThreadingHTTPServer):
                address_family = socket.AF_INET6

            server_cls = Server6
        self._server = server_cls((host, port), Handler)
        self._server.daemon_threads = True
        self.host = host
        self.port = int(self._server.server_address[1])
        self.loopback = loopback
        if not loopback:
            from .logs import log_event

            log_event(log, logging.WARNING, "metrics_exposed", "the metrics and health endpoint listens beyond "
                      "loopback, as asked; it has no authentication: let only the scraper reach it",
                      host=host, port=self.port)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="worker-health", daemon=True)
        _ = outer

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
