"""``sandbox proxy`` and ``sandbox egress ...`` (registered lazily by sandbox/cli.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import click

from sandbox.egress import evloop
from sandbox.egress.audit import AuditLog, AuditRecord, read_records
from sandbox.egress.manager import EgressManager, default_state_dir
from sandbox.egress.rules import EgressPolicy

CLI_SESSION = "proxy-cli"


def load_rules(path: Path) -> EgressPolicy:
    """An egress policy from YAML: a bare EgressPolicy, or a profile with an ``egress:``
    key (a profile that ``extends:`` another is loaded through the policy loader)."""
    from sandbox.policy_base import PolicyError, read_yaml

    try:
        doc = read_yaml(path) or {}  # strict: a key given twice is an error naming both lines
    except PolicyError as e:
        raise click.BadParameter("; ".join(f"{f}: {r}" for f, _, r in e.problems)) from None
    if not isinstance(doc, dict):
        raise click.BadParameter(f"{path}: expected a mapping")
    if "egress" in doc:
        if "extends" in doc or "name" in doc:
            from sandbox.policy import load_policy

            return load_policy(str(path)).egress
        return EgressPolicy.model_validate(doc["egress"])
    return EgressPolicy.model_validate(doc)


def _parse_listen(text: str) -> tuple[str, int]:
    import ipaddress

    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter("expected HOST:PORT, e.g. 127.0.0.1:8080", param_hint="--listen")
    host = host.strip("[]") or "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        # A TCP port cannot tell sandboxes (or LAN hosts) apart: it would be an open proxy.
        raise click.BadParameter("the proxy listens on a loopback address only (e.g. 127.0.0.1)", param_hint="--listen")
    return host, int(port)


@click.command("proxy")
@click.option("--profile-rules", "rules_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path), help="YAML with an egress policy (or a profile with an egress: key).")
@click.option("--listen", default="127.0.0.1:8080", show_default=True, help="Loopback HOST:PORT to listen on.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="Where audit.jsonl goes (default: $SANDBOX_STATE_DIR/egress).")
def proxy_cmd(rules_file: Path, listen: str, state_dir: Path | None) -> None:
    """Run the egress proxy in the foreground on a TCP port, with one fixed session's rules.

    For operators testing rules: point a client at it (curl -x http://127.0.0.1:8080 ...).
    Sandboxes never use this; their proxy is started for them.
    """
    from rich.console import Console

    from sandbox.egress.proxy import EgressProxy

    from sandbox.egress.credentials import CredentialError
    from sandbox.egress.credentials import resolve as resolve_material

    policy = load_rules(rules_file)
    host, port = _parse_listen(listen)
    try:
        material = resolve_material(policy)  # credentials from this shell's environment, files, commands
    except CredentialError as e:
        raise click.ClickException(f"egress credentials: {e}") from None
    state = (state_dir or default_state_dir())
    state.mkdir(parents=True, exist_ok=True)
    audit = AuditLog(state / "audit.jsonl")
    console = Console(stderr=True)

    def show(rec: AuditRecord) -> None:
        colour = {"allow": "green", "deny": "red"}.get(rec.decision, "yellow")
        console.print(f"[{colour}]{rec.decision:5}[/] {rec.method or '-'} {rec.host or '-'}:{rec.port or '-'} -> {rec.addr or '-'}  {rec.rule or ''} {rec.code}: {rec.reason}", highlight=False, markup=True)

    async def run() -> None:
        proxy = EgressProxy(audit=audit)
        proxy.on_record = show
        bound = await proxy.add_tcp_listener(CLI_SESSION, policy, host, port, material=material)
        n = len(policy.rules)
        console.print(f"egress proxy on http://{bound[0]}:{bound[1]} ({n} rule(s), {len(policy.allow_cidrs)} CIDR(s)); audit: {audit.path}; Ctrl-C stops")
        ca = proxy.session_ca_pem(CLI_SESSION)
        if ca is not None:
            ca_path = state / "proxy-cli-ca.pem"
            ca_path.write_bytes(ca)
            console.print(f"terminated hosts are served with a session CA: trust {ca_path} (e.g. curl --cacert)")
        try:
            await asyncio.Event().wait()
        finally:
            await proxy.close()

    try:
        evloop.run(run())
    except KeyboardInterrupt:
        pass
    finally:
        audit.close()


@click.group("egress")
def egress_group() -> None:
    """Inspect egress proxy decisions and the proxy daemon."""


@egress_group.command("log")
@click.option("--session", default=None, help="Only this session's decisions.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document (a list of records) instead of a table.")
@click.option("-n", "limit", default=50, show_default=True, type=click.IntRange(1, 100000), help="How many recent records.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
def log_cmd(session: str | None, as_json: bool, limit: int, state_dir: Path | None) -> None:
    """Recent egress decisions (oldest first)."""
    path = (state_dir or default_state_dir()) / "audit.jsonl"
    records = read_records(path, session=session, limit=limit)
    if as_json:
        click.echo(json.dumps(records, indent=2))  # one document, as `--json` is on every command
        return
    if not records:
        click.echo(f"no egress decisions recorded{' for ' + session if session else ''} ({path})")
        return
    _table(records)


def _table(records: list[dict[str, Any]]) -> None:
    from rich.markup import escape
    from rich.table import Table

    from sandbox.cli import _console

    t = Table(title="egress decisions")
    for col in ("time", "session", "decision", "method", "destination", "address", "rule / reason", "up", "down", "ms"):
        t.add_column(col, overflow="fold")
    for r in records:
        colour = {"allow": "green", "deny": "red"}.get(str(r.get("decision")), "yellow")
        dest = f"{r.get('host') or '-'}:{r.get('port') or '-'}{r.get('path') or ''}"
        why = r.get("rule") if r.get("decision") == "allow" else f"{r.get('code')}: {r.get('reason')}"
        extra = [x for x in (r.get("tls"), r.get("status") and f"HTTP {r.get('status')}",
                             r.get("credential") and f"credential {r.get('credential')}") if x]
        if extra:
            why = f"{why or ''} [{', '.join(str(x) for x in extra)}]"
        # Every field but the colour comes from a request a sandbox made: never read it as markup.
        t.add_row(
            escape(str(r.get("ts", ""))[11:23]), escape(str(r.get("session"))), f"[{colour}]{escape(str(r.get('decision')))}[/]",
            escape(str(r.get("method") or "-")), escape(dest), escape(str(r.get("addr") or "-")), escape(str(why or "")),
            str(r.get("bytes_up", 0)), str(r.get("bytes_down", 0)), str(r.get("duration_ms", "")),
        )  # fmt: skip
    _console().print(t)


@egress_group.command("status")
@click.option("--json", "as_json", is_flag=True)
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
def status_cmd(as_json: bool, state_dir: Path | None) -> None:
    """Whether the egress daemon runs, as whom, and its sessions (never starts it)."""
    st = EgressManager(state_dir).status()
    if as_json:
        click.echo(json.dumps(st or {"running": False}))
        return
    if st is None:
        click.echo("egress daemon: not running (it starts when a sandbox with egress rules does)")
        return
    click.echo(f"egress daemon: pid {st['pid']} uid {st['uid']} state {st['state_dir']} idle-exit {st['idle_exit_s']}s")
    for s in st["sessions"]:
        click.echo(f"  {s['session']}: {s['connections']} connection(s), {s['bytes_used']} bytes, budget left {s['budget_left']}")
