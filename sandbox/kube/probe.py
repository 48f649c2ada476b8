"""The worker pod's probes: ``python -m sandbox.kube.probe {live,ready} [--port 9464]``.

The worker's health endpoint (``sandbox/worker/metrics.py``) listens on loopback unless
``--metrics-host`` names another address (for Prometheus), so the probes do not ``httpGet`` it
from the kubelet: they exec this module in the worker container, which asks
``http://127.0.0.1:PORT/healthz`` (``--host`` if the worker binds one address that is not loopback).

- ``live``: the worker process is up and its health server answers with its JSON state, whatever
  the state: ``degraded`` (at its session limit, the control plane unreachable) and ``stopping``
  (draining after SIGTERM) are alive; restarting would only drop the sessions in flight. Fails
  when nothing answers in ``--timeout`` seconds (the process is gone or wedged) or the answer is
  not the worker's. The endpoint exists only once the worker has passed its start-up canaries,
  so the Deployment gives ``live`` a generous ``startupProbe`` first. The health server answers
  from its own thread, so ``live`` also fails when the worker's event loop has not run for
  ``--max-loop-stall`` seconds (``loop_beat_age_s`` in the state): a loop stuck in a blocking call
  serves nobody while its health server still answers.
- ``ready``: the worker can take one more session now: status ``ok`` (HTTP 200). At its session
  limit, with the circuit to the control plane open, or draining, it is not ready. The worker
  pulls its work (no Service sends it any), so readiness steers rollouts and what
  ``kubectl get pods`` shows, not traffic.

Exit 0 or 1, with one line on stdout saying why (the kubelet puts it in the pod's events). Only
the standard library is imported: a probe runs every few seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from typing import Any

DEFAULT_PORT = 9464
DEFAULT_MAX_LOOP_STALL_S = 60.0  # well past any pause a loaded host gives a live loop (it beats every second)


def check(kind: str, port: int = DEFAULT_PORT, timeout: float = 3.0, host: str = "127.0.0.1",
          max_loop_stall: float = DEFAULT_MAX_LOOP_STALL_S) -> tuple[bool, str]:
    """(passed, why) for ``kind`` in ``live``/``ready``."""
    url = f"http://{host}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback, our own endpoint
            code, body = r.status, r.read(65536)
    except urllib.error.HTTPError as e:
        code, body = e.code, e.read(65536)
    except (urllib.error.URLError, OSError, ValueError) as e:
        return False, f"no answer from the worker's health endpoint {url}: {getattr(e, 'reason', e)}"
    try:
        state: Any = json.loads(body)
    except ValueError:
        state = None
    if not isinstance(state, dict) or "status" not in state:
        return False, f"{url} answered {code} without the worker's health state"
    status, reasons = str(state["status"]), ",".join(map(str, state.get("reasons") or []))
    summary = (f"status {status}" + (f" ({reasons})" if reasons else "")
               + f", sessions {state.get('sessions')}/{state.get('max_sessions')}")
    stall = state.get("loop_beat_age_s")
    if isinstance(stall, (int, float)) and not isinstance(stall, bool) and stall > max_loop_stall:
        return False, f"stalled: the worker's event loop has not run for {stall:.0f}s; {summary}"
    if kind == "live":
        return True, f"alive: {summary}"
    return (code == 200 and status == "ok"), ("ready: " if code == 200 and status == "ok" else "not ready: ") + summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sandbox.kube.probe", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("kind", choices=["live", "ready"])
    ap.add_argument("--port", type=int, default=DEFAULT_PORT, help="the worker's --metrics-port")
    ap.add_argument("--host", default="127.0.0.1",
                    help="where to ask (the worker's --metrics-host; its default and 0.0.0.0 answer on 127.0.0.1)")
    ap.add_argument("--timeout", type=float, default=3.0)
    ap.add_argument("--max-loop-stall", type=float, default=DEFAULT_MAX_LOOP_STALL_S,
                    help="seconds without an event-loop heartbeat after which the worker counts as stuck")
    args = ap.parse_args(argv)
    ok, why = check(args.kind, args.port, args.timeout, host=args.host, max_loop_stall=args.max_loop_stall)
    print(why)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
