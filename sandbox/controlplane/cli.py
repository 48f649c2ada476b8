"""`sandbox control-plane` and `sandbox session ...`.

`control-plane` runs the server in the foreground and prints where it is (base
URL, environment id, key *file paths*; never keys). The `session` commands find
it through `<state-dir>/endpoint.json` and authenticate with the admin key file
in the same directory: they play the model (inject tool calls, end turns) and
the user (read and watch the log).
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

STATE_DIR_HELP = "Control plane state directory (default: <state dir>/controlplane: $SANDBOX_STATE_DIR, /var/lib/sandbox as root, ~/.local/state/sandbox)."


def _state_dir_option(f: F) -> F:
    return click.option(
        "--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help=STATE_DIR_HELP
    )(f)


def _fail(msg: str, code: int = 2) -> NoReturn:
    """The CLI's one failure path: the message on stderr, and a JSON error object on stdout
    when the command was given --json (as on every command)."""
    from sandbox.cli import fail

    fail(msg, code)


@click.command("control-plane")
@_state_dir_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback needs TLS (--tls or --tls-cert/--tls-key): workers "
                   "on other hosts send their environment key to it.")
@click.option("--port", type=click.IntRange(0, 65535), default=None,
              help="Port to listen on (0: any free port). Default: the port this state directory's control plane "
                   "used before (recorded in <state-dir>/port), else 7787, else any free port; so it comes back "
                   "where workers last found it.")
@click.option("--skill", "skills", multiple=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="A skill archive (zip or tar.*) to serve; sessions created with `session new --skill ID` list "
                   "it. Repeatable. Its id is printed.")
@click.option("--tls", "tls_generated", is_flag=True,
              help="Serve HTTPS with a CA and certificate generated under <state-dir>/tls/ (kept; renewed as "
                   "needed). Give workers the printed CA file (`sandbox worker --ca-file`).")
@click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Serve HTTPS with this PEM certificate (chain); with --tls-key.")
@click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The PEM private key of --tls-cert; must be readable by its owner only (mode 0600).")
@click.option("--advertise-url", default=None,
              help="The URL workers on other hosts use, https://HOST:PORT (put in each work secret as its "
                   "api_base_url; the generated certificate names HOST). Default: https://<--host or this "
                   "host's name>:<port> when not on loopback.")
def control_plane_cmd(state_dir: Path | None, host: str, port: int | None, skills: tuple[Path, ...],
                      tls_generated: bool, tls_cert: Path | None, tls_key: Path | None,
                      advertise_url: str | None) -> None:
    """Run the local control plane (Environments Work API + Sessions API) until Ctrl-C."""
    from .endpoint import resolve_state_dir
    from .server import ControlPlane, ControlPlaneError
    from .tls import ServerTls, TlsError

    sd = resolve_state_dir(state_dir)
    tls = None
    try:
        if tls_cert is not None or tls_key is not None:
            if tls_generated:
                _fail("--tls makes its own certificate; do not combine it with --tls-cert/--tls-key")
            tls = ServerTls(tls_cert, tls_key)
        elif tls_generated:
            tls = ServerTls()
    except TlsError as e:
        _fail(str(e))
    cp = ControlPlane(sd, host=host, port=port, skills=list(skills), tls=tls, advertise_url=advertise_url)
    try:
        cp.start()
    except (ControlPlaneError, OSError) as e:
        _fail(f"cannot start the control plane: {e}")
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        click.echo(f"control plane   {cp.base_url}")
        click.echo(f"environment id  {cp.environment_id}")
        click.echo(f"state dir       {sd}")
        click.echo(f"environment key {cp.environment_key_path()}  (for workers: Authorization: Bearer)")
        click.echo(f"admin key       {cp.admin_key_path}  (for `sandbox session`; never give it to a worker)")
        if cp.advertise_url != cp.base_url:
            click.echo(f"advertised      {cp.advertise_url}  (workers on other hosts: --base-url)")
        if cp.ca_file is not None:
            click.echo(f"CA certificate  {cp.ca_file}  (workers: --ca-file; public, copy it to them)")
        for path, skill_id in cp.skill_ids.items():
            click.echo(f"skill           {skill_id}  ({path})")
        click.echo("Ctrl-C to stop.", err=True)
        while not stop.wait(0.5):
            pass
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        cp.stop()
        click.echo("control plane stopped", err=True)


# --------------------------------------------------------------------- session


def _admin(state_dir: Path | None) -> tuple[Any, Any]:
    from .client import LocalAdmin
    from .endpoint import EndpointError, read_admin_key, read_endpoint, resolve_state_dir
    from .keys import KeyFileError

    from .tls import TlsError

    sd = resolve_state_dir(state_dir)
    try:
        endpoint = read_endpoint(sd)
        key = read_admin_key(sd)
        return LocalAdmin(endpoint.base_url, key, ca_file=endpoint.ca_file), endpoint
    except (EndpointError, KeyFileError, TlsError) as e:
        _fail(str(e))
    except FileNotFoundError:
        _fail(f"no admin key in {sd} (start the control plane with `sandbox control-plane`)")


def _guard(admin: Any, fn: Callable[[], None]) -> None:
    """Run `fn`, closing `admin` after; API and connection errors become one line on stderr."""
    import httpx2 as httpx  # the client uses httpx2 (what anthropic ships)

    from .client import LocalAdminError

    try:
        with admin:
            fn()
    except LocalAdminError as e:
        _fail(f"control plane refused: {e}", 1)
    except httpx.HTTPError as e:
        _fail(f"cannot reach the control plane: {e} (is `sandbox control-plane` running?)", 1)
    except KeyboardInterrupt:
        sys.exit(130)


def parse_tool_calls(text: str) -> list[dict[str, Any]]:
    """JSON (one call or an array of calls) or JSON lines of `{"name", "input"[, "evaluated_permission"]}`."""
    try:
        doc = json.loads(text)
        items = doc if isinstance(doc, list) else [doc]
    except ValueError:
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except ValueError as e:
                    raise click.BadParameter(f"line {n}: not JSON ({e})") from None
    calls = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            raise click.BadParameter(f"tool call {i}: expected an object with a string `name`")
        if not isinstance(item.get("input", {}), dict):
            raise click.BadParameter(f"tool call {i}: `input` must be an object")
        calls.append(
            {"name": item["name"], "input": item.get("input", {}), "evaluated_permission": item.get("evaluated_permission")}
        )
    if not calls:
        raise click.BadParameter("no tool calls in the input")
    return calls


@click.group("session")
def session_group() -> None:
    """Drive sessions on the local control plane (play the model and the user)."""


@session_group.command("new")
@_state_dir_option
@click.option("--environment", "environment_id", default=None, help="Environment id (default: the default environment).")
@click.option("--title", default=None)
@click.option("--skill", "skills", multiple=True, help="Id of a skill the control plane serves (repeatable).")
def session_new(state_dir: Path | None, environment_id: str | None, title: str | None, skills: tuple[str, ...]) -> None:
    """Create a session (queues a work item) and print its id."""
    admin, endpoint = _admin(state_dir)
    _guard(admin, lambda: click.echo(admin.create_session(environment_id or endpoint.environment_id, title=title,
                                                          skills=list(skills) or None)))


@session_group.command("send")
@_state_dir_option
@click.argument("session_id")
@click.argument("file", type=click.File("r"))
@click.option("--idle", is_flag=True,
              help="End the turn (session.status_idle, end_turn) once the calls have their results, as the model "
                   "would: an idle posted before them is followed by the results, which cancel the worker's idle "
                   "countdown (--max-idle), so the run would never end.")
@click.option("--wait", "wait_s", type=click.FloatRange(min=0), default=300.0, show_default=True,
              help="With --idle: at most this many seconds to wait for the results (then post idle anyway).")
def session_send(state_dir: Path | None, session_id: str, file: Any, idle: bool, wait_s: float) -> None:
    """Inject agent.tool_use calls from FILE (JSON or JSON lines; '-' for stdin); print their event ids."""
    calls = parse_tool_calls(file.read())
    admin, _ = _admin(state_dir)

    def run() -> None:
        ids = []
        for call in calls:
            ids.append(admin.send_tool_use(session_id, call["name"], call["input"], call["evaluated_permission"]))
            click.echo(ids[-1])
        if idle:
            # Calls the worker will not answer (denied, awaiting confirmation, not a sandbox tool) are not waited for.
            waited = [i for i, c in zip(ids, calls)
                      if c["name"] in SANDBOX_TOOL_NAMES and c["evaluated_permission"] in (None, "allow")]
            if not _wait_for_results(admin, session_id, waited, wait_s):
                click.echo(f"sandbox: not all results arrived within {wait_s:.0f}s; ending the turn anyway", err=True)
            admin.send_idle(session_id)

    _guard(admin, run)


SANDBOX_TOOL_NAMES = frozenset({"bash", "read", "write", "edit", "glob", "grep"})


def _wait_for_results(admin: Any, session_id: str, ids: list[str], timeout: float) -> bool:
    import time

    deadline = time.monotonic() + timeout
    want = set(ids)
    while want:
        got = {ev.get("tool_use_id") for ev in admin.events(session_id, types=["user.tool_result"])}
        want -= got
        if not want:
            break
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
    return True


@session_group.command("idle")
@_state_dir_option
@click.argument("session_id")
def session_idle(state_dir: Path | None, session_id: str) -> None:
    """End the turn: session.status_idle with stop_reason end_turn."""
    admin, _ = _admin(state_dir)
    _guard(admin, lambda: click.echo(admin.send_idle(session_id)))


@session_group.command("terminate")
@_state_dir_option
@click.argument("session_id")
def session_terminate(state_dir: Path | None, session_id: str) -> None:
    """End the session: session.status_terminated."""
    admin, _ = _admin(state_dir)
    _guard(admin, lambda: click.echo(admin.terminate(session_id)))


def _summary(ev: dict[str, Any], width: int = 160) -> str:
    kind = ev.get("type")
    if kind in ("agent.tool_use", "agent.custom_tool_use"):
        text = f"{ev.get('name')} {json.dumps(ev.get('input', {}))}"
    elif kind in ("user.tool_result", "user.custom_tool_result"):
        blocks = ev.get("content") or []
        texts = [b.get("text", f"<{b.get('type')}>") for b in blocks if isinstance(b, dict)]
        status = "error" if ev.get("is_error") else "ok"
        text = f"{status} -> {ev.get('tool_use_id') or ev.get('custom_tool_use_id')}: " + " ".join(texts).replace("\n", "⏎ ")
    elif kind == "session.status_idle":
        text = str((ev.get("stop_reason") or {}).get("type"))
    elif kind == "user.tool_confirmation":
        text = f"{ev.get('result')} -> {ev.get('tool_use_id')}"
    else:
        text = ""
    return text if len(text) <= width else text[: width - 1] + "…"


WATCHED_TYPES = frozenset(
    {
        "agent.tool_use",
        "agent.custom_tool_use",
        "user.tool_result",
        "user.custom_tool_result",
        "user.tool_confirmation",
        "session.status_idle",
        "session.status_terminated",
    }
)


@session_group.command("watch")
@_state_dir_option
@click.argument("session_id")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, every event type.")
@click.option("--history", is_flag=True, help="Print the session's log so far first, then new events.")
def session_watch(state_dir: Path | None, session_id: str, as_json: bool, history: bool) -> None:
    """Print tool calls and results as they arrive, until the session terminates (or Ctrl-C)."""
    from rich.console import Console
    from rich.markup import escape

    admin, _ = _admin(state_dir)
    console = Console(highlight=False)
    styles = {"agent": "cyan", "user": "green", "session": "magenta"}

    def run() -> None:
        for ev in admin.watch(session_id, history=history):
            if as_json:
                click.echo(json.dumps(ev))
                continue
            if ev.get("type") not in WATCHED_TYPES:
                continue
            style = styles.get(str(ev.get("type")).split(".")[0], "white")
            console.print(
                f"[dim]{escape(str(ev.get('processed_at', '')))}[/] [{style}]{escape(str(ev.get('type')))}[/] "
                f"[dim]{escape(str(ev.get('id')))}[/] {escape(_summary(ev))}"
            )

    _guard(admin, run)


@session_group.command("events")
@_state_dir_option
@click.argument("session_id")
@click.option("--json", "as_json", is_flag=True, help="Print the log as a JSON array.")
def session_events(state_dir: Path | None, session_id: str, as_json: bool) -> None:
    """Print a session's whole event log."""
    admin, _ = _admin(state_dir)

    def run() -> None:
        evs = admin.events(session_id)
        if as_json:
            click.echo(json.dumps(evs, indent=2))
            return
        from rich.table import Table
        from rich.text import Text

        from sandbox.cli import _console

        table = Table("processed_at", "type", "id", "summary", box=None)
        for ev in evs:
            # summaries quote tool output (text made in a sandbox): Text, never markup
            table.add_row(Text(str(ev.get("processed_at"))), Text(str(ev.get("type"))), Text(str(ev.get("id"))),
                          Text(_summary(ev, 100)))
        _console().print(table)

    _guard(admin, run)


# --------------------------------------------------------------------- the worker's session store
# These read the session store the workers share (host side), not the control plane.


def _store_option(f: F) -> F:
    return click.option(
        "--store", "store_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
        help="The workers' session store (default: <sandbox state dir>/sessions, as `sandbox worker` uses).",
    )(f)


def _store(store_dir: Path | None) -> Any:
    from sandbox.worker.cli import default_session_store
    from sandbox.worker.store import SessionStore

    path = store_dir or default_session_store()
    if not path.is_dir():
        _fail(f"no session store at {path} (a worker creates it; or pass --store)")
    return SessionStore(path)


def _run_lock(store: Any, session_id: str, wait: float = 5.0) -> Any:
    """The session's run lock, asking a parked sandbox to let go; None while a run is active."""
    import time

    lock = store.try_lock_run(session_id)
    if lock is None:
        store.want(session_id)
        deadline = time.monotonic() + wait
        while lock is None and time.monotonic() < deadline:
            time.sleep(0.2)
            lock = store.try_lock_run(session_id)
    return lock


def _ago(ts: float) -> str:
    import time

    s = max(0, int(time.time() - ts))
    return f"{s}s ago" if s < 120 else f"{s // 60}m ago" if s < 7200 else f"{s // 3600}h ago"


@session_group.command("list")
@_store_option
@click.option("--json", "as_json", is_flag=True)
def session_list(store_dir: Path | None, as_json: bool) -> None:
    """This host's sessions: state, workspace size, checkpoints, last activity, worker."""
    from sandbox.worker.checkpoints import Checkpoints

    store = _store(store_dir)
    rows = []
    for m in store.sessions():
        cps = Checkpoints(store.session_dir(m.session_id)).list()
        # The run lock is the truth (a crashed worker's "running" is stale); parked sandboxes hold it too.
        state = (m.state if m.state in ("running", "parked") else "running") if store.run_active(m.session_id) \
            else "idle"
        rows.append({"session_id": m.session_id, "state": state,
                     "workspace_bytes": store.workspace_bytes(m.workspace), "workspace_cap_mb": m.size_mb,
                     "checkpoints": len(cps), "last_activity": m.last_activity, "runs": m.runs, "worker": m.worker})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table
    from rich.text import Text

    from sandbox.cli import _console

    table = Table("session", "state", "workspace", "checkpoints", "runs", "last activity", "worker", box=None)
    for r in rows:
        table.add_row(Text(r["session_id"]), r["state"], f"{r['workspace_bytes'] / 2**20:.1f}/{r['workspace_cap_mb']} MiB",
                      str(r["checkpoints"]), str(r["runs"]), _ago(r["last_activity"]), Text(str(r["worker"] or "-")))
    _console().print(table)


@session_group.command("checkpoints")
@_store_option
@click.argument("session_id")
@click.option("--json", "as_json", is_flag=True)
def session_checkpoints(store_dir: Path | None, session_id: str, as_json: bool) -> None:
    """A session's workspace checkpoints: time, size, tool calls since the previous one, content digest."""
    import datetime

    from sandbox.worker.checkpoints import Checkpoints

    store = _store(store_dir)
    if store.meta(session_id) is None:
        _fail(f"no session {session_id!r} in {store.root}")
    cps = Checkpoints(store.session_dir(session_id)).list()
    if as_json:
        click.echo(json.dumps([c.to_dict() for c in cps], indent=2))
        return
    for c in cps:
        when = datetime.datetime.fromtimestamp(c.created_at, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        what = f"{c.files} files" if c.kind == "tree" else "archive"  # (CKPT) a cluster sandbox's own archive
        click.echo(f"{c.id}  {when}  {what}  {c.bytes_total} bytes ({c.bytes_new} new)  "
                   f"{c.calls} calls  {c.digest}")
    if not cps:
        click.echo("no checkpoints (one is recorded each time a run of the session goes idle)", err=True)


@session_group.command("restore")
@_store_option
@click.argument("session_id")
@click.argument("checkpoint_id")
def session_restore(store_dir: Path | None, session_id: str, checkpoint_id: str) -> None:
    """Roll the session's workspace back to CHECKPOINT_ID (refused while a run of the session is active)."""
    import time

    from sandbox.audit.trail import AuditTrail
    from sandbox.worker.checkpoints import CheckpointError, restore_into_store

    store = _store(store_dir)
    meta = store.meta(session_id)
    if meta is None:
        _fail(f"no session {session_id!r} in {store.root}")
    lock = _run_lock(store, session_id)
    if lock is None:
        _fail(f"session {session_id} has an active run; restore it once the run has gone idle", 1)
    try:
        # (CKPT) a cluster session's checkpoint is its stored archive: restored as such, never unpacked here
        info = restore_into_store(store, session_id, meta.workspace, checkpoint_id)
        trail = AuditTrail(store.trail_path(session_id), session=session_id, reopen=True)
        trail.lifecycle("restore", checkpoint=info.id, digest=info.digest, files=info.files,
                        bytes_total=info.bytes_total)
        trail.close("restored")
        store.update(session_id, last_activity=time.time(), calls_since_checkpoint=0)
    except CheckpointError as e:
        _fail(str(e), 1)
    finally:
        lock.release()
    click.echo(f"restored {session_id} to {info.id} ({info.digest})")


@session_group.command("export")
@_store_option
@click.argument("session_id")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--checkpoint", "checkpoint_id", default=None, help="Export this checkpoint instead of the workspace.")
def session_export(store_dir: Path | None, session_id: str, out: Path, checkpoint_id: str | None) -> None:
    """Write the session's workspace (or one checkpoint) as a tar file (symlinks kept as links)."""
    import tarfile

    from sandbox.worker.checkpoints import CheckpointError, Checkpoints

    store = _store(store_dir)
    meta = store.meta(session_id)
    if meta is None:
        _fail(f"no session {session_id!r} in {store.root}")
    lock = None
    if checkpoint_id:
        try:
            Checkpoints(store.session_dir(session_id)).get(checkpoint_id)
        except CheckpointError as e:
            _fail(str(e), 1)
        src = store.session_dir(session_id) / "checkpoints" / checkpoint_id / "files"
        if not src.is_dir():  # (CKPT) a cluster session's checkpoint: the sandbox's own tar, written out as is
            import shutil

            shutil.copyfile(src.with_name("workspace.tar"), out)
            click.echo(f"wrote {out} (the archive the session's sandbox wrote; not checked or unpacked here)")
            return
    else:
        lock = _run_lock(store, session_id, wait=2.0)
        if lock is None:
            _fail(f"session {session_id} has an active run; export a checkpoint (--checkpoint) or wait", 1)
        src = store.ensure_mounted(meta.workspace)
    try:
        with tarfile.open(out, "w") as tar:
            tar.add(src, arcname="workspace", recursive=True)  # never dereferences symlinks
    finally:
        if lock is not None:
            lock.release()
    click.echo(f"wrote {out}")
