"""`sandbox demo`: the main job end to end on one machine.

Starts the embedded control plane and a worker in this process, creates a
session and plays the model: a short scripted task of tool calls (write a
file, read it back, run a shell command showing who it runs as and its
limits, try to reach a host the policy denies, try to read outside the
workspace). Each call and its result are printed as they happen; the exit
status says whether everything went as expected.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

# The worker profile plus egress to PyPI only, so the denied request is refused
# by the egress proxy (and audited) rather than by a missing network.
DEMO_PROFILE = """\
extends: worker
name: demo
description: The worker profile with egress to PyPI only (the demo's denied request goes elsewhere).
egress:
  rules:
    - {host: pypi.org, ports: [443]}
"""

HELLO = "Hello from inside the sandbox.\n"


@dataclass
class Step:
    title: str
    tool: str
    input: dict[str, Any]
    check: Callable[[bool, str], str | None]  # (is_error, text) -> None if as expected, else what went wrong
    expect_error: bool = False


def _expect_ok(contains: str | None = None) -> Callable[[bool, str], str | None]:
    def check(is_error: bool, text: str) -> str | None:
        if is_error:
            return "the call failed"
        if contains is not None and contains not in text:
            return f"expected {contains!r} in the result"
        return None
    return check


def _expect_error(contains: str) -> Callable[[bool, str], str | None]:
    def check(is_error: bool, text: str) -> str | None:
        if not is_error:
            return "the call succeeded but should have been refused"
        if contains not in text:
            return f"expected {contains!r} in the error"
        return None
    return check


def _check_identity(is_error: bool, text: str) -> str | None:
    if is_error:
        return "the shell command failed"
    import re

    m = re.search(r"uid=(\d+)", text)
    if m is None or int(m.group(1)) == 0:
        return "expected the sandbox's own non-root uid, not root"
    if "memory limit" not in text:
        return "expected the cgroup limits in the output"
    return None


# cgroup v2 files first, v1 (hybrid hosts) second.
LIMITS_COMMAND = r"""id
cg() { for f in "$@"; do [ -r "$f" ] && { cat "$f"; return; }; done; echo n/a; }
mem=$(cg /sys/fs/cgroup/memory.max /sys/fs/cgroup/memory/memory.limit_in_bytes)
case $mem in ''|*[!0-9]*) ;; *) mem="$((mem / 1048576)) MiB" ;; esac
echo "memory limit   $mem"
echo "process limit  $(cg /sys/fs/cgroup/pids.max /sys/fs/cgroup/pids/pids.max)"
echo "cpu quota      $(cg /sys/fs/cgroup/cpu.max /sys/fs/cgroup/cpu/cpu.cfs_quota_us)"
ulimit -a | grep -E 'open files|max user processes|file size'
df -h /workspace | tail -1
cat notes/hello.txt"""

STEPS = [
    Step("write a file", "write", {"file_path": "notes/hello.txt", "content": HELLO}, _expect_ok("wrote")),
    Step("read it back", "read", {"file_path": "notes/hello.txt"}, _expect_ok(HELLO.strip())),
    Step("who am I, and what are my limits", "bash", {"command": LIMITS_COMMAND}, _check_identity),
    Step("reach a host the policy denies", "bash",
         {"command": "curl -sS -m 10 -o /dev/null https://example.com/ && echo reached", "timeout_ms": 30000},
         _expect_error("403"), expect_error=True),
    Step("read outside the workspace", "read", {"file_path": "/etc/shadow"},
         _expect_error("outside the session's working directory"), expect_error=True),
]


def _text(content: list[dict[str, Any]]) -> str:
    return "\n".join(str(b.get("text", f"[{b.get('type')}]")) for b in content if isinstance(b, dict))


def _wait_result(admin: Any, session_id: str, tool_use_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ev in admin.events(session_id, types=["user.tool_result"]):
            if ev.get("tool_use_id") == tool_use_id:
                return ev
        time.sleep(0.05)
    raise TimeoutError(f"no result for {tool_use_id} after {timeout:.0f}s")


def run_demo(console: Console, *, profile: str | None = None, keep: bool = False, warm: int = 1,
             timeout: float = 90.0) -> bool:
    from sandbox.controlplane import ControlPlane, LocalAdmin

    from .credentials import EnvironmentKey
    from .logs import setup_logging
    from .runner import BackgroundWorker
    from .worker import Worker, WorkerConfig

    root = Path(tempfile.mkdtemp(prefix="sandbox-demo-"))
    log_path = root / "worker.log"
    log_stream = open(log_path, "w")  # noqa: SIM115 - closed below
    setup_logging(logging.INFO, stream=log_stream)
    if profile is None:
        (root / "demo.yaml").write_text(DEMO_PROFILE)
        profile = str(root / "demo.yaml")
    ok = True
    try:
        with ControlPlane(root / "controlplane") as cp:
            console.print(f"[bold]control plane[/] {cp.base_url}  environment {cp.environment_id}")
            key = EnvironmentKey(cp.environment_key, f"file:{cp.environment_key_path()}")
            config = WorkerConfig(base_url=cp.base_url, environment_id=cp.environment_id,
                                  state_dir=root / "worker", profile=profile, max_sessions=2, warm=warm,
                                  max_idle=5.0)
            worker = Worker(config, key)
            with BackgroundWorker(worker), LocalAdmin(cp.base_url, cp.admin_key) as admin:
                console.print(f"[bold]worker[/]        {worker.worker_id}  policy {worker.policy.name if worker.policy else '?'}"
                              f"  (log: {log_path})")
                deadline = time.monotonic() + 15
                while worker.pool is not None and warm and worker.pool.ready < 1 and time.monotonic() < deadline:
                    time.sleep(0.05)  # let the warm pool fill, so the session starts without waiting for a container
                session_id = admin.create_session(cp.environment_id, title="sandbox demo")
                console.print(f"[bold]session[/]       {session_id}\n")
                for i, step in enumerate(STEPS, 1):
                    shown = json.dumps(step.input, ensure_ascii=False)
                    console.print(f"[cyan]{i}. {step.title}[/]")
                    console.print(f"   [dim]→ {step.tool} {shown if len(shown) < 160 else shown[:157] + '...'}[/]")
                    started = time.monotonic()
                    tid = admin.send_tool_use(session_id, step.tool, step.input)
                    ev = _wait_result(admin, session_id, tid, timeout)
                    took = time.monotonic() - started
                    text = _text(ev.get("content") or [])
                    is_error = bool(ev.get("is_error"))
                    problem = step.check(is_error, text)
                    mark = "[green]✓[/]" if problem is None else "[red]✗[/]"
                    label = ("refused, as expected" if is_error else "ok") if problem is None else problem
                    console.print(f"   {mark} {label} [dim]({took * 1000:.0f} ms)[/]")
                    for line in text.rstrip("\n").splitlines()[:14]:
                        console.print(Text("     │ ", style="dim") + Text(line), highlight=False)
                    console.print()
                    ok = ok and problem is None
                denials = _egress_denials(worker, session_id)
                if denials:
                    console.print(f"[bold]egress audit[/]  {denials}")
                admin.send_idle(session_id)
                admin.terminate(session_id)
                deadline = time.monotonic() + 10
                while worker.sessions_in_flight and time.monotonic() < deadline:
                    time.sleep(0.05)  # let the worker finish the session (and stop its item) before stopping
    except Exception as e:  # noqa: BLE001 - the demo reports, it does not crash
        console.print(f"[red]demo failed:[/] {type(e).__name__}: {e}")
        ok = False
    finally:
        logging.getLogger().handlers.clear()
        log_stream.close()
        if not keep:
            from .store import unmount_under

            unmount_under(root)  # a session's workspace outlives its sandbox: it is a mount in the store
            shutil.rmtree(root, ignore_errors=True)
        else:
            console.print(f"[dim]state kept in {root}[/]")
    console.print("[bold green]demo passed[/]" if ok else "[bold red]demo failed[/]")
    return ok


def _egress_denials(worker: Any, session_id: str) -> str:
    """The proxy's audit record of the denied request (the pool sandbox's label is mapped worker-side)."""
    try:
        runtime = worker._runtime  # noqa: SLF001 - the demo reads its own worker's audit log
        for rec in reversed(runtime.egress.records(limit=50)):
            if rec.get("decision") == "deny":
                return f"{rec.get('method')} {rec.get('host')}:{rec.get('port')} denied: {rec.get('reason')}"
    except Exception:  # noqa: BLE001
        return ""
    return ""
