"""`sandbox audit`: audit a fresh sandbox of a profile, or any container; `sandbox audit verify` checks a trail."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from sandbox.audit.model import AuditReport

AUDIT_HELP = """Audit isolation: start a fresh sandbox of --profile (default: default) and probe it
inside and out, or audit an existing container with --container ID.

\b
Inside probes run code in the container: for --container they run only with --probe
(python3 if the container has it, else a POSIX sh subset; rows that could not run say so).
The probe also forks up to the container's pids limit, briefly, to show the limit holds
(--no-fork-test skips that). The report names the image digest, runtime, kernel and policy
hash it audited.

\b
Exit status:
  0  every check passed (warnings and info rows do not fail)
  1  at least one check failed
  3  the audit could not run (engine unreachable, sandbox refused, no such container)
"""

EXIT_FAILED, EXIT_ERROR = 1, 3


def _emit(report: AuditReport, json_out: str | None, junit: str | None) -> None:
    from sandbox.audit.report import render_table, to_json, to_junit

    if json_out == "-":
        click.echo(to_json(report))
    else:
        render_table(report)
        if json_out:
            Path(json_out).write_text(to_json(report) + "\n")
    if junit:
        Path(junit).write_text(to_junit(report) + "\n")


@click.group("audit", invoke_without_command=True, help=AUDIT_HELP,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--profile", "-p", default=None, help="Profile name or YAML path to audit (default: default).")
@click.option("--container", "-c", "container", default=None, help="Audit this running container instead.")
@click.option("--probe", is_flag=True, help="With --container: run the inside probes in it (executes code there).")
@click.option("--json", "json_out", default=None, metavar="FILE|-", help="Write the report as JSON ('-': stdout only).")
@click.option("--junit", default=None, metavar="FILE", type=click.Path(dir_okay=False),
              help="Write a JUnit XML report (one testcase per check).")
@click.option("--no-fork-test", is_flag=True, help="Skip the bounded fork test against the pids limit.")
@click.pass_context
def audit_group(ctx: click.Context, profile: str | None, container: str | None, probe: bool, json_out: str | None,
                junit: str | None, no_fork_test: bool) -> None:
    if ctx.invoked_subcommand is not None:
        return
    from sandbox.audit.runner import AuditError

    if container and profile:
        raise click.UsageError("--profile and --container are exclusive")
    if probe and not container:
        raise click.UsageError("--probe applies to --container (a profile audit always probes its own sandbox)")
    try:
        if container:
            report = _audit_container(container, probe, not no_fork_test)
        else:
            report = _audit_profile(profile or "default", not no_fork_test)
    except AuditError as e:
        click.echo(f"sandbox audit: {e}", err=True)
        sys.exit(EXIT_ERROR)
    _emit(report, json_out, junit)
    sys.exit(0 if report.ok else EXIT_FAILED)


def _audit_profile(profile: str, fork_test: bool) -> AuditReport:
    from sandbox.audit.runner import AuditError, audit_policy
    from sandbox.policy import PolicyError, load_policy

    try:
        policy = load_policy(profile)
    except PolicyError as e:
        raise click.UsageError(str(e)) from None
    try:
        from sandbox.runtime import Runtime

        rt = Runtime(owner_kind="audit")
    except Exception as e:  # noqa: BLE001 - engine not reachable
        raise AuditError(f"cannot reach the Docker engine: {e}; run `sandbox doctor`") from None
    return audit_policy(policy, rt, fork_test=fork_test)


def _audit_container(container: str, probe: bool, fork_test: bool) -> AuditReport:
    from sandbox.audit.runner import AuditError, audit_container

    try:
        import docker

        client = docker.from_env(timeout=120)
        client.ping()
    except Exception as e:  # noqa: BLE001
        raise AuditError(f"cannot reach the Docker engine: {e}") from None
    return audit_container(client, container, probe=probe, fork_test=fork_test)


@audit_group.command("verify")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--allow-open", is_flag=True, help="Accept a trail without its closing record (a live session).")
@click.option("--head", "expect_head", default=None, help="The anchored head hash the trail must end at.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify_cmd(file: str, allow_open: bool, expect_head: str | None, as_json: bool) -> None:
    """Check a session's audit trail: the hash chain, sequence and closing record.
    Exit 1 naming the first broken record."""
    import json

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
