"""`sandbox audit`: audit a fresh sandbox of a profile, or any container; `sandbox audit verify` checks a
trail; `sandbox audit diff` compares two saved audits."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

if TYPE_CHECKING:
    from sandbox.audit.model import AuditReport

AUDIT_HELP = """Audit isolation: start a fresh sandbox of --profile (default: default) and probe it
inside and out, or audit an existing container with --container ID.

\b
Inside probes run code in the container: for --container they run only with --probe
(python3 if the container has it, else a POSIX sh subset; rows that could not run say so).
Without --probe a container audit checks its configuration only, and says so.
The probe also forks up to the container's pids limit, briefly, to show the limit holds
(--no-fork-test skips that), and a profile audit sends SIGSTOP/SIGTERM/SIGKILL to its own
sandbox's agent and starts a second sandbox of the profile to compare their uids.

\b
Output: --format text (the table, default), md or html (a report to review and sign:
image and policy digests, declared weakenings, kernel, runtime and versions, the CIS
benchmark edition its ids refer to, every check with its evidence), json, junit.
--output FILE writes it there instead of stdout. --json is --format json on stdout.
(--json FILE and --junit FILE still write those files beside the table.)

\b
Exit status:
  0  every check passed (warnings and info rows do not fail)
  1  at least one check failed
  2  usage: bad options, or an output file that cannot be written (checked before anything runs)
  3  the audit could not run (no such profile or container, engine unreachable, sandbox refused)
"""

EXIT_FAILED, EXIT_USAGE, EXIT_ERROR = 1, 2, 3


def _error(message: str, code: int, as_json: bool) -> NoReturn:
    """The one way this command fails: a line on stderr, and with JSON output a JSON error on stdout."""
    click.echo(f"sandbox audit: {message}", err=True)
    if as_json:
        kind = {EXIT_USAGE: "usage", EXIT_ERROR: "audit"}.get(code, "error")  # the shape of sandbox.cli.fail
        click.echo(json.dumps({"error": {"kind": kind, "message": message, "exit_code": code}}))
    sys.exit(code)


def check_writable(path: str, what: str) -> str | None:
    """Why ``path`` cannot be written as a new or replaced file, or None when it can."""
    p = Path(path)
    if p.is_dir():
        return f"{what} {path!r} is a directory"
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        return f"{what} {path!r}: directory {str(parent)!r} does not exist"
    if not parent.is_dir():
        return f"{what} {path!r}: {str(parent)!r} is not a directory"
    if p.exists():
        if not os.access(p, os.W_OK):
            return f"{what} {path!r} is not writable"
    elif not os.access(parent, os.W_OK | os.X_OK):
        return f"{what} {path!r}: directory {str(parent)!r} is not writable"
    return None


def _write(path: str, text: str) -> None:
    tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)  # a reader never sees half a report


@click.group("audit", invoke_without_command=True, help=AUDIT_HELP,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--profile", "-p", default=None, help="Profile name or YAML path to audit (default: default).")
@click.option("--container", "-c", "container", default=None, help="Audit this running container instead.")
@click.option("--probe", is_flag=True, help="With --container: run the inside probes in it (executes code there).")
@click.option("--format", "-f", "fmt", type=click.Choice(["text", "md", "html", "json", "junit"]), default=None,
              help="Report format (default text).")
@click.option("--output", "-o", default=None, metavar="FILE", help="Write the report to FILE instead of stdout.")
@click.option("--json", "json_out", default=None, is_flag=False, flag_value="-", metavar="[FILE]",
              help="JSON on stdout (same as --format json); with FILE: also write JSON there, beside the table.")
@click.option("--junit", default=None, metavar="FILE", help="Also write a JUnit XML report (one testcase per check).")
@click.option("--no-fork-test", is_flag=True, help="Skip the bounded fork test against the pids limit.")
@click.pass_context
def audit_group(ctx: click.Context, profile: str | None, container: str | None, probe: bool, fmt: str | None,
                output: str | None, json_out: str | None, junit: str | None, no_fork_test: bool) -> None:
    if ctx.invoked_subcommand is not None:
        return
    from sandbox.audit.runner import AuditError

    if json_out == "-":
        if fmt not in (None, "json"):
            raise click.UsageError("--json is --format json; give one of them")
        fmt, json_file = "json", None
    else:
        json_file = json_out
    fmt = fmt or "text"
    as_json = fmt == "json" and output is None
    if container and profile:
        _usage("--profile and --container are exclusive", as_json)
    if probe and not container:
        _usage("--probe applies to --container (a profile audit always probes its own sandbox)", as_json)
    # Every output is checked before a sandbox starts: a typo must not cost an audit and then crash.
    for path, what in ((output, "--output"), (json_file, "--json"), (junit, "--junit")):
        why = check_writable(path, what) if path else None
        if why:
            _usage(f"cannot write the report: {why}", as_json)
    try:
        if container:
            report = _audit_container(container, probe, not no_fork_test)
        else:
            report = _audit_profile(profile or "default", not no_fork_test)
    except AuditError as e:
        _error(str(e), EXIT_ERROR, as_json)
    _emit(report, fmt, output, json_file, junit)
    sys.exit(0 if report.ok else EXIT_FAILED)


def _usage(message: str, as_json: bool) -> NoReturn:
    _error(message, EXIT_USAGE, as_json)


def _emit(report: AuditReport, fmt: str, output: str | None, json_file: str | None, junit: str | None) -> None:
    from sandbox.audit.report import render, render_table, to_json, to_junit

    if output:
        _write(output, render(report, fmt))
        click.echo(f"{report.summary()}\n{fmt} report written to {output}", err=fmt == "json")
    elif fmt == "text":
        render_table(report)
    else:
        sys.stdout.write(render(report, fmt))
        sys.stdout.flush()
    if json_file:
        _write(json_file, to_json(report) + "\n")
    if junit:
        _write(junit, to_junit(report) + "\n")


def _audit_profile(profile: str, fork_test: bool) -> AuditReport:
    from sandbox.audit.runner import AuditError, audit_policy
    from sandbox.policy import PolicyError, load_policy

    try:
        policy = load_policy(profile)
    except PolicyError as e:
        raise AuditError(str(e)) from None
    try:
        from sandbox.runtime import Runtime

        rt = Runtime(owner_kind="audit")
    except Exception as e:  # noqa: BLE001 - engine not reachable
        from sandbox.audit.hostfacts import engine_error_words

        raise AuditError(f"cannot reach the Docker engine: {engine_error_words(e)}; run `sandbox doctor`") from None
    return audit_policy(policy, rt, fork_test=fork_test)


def _audit_container(container: str, probe: bool, fork_test: bool) -> AuditReport:
    from sandbox.audit.runner import AuditError, audit_container

    try:
        import docker

        client = docker.from_env(timeout=120)
        client.ping()
    except Exception as e:  # noqa: BLE001
        from sandbox.audit.hostfacts import engine_error_words

        raise AuditError(f"cannot reach the Docker engine: {engine_error_words(e)}; run `sandbox doctor`") from None
    return audit_container(client, container, probe=probe, fork_test=fork_test)


@audit_group.command("verify")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--allow-open", is_flag=True, help="Accept a trail without its closing record (a live session).")
@click.option("--head", "expect_head", default=None, help="The anchored head hash the trail must end at.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify_cmd(file: str, allow_open: bool, expect_head: str | None, as_json: bool) -> None:
    """Check a session's audit trail: the hash chain, sequence and closing record.
    Exit 1 naming the first broken record."""
    from sandbox.audit.trail import verify

    try:
        res = verify(file, allow_open=allow_open, expect_head=expect_head)
    except OSError as e:
        click.echo(f"sandbox audit verify: {e}", err=True)
        sys.exit(EXIT_ERROR)
    if as_json:
        click.echo(json.dumps(res.to_dict()))
    elif res.ok:
        click.echo(f"{file}: OK, {res.reason}; head {res.head}")
    else:
        click.echo(f"{file}: BROKEN at record {res.first_bad}: {res.reason} "
                   f"({res.records} valid records before it)")
    sys.exit(0 if res.ok else EXIT_FAILED)


@audit_group.command("diff")
@click.argument("old", type=click.Path(dir_okay=False))
@click.argument("new", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.option("--all", "show_all", is_flag=True, help="Also list rows whose evidence changed but not their result.")
def diff_cmd(old: str, new: str, as_json: bool, show_all: bool) -> None:
    """What changed between two saved audits (`sandbox audit --json > FILE`): checks added or
    removed, results changed, digests and versions changed.

    \b
    Exit status: 0 nothing got worse; 1 something got worse (a result fell from pass/info to
    warn, skip or fail, a check that held is gone, or a new check fails); 3 a file is missing
    or not an audit report. Changed digests and versions are listed; their effect shows in
    the rows."""
    from sandbox.audit.diff import DiffError, diff_reports, load_report, render_diff

    try:
        a, b = load_report(old), load_report(new)
    except DiffError as e:
        _error(str(e), EXIT_ERROR, as_json)
    d = diff_reports(a, b)
    if as_json:
        doc: dict[str, Any] = d.to_dict()
        doc.update({"old": old, "new": new})
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(render_diff(d, old, new, show_all=show_all), nl=False)
    sys.exit(EXIT_FAILED if d.worse else 0)
