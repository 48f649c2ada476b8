"""The `sandbox` command line.

Output people read is a table (rich); output programs read is JSON (--json).
Modules are imported inside commands so that `sandbox exec` pays only for what
it uses.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

import click

EXEC_HELP = """Run one command in a fresh sandbox, stream its output, and tear the sandbox down.

\b
Exit status: the command's own, or when the sandbox stopped it:
  240  the sandbox could not run the command (engine, image, agent)
  241  timeout         (--timeout or the policy's timeouts.call_s)
  242  memory          (cgroup memory limit; OOM kill)
  243  pids            (process limit; forks failed)
  244  output          (output cap; output truncated)
  245  file size       (RLIMIT_FSIZE)
  246  CPU time        (RLIMIT_CPU)
"""


def _console(stderr: bool = False):  # noqa: ANN202 - rich is imported lazily
    from rich.console import Console

    return Console(stderr=stderr)


def _fail(msg: str, code: int = 2) -> None:
    click.echo(f"sandbox: {msg}", err=True)
    sys.exit(code)


def _load(profile: str):  # noqa: ANN202
    from sandbox.policy import PolicyError, load_policy

    try:
        return load_policy(profile)
    except PolicyError as e:
        _fail(str(e))


# Subcommands that live with their subsystem, imported only when used.
LAZY_COMMANDS: dict[str, str] = {
    "proxy": "sandbox.egress.cli:proxy_cmd",
    "egress": "sandbox.egress.cli:egress_group",
    "control-plane": "sandbox.controlplane.cli:control_plane_cmd",
    "session": "sandbox.controlplane.cli:session_group",
    "worker": "sandbox.worker.cli:worker_cmd",
    "demo": "sandbox.worker.cli:demo_cmd",
    "audit": "sandbox.audit.cli:audit_group",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in LAZY_COMMANDS and name not in self.commands:
            import importlib

            mod, attr = LAZY_COMMANDS[name].split(":")
            try:
                return getattr(importlib.import_module(mod), attr)
            except (ImportError, AttributeError) as e:
                return click.Command(name, help=f"(unavailable: {e})",
                                     callback=lambda: _fail(f"{name} is unavailable: {e}"))
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Hardened local sandboxes for the tool calls of AI agents."""


@main.command("exec", help=EXEC_HELP, context_settings={"ignore_unknown_options": True})
@click.option("--profile", "-p", default="default", show_default=True, help="Profile name or path to a YAML file.")
@click.option("--workspace", "-w", type=click.Path(file_okay=False), help="Host directory to mount as the workspace.")
@click.option("--timeout", "-t", type=float, help="Seconds before the command is killed (overrides the policy).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON result instead of streaming.")
@click.option("--verbose", "-v", is_flag=True, help="Say what runs, as which user, under which limits.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_cmd(profile: str, workspace: str | None, timeout: float | None, as_json: bool, verbose: bool,
             command: tuple[str, ...]) -> None:
    from sandbox.runtime import LIMIT_EXIT_CODES, LIMIT_WORDS, SANDBOX_ERROR_EXIT, Runtime, SandboxError

    policy = _load(profile)
    if timeout is not None:
        if timeout <= 0:
            _fail("--timeout must be positive")
        policy = policy.model_copy(update={"timeouts": policy.timeouts.model_copy(update={"call_s": timeout})})
    if verbose:
        click.echo(f"sandbox: {describe_line(policy)}", err=True)
    try:
        rt = Runtime(owner_kind="exec")
    except Exception as e:  # noqa: BLE001 - any engine failure
        _fail(f"cannot reach the Docker engine: {e}; run `sandbox doctor`", SANDBOX_ERROR_EXIT)
    sb = None

    def on_signal(signum: int, _frame: Any) -> None:
        if sb is not None:
            sb.destroy()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        from pathlib import Path

        sb = rt.create(policy, workspace=Path(workspace) if workspace else None)
    except (SandboxError, ValueError) as e:
        _fail(str(e), SANDBOX_ERROR_EXIT)
    try:
        if as_json:
            res = sb.exec(list(command))
        else:
            out, err = sys.stdout.buffer, sys.stderr.buffer

            def stream(fd: int, data: bytes) -> None:
                w = err if fd == 2 else out
                w.write(data)
                w.flush()

            res = sb.exec(list(command), on_output=stream)
    finally:
        sb.destroy()
    if as_json:
        doc = res.to_json()
        doc["profile"] = policy.name
        click.echo(json.dumps(doc))
    else:
        if res.error:
            click.echo(f"sandbox: {res.error}", err=True)
        if res.limit:
            click.echo(f"sandbox: limit hit: {res.limit}: {LIMIT_WORDS[res.limit]}", err=True)
    if res.limit:
        sys.exit(LIMIT_EXIT_CODES[res.limit])
    sys.exit(res.exit_code)


def describe_line(policy: Any) -> str:
    from sandbox.explain import summary_line  # names the filter's changes and every declared weakening

    return summary_line(policy)


# ------------------------------------------------------------------ policy

@main.group()
def policy() -> None:
    """Explain, lint and compile policies."""


@policy.command("explain")
@click.argument("profile")
@click.option("--json", "as_json", is_flag=True)
def policy_explain(profile: str, as_json: bool) -> None:
    """Everything a policy allows and denies, and which file of its `extends` chain set it."""
    import dataclasses
    from pathlib import Path

    from sandbox.explain import explain_table

    pol = _load(profile)
    rows = explain_table(pol)
    if as_json:
        click.echo(json.dumps({"policy": pol.name, "digest": pol.digest(),
                               "weakenings": [dataclasses.asdict(w) for w in pol.weakenings()],
                               "rows": rows}, indent=2))
        return
    from rich.markup import escape
    from rich.table import Table

    files = list(dict.fromkeys(r["source"] for r in rows if r["source"].startswith("/")))
    t = Table(title=f"policy {pol.name}  ({pol.digest()[:19]})",
              caption="set by: " + "; ".join(f"{Path(f).name} = {f}" for f in files) if files else None)
    for col in ("area", "setting", "value", "set by"):
        t.add_column(col)
    for r in rows:
        style = "bold red" if r["area"] == "UNSAFE" and r["key"] != "unsafe" else None
        src = Path(r["source"]).name if r["source"].startswith("/") else r["source"]
        t.add_row(*(escape(str(r[k])) for k in ("area", "setting", "value")), escape(src), style=style)
    _console().print(t)


@policy.command("lint")
@click.argument("paths", nargs=-1, required=True)
def policy_lint(paths: tuple[str, ...]) -> None:
    """Validate profiles; name the file, key and reason of every error.

    Anything weaker than the shipped baseline (a dangerous syscall, a lifted argument check, a
    default action other than errno/kill_process, a non-public egress range) is an error unless
    the profile accepts it in writing under `unsafe:`; accepted ones are listed."""
    from sandbox.policy import PolicyError, load_policy

    bad = 0
    for p in paths:
        try:
            pol = load_policy(p)
            weak = pol.weakenings()
        except PolicyError as e:
            bad += 1
            for f, k, r in e.problems:
                click.echo(f"{f}: {k}: {r}")
            continue
        note = f"; UNSAFE (declared): {', '.join(w.id for w in weak)}" if weak else ""
        click.echo(f"{p}: ok ({pol.digest()[:19]}){note}")
    sys.exit(1 if bad else 0)


@policy.command("seccomp")
@click.argument("profile")
@click.option("--format", "fmt", type=click.Choice(["oci", "pfc", "bpf"]), default="oci", show_default=True)
def policy_seccomp(profile: str, fmt: str) -> None:
    """Print the compiled seccomp filter (OCI JSON, libseccomp PFC, or raw BPF), as the runtime loads it."""
    from sandbox import seccomp as sc
    from sandbox.policy import PolicyError

    pol = _load(profile)
    try:
        flt = pol.seccomp_filter()
    except PolicyError as e:
        _fail(str(e))
    if fmt == "oci":
        click.echo(json.dumps(sc.to_oci(flt), indent=2))
    elif fmt == "pfc":
        click.echo(sc.to_pfc(flt), nl=False)
    else:
        sys.stdout.buffer.write(sc.to_bpf(flt))


@policy.command("list")
def policy_list() -> None:
    """Profiles on the search path."""
    from sandbox.policy import profile_search_path

    seen = set()
    for d in profile_search_path():
        for f in sorted(d.glob("*.yaml")) if d.is_dir() else []:
            if f.stem not in seen:
                seen.add(f.stem)
                click.echo(f"{f.stem}\t{f}")


# ------------------------------------------------------------------ images, doctor, gc

@main.group()
def images() -> None:
    """Build and list the sandbox images (offline: debootstrap + docker import)."""


@images.command("build")
@click.option("--force", is_flag=True, help="Rebuild even when the recipe is unchanged.")
def images_build(force: bool) -> None:
    import docker
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from sandbox import images as im

    client = docker.from_env(timeout=900)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=_console(stderr=True)) as prog:
        for r in im.recipes():
            task = prog.add_task(r.name, total=None)

            def step(msg: str, task: Any = task, name: str = r.name) -> None:
                prog.update(task, description=f"{name}: {msg}")
                prog.console.log(f"{name}: {msg}")

            try:
                tag = im.build(client, r, step, force=force)
            except RuntimeError as e:
                _fail(str(e))
            prog.update(task, description=f"{r.name}: {tag}", total=1, completed=1)


@images.command("list")
def images_list() -> None:
    import docker

    from sandbox import images as im

    client = docker.from_env()
    for r in im.recipes():
        tag = r.image_tag()
        click.echo(f"{tag}\t{'present' if im.image_present(client, tag) else 'missing'}")


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--profile", "-p", default="default", show_default=True, help="Policy the self-test canaries run under.")
@click.option("--no-canaries", is_flag=True, help="Skip the attack canaries (no sandbox is started).")
def doctor(as_json: bool, profile: str, no_canaries: bool) -> None:
    """Check the host (engine, cgroups, seccomp, runtimes, images), then run attack canaries in a sandbox."""
    from sandbox.doctor import run_checks

    checks = run_checks(profile, canaries=not no_canaries)
    if as_json:
        click.echo(json.dumps([c.__dict__ for c in checks], indent=2))
    else:
        from rich.table import Table

        t = Table(title="sandbox doctor")
        for col in ("check", "status", "detail", "fix"):
            t.add_column(col)
        for c in checks:
            t.add_row(c.name, {"ok": "[green]ok", "warn": "[yellow]warn", "fail": "[red]FAIL"}[c.status],
                      c.detail, c.fix or "")
        _console().print(t)
    sys.exit(1 if any(c.status == "fail" for c in checks) else 0)


@main.command()
@click.option("--all", "everything", is_flag=True, help="Remove every sandbox of this host, live owners included.")
def gc(everything: bool) -> None:
    """Remove sandboxes left behind by crashed processes on this host."""
    from sandbox.runtime import Runtime

    removed = Runtime(owner_kind="gc").gc(everything=everything)
    click.echo(f"removed {len(removed)} sandbox(es)" + (": " + " ".join(removed) if removed else ""))




if __name__ == "__main__":
    main()
