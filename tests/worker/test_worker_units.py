"""Worker pieces that need no Docker: credentials, redaction, outbox, breaker, admission, adapters."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import anyio
import pytest
from anthropic import APIConnectionError, AsyncAnthropic
from anthropic._models import FinalRequestOptions
from anthropic._request import APIRequest
from anthropic.lib.tools import ToolError
from click.testing import CliRunner

from sandbox.policy import load_policy
from sandbox.worker import credentials as cred
from sandbox.worker import logs
from sandbox.worker.admission import Admission, HostStats
from sandbox.worker.metrics import WorkerMetrics
from sandbox.worker.middleware import CircuitBreaker, LeaseFenced, WorkerMiddleware
from sandbox.worker.outbox import INTERRUPTED_TEXT, Outbox
from sandbox.worker.toolctx import current_tool_call, open_telemetry_option
from sandbox.worker.tools import INPUT_MODELS, op_request, result_content, validate_input
from sandbox.worker.worker import session_content

ENV_KEY = "sk-ant-oat01-" + "k" * 43
ORG_KEY = "sk-ant-api03-" + "o" * 43


# ------------------------------------------------------------------ credentials

def test_org_key_in_environment_refuses_to_start() -> None:
    with pytest.raises(cred.CredentialError) as ei:
        cred.load_environment_key(environ={"ANTHROPIC_API_KEY": ORG_KEY, "ANTHROPIC_ENVIRONMENT_KEY": ENV_KEY})
    assert "ANTHROPIC_API_KEY" in str(ei.value) and ORG_KEY not in str(ei.value)
    with pytest.raises(cred.CredentialError, match="ANTHROPIC_AUTH_TOKEN"):
        cred.check_no_org_key({"ANTHROPIC_AUTH_TOKEN": ORG_KEY, "ANTHROPIC_ENVIRONMENT_KEY": ENV_KEY})
    cred.check_no_org_key({"ANTHROPIC_AUTH_TOKEN": ENV_KEY, "ANTHROPIC_ENVIRONMENT_KEY": ENV_KEY})  # same key: fine


@pytest.mark.parametrize("command", [["--base-url", "http://127.0.0.1:9", "--environment-id", "env_x"], []])
def test_cli_worker_refuses_with_org_key(command: list[str], tmp_path: Path) -> None:
    from sandbox.worker.cli import demo_cmd, worker_cmd

    env = {"ANTHROPIC_API_KEY": ORG_KEY, "ANTHROPIC_ENVIRONMENT_KEY": ENV_KEY}
    r = CliRunner().invoke(worker_cmd, [*command, "--state-dir", str(tmp_path)], env=env)
    assert r.exit_code == 2, r.output
    assert "ANTHROPIC_API_KEY is set" in r.output and ORG_KEY not in r.output and ENV_KEY not in r.output
    assert not (tmp_path / "outbox.db").exists()  # refused before doing anything
    r = CliRunner().invoke(demo_cmd, [], env=env)
    assert r.exit_code == 2 and "organisation-scoped" in r.output


def test_key_file_permissions_are_checked(tmp_path: Path) -> None:
    f = tmp_path / "env.key"
    f.write_text(ENV_KEY + "\n")
    f.chmod(0o640)
    with pytest.raises(cred.CredentialError, match="readable by group/other"):
        cred.load_environment_key(f, environ={})
    f.chmod(0o600)
    key = cred.load_environment_key(f, environ={})
    assert key.value == ENV_KEY and ENV_KEY not in repr(key) and ENV_KEY not in str(key)
    link = tmp_path / "link.key"
    link.symlink_to(f)
    with pytest.raises(cred.CredentialError, match="cannot open"):
        cred.read_key_file(link)
    with pytest.raises(cred.CredentialError, match="does not exist"):
        cred.read_key_file(tmp_path / "missing")
    with pytest.raises(cred.CredentialError, match="no environment key"):
        cred.load_environment_key(environ={})


def test_environment_key_is_scrubbed_from_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_ENVIRONMENT_KEY", ENV_KEY)
    key = cred.load_environment_key()
    assert key.value == ENV_KEY and "ANTHROPIC_ENVIRONMENT_KEY" not in os.environ


# ------------------------------------------------------------------ logs

def test_logs_redact_keys_tokens_and_registered_secrets() -> None:
    stream = io.StringIO()
    handler = logs.setup_logging(logging.INFO, stream=stream)
    try:
        opaque = "opaque-secret-value-1234567890"
        logs.secrets.add(opaque)
        lg = logging.getLogger("sandbox.worker.test")
        token = logs.session_id_var.set("session_1")
        try:
            lg.info("key %s token %s", ENV_KEY, "sk-ant-req-abcdefgh")
            lg.warning("payload %s", opaque)
            try:
                raise RuntimeError(f"failed with {ENV_KEY}")
            except RuntimeError:
                lg.exception("boom")
        finally:
            logs.session_id_var.reset(token)
    finally:
        logging.getLogger().removeHandler(handler)
    out = stream.getvalue()
    assert "sk-ant-" not in out and opaque not in out and "<redacted fp:" in out
    first = json.loads(out.splitlines()[0])
    assert first["session_id"] == "session_1" and first["level"] == "info"


# ------------------------------------------------------------------ outbox

def test_outbox_never_runs_a_call_twice(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", owner="worker:1:1")
    assert ob.begin("t1", "s1", "w1", "bash").run
    ob.finish("t1", "out", False)
    again = ob.begin("t1", "s1", "w2", "bash")
    assert not again.run and again.record and again.record.result and again.record.result.content == "out"
    assert [r.tool_use_id for r in ob.pending()] == ["t1"]
    assert ob.delivered(["t1"]) == 1 and ob.pending() == []
    gone = ob.begin("t1", "s1", "w3", "bash")  # delivered: still never re-run
    assert not gone.run and gone.record and gone.record.state == "delivered"


def test_outbox_recovers_calls_of_a_dead_worker_as_interrupted(tmp_path: Path) -> None:
    first = Outbox(tmp_path / "o.db", owner="worker:1:1")
    assert first.begin("t1", "s1", "w1", "bash").run
    first.close()
    second = Outbox(tmp_path / "o.db", owner="worker:2:2")
    assert second.recover() == 1
    d = second.begin("t1", "s1", "w2", "bash")
    assert not d.run and d.record and d.record.result
    assert d.record.result.is_error and d.record.result.content == INTERRUPTED_TEXT
    assert second.begin("t2", "s1", "w2", "read").run
    second.abandon("t2")
    assert second.get("t2").result.content == INTERRUPTED_TEXT  # type: ignore[union-attr]


def test_workers_racing_on_one_journal_never_both_run_a_call(tmp_path: Path) -> None:
    """Four workers (each its own connection, so only SQLite's file lock orders them) claim the same
    calls at once: every call is claimed by exactly one of them; the others see the row."""
    import threading

    path = tmp_path / "o.db"
    owners = [f"w:{i}:{i}" for i in range(4)]
    books = [Outbox(path, owner=o, alive=lambda _o: True) for o in owners]
    ids = [f"t{i}" for i in range(150)]
    runs: dict[str, list[str]] = {t: [] for t in ids}
    go = threading.Barrier(len(books))

    def claim(ob: Outbox) -> None:
        go.wait()
        for t in ids:
            d = ob.begin(t, "s1", "w1", "bash")
            if d.run:
                runs[t].append(ob.owner)
            else:
                assert d.wait and d.record is not None and d.record.state == "running"
        ob.close()

    threads = [threading.Thread(target=claim, args=(ob,)) for ob in books]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert all(len(r) == 1 for r in runs.values()), {t: r for t, r in runs.items() if len(r) != 1}


def test_outbox_marks_many_accepted_results_delivered_at_once(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", owner="w:1:1")
    ids = [f"t{i}" for i in range(1203)]  # more than one statement's worth of ids
    for t in ids:
        assert ob.begin(t, "s1", "w1", "bash").run
        ob.finish(t, "out", False)
    ob.delivered_later(ids[:-1])
    assert ob.begin("next", "s1", "w1", "bash").run  # applies the marks
    assert [r.tool_use_id for r in ob.pending()] == [ids[-1]]
    assert ob.get(ids[0]).state == "delivered"  # type: ignore[union-attr]
    assert not ob.begin(ids[0], "s1", "w2", "bash").run  # a tombstone: never run again


def test_the_loops_journal_claim_never_waits_and_never_claims_twice(tmp_path: Path) -> None:
    """`try_begin` runs on the worker's event loop: while another process holds the file's write lock it
    answers None at once (the call then takes the thread path) and has written nothing."""
    import sqlite3

    path = tmp_path / "o.db"
    ob = Outbox(path, owner="w:1:1", synchronous="NORMAL")
    first = ob.try_begin("t1", "s1", "w1", "bash")
    assert first is not None and first.run
    assert ob.try_begin("t1", "s1", "w1", "bash") is None  # a row exists: the full `begin` decides
    again = ob.begin("t1", "s1", "w1", "bash")
    assert not again.run and again.wait  # running under this live owner: waited for, never re-run
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another worker process mid-transaction
    try:
        assert ob.try_begin("t2", "s1", "w1", "bash") is None
        assert ob._nowait is not None and ob._nowait.execute("PRAGMA busy_timeout").fetchone()[0] == 0  # no wait
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert ob.get("t2") is None  # nothing claimed: the thread path claims it
    assert ob.begin("t2", "s1", "w1", "bash").run
    full = Outbox(tmp_path / "full.db", owner="w:1:1", synchronous="FULL")
    assert full.try_begin("t1", "s1", "w1", "bash") is None  # a FULL commit fsyncs: never on the loop


# ------------------------------------------------------------------ breaker / middleware

def test_circuit_breaker_opens_fails_fast_and_recovers(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("sandbox.worker.middleware.time.monotonic", lambda: now[0])
    changes: list[bool] = []
    b = CircuitBreaker(threshold=3, base_cooldown=1.0, max_cooldown=4.0,
                       on_change=lambda is_open, _by: changes.append(is_open))
    for _ in range(3):
        assert b.allow()
        b.failure()
    assert b.open and not b.allow()
    now[0] += 1.1
    assert b.allow()  # the half-open probe
    assert not b.allow()  # only one at a time
    b.failure()
    now[0] += 1.5
    assert not b.allow()  # cooldown doubled to 2 s
    now[0] += 0.6
    assert b.allow()
    b.success()
    assert not b.open and b.allow() and changes == [True, False]


def _request(method: str, url: str, params: dict[str, Any] | None = None, body: Any = None) -> APIRequest:
    opts = FinalRequestOptions.construct(method=method, url=url, params=params or {}, json_data=body)
    return APIRequest(options=opts, cast_to=object)


class _Resp:
    def __init__(self, status: int) -> None:
        self.status_code = status


def test_middleware_sets_lease_ttl_fences_after_412_and_marks_delivery(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", owner="w:1:1")
    ob.begin("t1", "s1", "w1", "bash")
    ob.finish("t1", "x", False)
    mw = WorkerMiddleware(ob, CircuitBreaker(), WorkerMetrics(), lease_ttl=10)
    mw.track("w1", "s1")
    seen: list[APIRequest] = []
    status = [200]

    async def call_next(req: APIRequest) -> Any:
        seen.append(req)
        return _Resp(status[0])

    async def main() -> None:
        await mw.handle_async(_request("post", "/v1/environments/e/work/w1/heartbeat",
                                       {"expected_last_heartbeat": "NO_HEARTBEAT"}), call_next)
        assert seen[-1].query_params == {"expected_last_heartbeat": "NO_HEARTBEAT", "desired_ttl_seconds": 10}
        result = {"events": [{"type": "user.tool_result", "tool_use_id": "t1", "content": []}]}
        status[0] = 412
        await mw.handle_async(_request("post", "/v1/environments/e/work/w1/heartbeat"), call_next)
        assert mw.leases["w1"].last == "precondition" and "s1" in mw.fenced_sessions
        with pytest.raises(LeaseFenced):
            await mw.handle_async(_request("post", "/v1/sessions/s1/events", body=result), call_next)
        assert ob.pending() != []  # held, not dropped
        mw.track("w2", "s1")  # we hold the session again
        status[0] = 200
        await mw.handle_async(_request("post", "/v1/sessions/s1/events", body=result), call_next)
        assert ob.pending() == []
        mw.hand_back("w2")
        stopped = await mw.handle_async(_request("post", "/v1/environments/e/work/w2/stop"), call_next)
        assert stopped.id == "w2" and seen[-1].url.endswith("/events")  # answered locally, not sent

    anyio.run(main)


def test_middleware_fails_fast_while_the_circuit_is_open(tmp_path: Path) -> None:
    mw = WorkerMiddleware(Outbox(tmp_path / "o.db", owner="w:1:1"), CircuitBreaker(threshold=1), WorkerMetrics())
    calls = [0]

    async def down(req: APIRequest) -> Any:
        calls[0] += 1
        raise APIConnectionError(request=__import__("httpx2").Request("GET", "http://x"))

    async def main() -> None:
        for _ in range(3):
            with pytest.raises(APIConnectionError):
                await mw.handle_async(_request("get", "/v1/environments/e/work/poll"), down)

    anyio.run(main)
    assert calls[0] == 1


# ------------------------------------------------------------------ admission

def test_a_bomb_counts_as_one_busy_sandbox_however_many_tasks_it_runs() -> None:
    from sandbox.worker.admission import BusySandboxes

    readings = iter([{"a": 0, "b": 0, "c": 0}, {"a": 10**12, "b": 10**3, "c": 10**12}])
    ticks = iter([100.0, 101.0])  # one second between the readings, whatever the machine's speed
    busy = BusySandboxes(lambda: next(readings), clock=lambda: next(ticks))
    assert busy() == 0  # nothing to compare with yet
    assert busy() == 2  # a and c used more than half a core since; b did not


def test_admission_leaves_work_queued_without_headroom() -> None:
    policy = load_policy("worker")  # 1 GiB memory, 2 CPUs
    stats = HostStats(available_memory=8 << 30, free_disk=50 << 30, load1=0.5, cpus=4)
    adm = Admission(policy, lambda: stats)
    assert adm.check().ok
    adm.probe = lambda: HostStats(900 << 20, 50 << 30, 0.5, 4)
    d = adm.check()
    assert not d.ok and d.resource == "memory" and "1024 MiB" in d.reason
    # A load average alone (one tenant's fork bomb drives it into the hundreds) refuses nothing by default ...
    adm.probe = lambda: HostStats(8 << 30, 50 << 30, 400.0, 4)
    assert adm.check().ok
    # ... only an operator's explicit load gate does.
    assert Admission(policy, lambda: HostStats(8 << 30, 50 << 30, 15.0, 4), load_per_cpu=4.0).check().resource == "load"
    # CPU: one more sandbox among the busy ones would get too small a share of the cores.
    adm.probe = lambda: HostStats(8 << 30, 50 << 30, 0.5, 4, busy_sandboxes=16)
    assert adm.check().ok  # 4/17 of a core
    adm.probe = lambda: HostStats(8 << 30, 50 << 30, 0.5, 4, busy_sandboxes=80)
    d = adm.check()
    assert not d.ok and d.resource == "cpu" and "80 busy sandboxes" in d.reason
    disk_policy = load_policy("disk-workspace")
    adm = Admission(disk_policy, lambda: HostStats(8 << 30, 100 << 20, 0.1, 4))
    assert adm.check().resource == "disk"


# ------------------------------------------------------------------ tool adapter

def test_tool_definitions_match_the_sdk_reference() -> None:
    from anthropic.lib.tools.agent_toolset import AgentToolContext, beta_agent_toolset_20260401

    from sandbox.worker.tools import SessionSlot, SessionToolbox

    ref = {t.name: t.to_dict() for t in beta_agent_toolset_20260401(AgentToolContext(workdir="/tmp"))}
    box = SessionToolbox(SessionSlot("s", "w"), None, WorkerMetrics(),  # type: ignore[arg-type]
                         sandbox_limiter=anyio.CapacityLimiter(1), db_limiter=anyio.CapacityLimiter(1))
    ours = {t.name: t.to_dict() for t in box.tools()}
    assert ours == ref


def test_inputs_are_validated_with_clear_messages() -> None:
    with pytest.raises(ToolError, match=r"read: invalid input: file_path: Field required"):
        validate_input("read", {})
    with pytest.raises(ToolError, match=r"write: invalid input: content: Input should be a valid string"):
        validate_input("write", {"file_path": "a", "content": 5})
    with pytest.raises(ToolError, match=r"over the 10485760-byte limit"):
        validate_input("write", {"file_path": "a", "content": "x" * (10 << 20 | 1)})
    with pytest.raises(ToolError, match=r"bash: command is \d+ characters, over"):
        validate_input("bash", {"command": "x" * ((1 << 20) + 1)})
    assert validate_input("bash", {"command": "ls", "restart": None, "extra": 1}) == {"command": "ls"}
    assert set(INPUT_MODELS) == {"bash", "read", "write", "edit", "glob", "grep"}


def test_bash_timeouts_stay_under_the_sdk_deadline() -> None:
    req, host_timeout = op_request("bash", {"command": "x", "timeout_ms": 10_000_000})
    assert req["_max_timeout"] == 140.0 and host_timeout == 155.0
    _, host_timeout = op_request("bash", {"command": "x"})
    assert host_timeout == 135.0


def test_results_from_the_sandbox_are_checked() -> None:
    assert result_content("bash", {"output": "boom", "exit_code": 2}) == ("boom", True)
    assert result_content("read", {"text": "hi"}) == ("hi", False)
    assert result_content("read", {"blocks": [{"type": "script", "source": {}}]})[1] is True
    assert result_content("read", "not a dict")[1] is True
    assert session_content("") == [{"type": "text", "text": "(no output)"}]


def test_tool_spans_carry_the_tool_use_id() -> None:
    """The seam the outbox relies on: the SDK's tool span is current while the tool runs."""
    from anthropic.lib._tracing._tools import tool_use_span

    client = AsyncAnthropic(base_url="http://127.0.0.1:9", auth_token="x", open_telemetry=open_telemetry_option())  # type: ignore[arg-type]
    assert current_tool_call() is None
    with tool_use_span(client, object(), tool_use_id="sevt_1", tool_name="bash", input={}, session_id="s1",
                       agent_tool=True):
        call = current_tool_call()
        assert call is not None and call.tool_use_id == "sevt_1" and call.session_id == "s1"
    assert current_tool_call() is None
