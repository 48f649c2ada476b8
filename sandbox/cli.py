"""The `sandbox` command line.

Output people read is a table (rich); output programs read is JSON (--json).
`--json` means the same on every command: one JSON document on stdout, and on
failure a JSON error object on stdout, ``{"error": {"kind", "message", "exit_code"}}``,
with the documented exit status (the message also goes to stderr).
Output that is not a terminal is never truncated or wrapped.

Listing the commands (`sandbox --help`) imports no subcommand module: each is
imported when it runs, so `sandbox exec` pays only for what it uses.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any, NoReturn

import click

if TYPE_CHECKING:
    from rich.console import Console

    from sandbox.policy import Policy

EXIT_USAGE = 2        # bad option, profile, policy, environment or timeout
EXIT_SANDBOX = 240    # the sandbox could not run the command (engine, image, workspace, agent)

EXEC_HELP = """Run one command in a fresh sandbox, stream its output, and tear the sandbox down.

Options end at the first word of COMMAND (as with `docker exec`): everything after
it is the command's own (`sandbox exec grep -h x f`); `--` is accepted too.

\b
Environment: -e KEY=VAL sets a variable, -e KEY passes the host's value, --env-file
reads KEY=VAL lines (Docker's format: # comments, blank lines, no quoting). Names are
checked by the same rules as a policy's env: (credentials such as ANTHROPIC_* and
loader variables such as LD_PRELOAD are refused). --timeout is checked as the
policy's timeouts.call_s (a number of seconds, > 0, at most 86400).

\b
Exit status: the command's own, or:
  2    usage: a bad option, profile, policy, --env or --timeout
  240  the sandbox could not run the command (engine, image, workspace, agent)
  241  timeout         (--timeout or the policy's timeouts.call_s)
  242  memory          (cgroup memory limit; OOM kill)
  243  pids            (process limit; forks failed)
  244  output          (output cap; output truncated)
  245  file size       (RLIMIT_FSIZE)
  246  CPU time        (RLIMIT_CPU)
With --json: one JSON result that says which limit fired ("limit",
"limit_message"), or {"error": {"kind", "message", "exit_code"}} on failure.
"""


# ------------------------------------------------------------------ output helpers

def _console(stderr: bool = False) -> Console:
    """A rich Console; when the stream is not a terminal, never truncated nor wrapped."""
    from rich.console import Console

    con = Console(stderr=stderr)
    if con.is_terminal:
        return con
    return Console(stderr=stderr, width=100_000, soft_wrap=True, no_color=True, highlight=False)


def _json_wanted() -> bool:
    ctx = click.get_current_context(silent=True)
    while ctx is not None:
        if ctx.params.get("as_json") is True:
            return True
        ctx = ctx.parent
    return False


def emit_json(doc: Any) -> None:
    """One JSON document on stdout."""
    click.echo(json.dumps(doc, indent=2, default=str))


def fail(msg: str, code: int = EXIT_USAGE, kind: str | None = None, **extra: Any) -> NoReturn:
    """Report a failure and exit: `sandbox: MSG` on stderr; under --json also
    ``{"error": {...}}`` on stdout. Other modules' commands may use this too."""
    kind = kind or {EXIT_USAGE: "usage", EXIT_SANDBOX: "sandbox"}.get(code, "error")
    if _json_wanted():
        emit_json({"error": {"kind": kind, "message": msg, "exit_code": code, **extra}})
    click.echo(f"sandbox: {msg}", err=True)
    sys.exit(code)


_fail = fail


def _load(profile: str) -> Policy:
    from sandbox.policy import PolicyError, load_policy

    try:
        return load_policy(profile)
    except PolicyError as e:
        _fail(str(e), EXIT_USAGE, kind="policy", problems=[list(p) for p in e.problems])


# ------------------------------------------------------------------ the command group

# Subcommands that live with their subsystem, imported only when used: name -> (target, short help).
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "proxy": ("sandbox.egress.cli:proxy_cmd", "Run the egress proxy in the foreground (one session's rules)."),
    "egress": ("sandbox.egress.cli:egress_group", "Inspect egress proxy decisions and the proxy daemon."),
    "control-plane": ("sandbox.controlplane.cli:control_plane_cmd",
                      "Run the local control plane (Work and Sessions APIs)."),
    "session": ("sandbox.controlplane.cli:session_group", "Drive sessions on the local control plane."),
    "worker": ("sandbox.worker.cli:worker_cmd", "Claim work from a control plane and run it in sandboxes."),
    "demo": ("sandbox.worker.cli:demo_cmd", "Run the main job on one machine (control plane, worker, session)."),
    "audit": ("sandbox.audit.cli:audit_group", "Audit isolation of a profile's sandbox or any container."),
    "kube": ("sandbox.kube.cli:kube_group", "Make what a Kubernetes deployment needs (admin TLS)."),
}


def _value_options(cmd: click.Command) -> set[str]:
    out: set[str] = set()
    for p in cmd.params:
        if isinstance(p, click.Option) and not p.is_flag and not p.count:
            out.update(p.opts)
    return out


def _args_want_json(ctx: click.Context, tokens: list[str]) -> bool:
    """Whether the command line asks for --json, read as click would (options end at `--`,
    and at the first word of a command that takes no options after its arguments)."""
    cmd: click.Command = ctx.command
    while True:
        values, i, sub = _value_options(cmd), 0, None
        interspersed = cmd.context_settings.get("allow_interspersed_args",
                                                not isinstance(cmd, click.Group))
        while i < len(tokens):
            t = tokens[i]
            if t == "--":
                return False
            if t == "--json":
                return True
            if t.startswith("-") and t != "-":
                i += 2 if t in values else 1
                continue
            if isinstance(cmd, click.Group):
                try:
                    sub = cmd.get_command(ctx, t)
                except Exception:  # noqa: BLE001 - only deciding the error format
                    sub = None
                break
            if not interspersed:
                return False
            i += 1
        if sub is None:
            return False
        cmd, tokens = sub, tokens[i + 1:]


class SandboxGroup(click.Group):
    """Lazy subcommands (listed without importing them) and --json errors for usage mistakes."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in LAZY_COMMANDS and name not in self.commands:
            import importlib

            mod, attr = LAZY_COMMANDS[name][0].split(":")
            try:
                cmd: click.Command = getattr(importlib.import_module(mod), attr)
            except (ImportError, AttributeError) as e:
                err = f"{name} is unavailable: {type(e).__name__}: {e}"
                return click.Command(name, help=f"({err})", callback=lambda: _fail(err, EXIT_USAGE, "unavailable"))
            self.commands[name] = cmd
            return cmd
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            if name in LAZY_COMMANDS and name not in self.commands:
                rows.append((name, LAZY_COMMANDS[name][1]))
                continue
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(formatter.width - 6 - max(len(n) for n in LAZY_COMMANDS))))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["sandbox.argv"] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except click.ClickException as e:
            if not _args_want_json(ctx, ctx.meta.get("sandbox.argv", [])):
                raise
            emit_json({"error": {"kind": "usage", "message": e.format_message(), "exit_code": e.exit_code}})
            e.show()
            sys.exit(e.exit_code)
        except Exception as e:
            if _args_want_json(ctx, ctx.meta.get("sandbox.argv", [])):
                emit_json({"error": {"kind": "internal", "message": f"{type(e).__name__}: {e}", "exit_code": 1}})
            raise


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from sandbox import __version__

    click.echo(f"sandbox {__version__}")
    ctx.exit(0)


@click.group(cls=SandboxGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Print the version and exit.")
def main() -> None:
    """Hardened local sandboxes for the tool calls of AI agents."""


# ------------------------------------------------------------------ exec

def parse_env(pairs: tuple[str, ...], files: tuple[str, ...]) -> tuple[dict[str, str], dict[str, str]]:
    """Docker's -e and --env-file: KEY=VAL, or KEY alone for the host's value (skipped when unset).
    Files first, then -e (a later value wins). Returns (env, where each name came from)."""
    env: dict[str, str] = {}
    origin: dict[str, str] = {}

    def add(item: str, where: str) -> None:
        key, eq, val = item.partition("=")
        if any(c.isspace() for c in key):
            fail(f"{where}: variable name {key!r} contains whitespace")
        if not eq:
            if key not in os.environ:
                return
            val = os.environ[key]
        env[key] = val
        origin[key] = where

    for f in files:
        try:
            with open(f, encoding="utf-8-sig") as fh:  # a BOM is skipped, as Docker does
                lines = fh.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            fail(f"--env-file {f}: cannot read: {getattr(e, 'strerror', None) or e}")
        for n, line in enumerate(lines, 1):
            line = line.lstrip()
            if line and not line.startswith("#"):
                add(line, f"--env-file {f}:{n}")
    for p in pairs:
        add(p, f"-e {p.partition('=')[0]}")
    return env, origin


@main.command("exec", help=EXEC_HELP, context_settings={"allow_interspersed_args": False})
@click.option("--profile", "-p", default="default", show_default=True, help="Profile name or path to a YAML file.")
@click.option("--workspace", "-w", metavar="DIR", help="Host directory to mount as the workspace.")
@click.option("--timeout", "-t", metavar="SECONDS", help="Seconds before the command is killed (overrides the policy).")
@click.option("--env", "-e", "env_pairs", multiple=True, metavar="KEY[=VAL]", help="Set an environment variable.")
@click.option("--env-file", "env_files", multiple=True, metavar="FILE", help="Read KEY=VAL lines from FILE.")
@click.option("--interactive", "-i", is_flag=True, help="Stream stdin into the command (else it reads /dev/null).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON result instead of streaming.")
@click.option("--verbose", "-v", is_flag=True, help="Say what runs, as which user, under which limits.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_cmd(profile: str, workspace: str | None, timeout: str | None, env_pairs: tuple[str, ...],
             env_files: tuple[str, ...], interactive: bool, as_json: bool, verbose: bool,
             command: tuple[str, ...]) -> None:
    from sandbox import api

    try:
        argv = api._argv(list(command))
    except ValueError as e:
        fail(f"exec: {e}")
    env, origin = parse_env(env_pairs, env_files)
    from sandbox.execcmd import run_exec

    run_exec(profile=profile, workspace=workspace, timeout=timeout, env=env, origin=origin,
             interactive=interactive, as_json=as_json, verbose=verbose, argv=argv)


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
@click.option("--target", type=click.Choice(["docker", "kubernetes"]), default="docker", show_default=True,
              help="kubernetes: what the cluster cannot enforce (degradations), the workaround and whether it is accepted.")
@click.option("--namespace", help="(--target kubernetes) the sandboxes' namespace.")
@click.option("--config", "kube_config", metavar="FILE", help="(--target kubernetes) backend configuration [$SANDBOX_KUBE_CONFIG].")
def policy_explain(profile: str, as_json: bool, target: str = "docker", namespace: str | None = None,
                   kube_config: str | None = None) -> None:
    """Everything a policy allows and denies, and which file of its `extends` chain set it."""
    import dataclasses
    from pathlib import Path

    from sandbox.explain import explain_table

    pol = _load(profile)
    if target == "kubernetes":
        from sandbox.kube import cli as kube_cli

        kube_cli.explain(pol, kube_cli.config_for(kube_config, namespace), as_json)
        return
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


@policy.command("compile")
@click.argument("profile")
@click.option("--target", type=click.Choice(["kubernetes"]), required=True)
@click.option("--namespace", help="The sandboxes' namespace (default: the configuration's, else sandboxes).")
@click.option("--config", "kube_config", metavar="FILE", help="Backend configuration [$SANDBOX_KUBE_CONFIG].")
@click.option("--json", "as_json", is_flag=True, help="One JSON List instead of YAML documents.")
def policy_compile(profile: str, target: str, namespace: str | None, kube_config: str | None, as_json: bool) -> None:
    """Print the manifests that enforce a policy on a cluster (`kubectl apply -f -`): a SeccompProfile,
    an agent-sandbox SandboxTemplate, a deny-by-default NetworkPolicy and a SandboxWarmPool.
    Refused while the policy has a degradation the configuration does not accept."""
    from sandbox.kube import cli as kube_cli

    pol = _load(profile)
    kube_cli.print_manifests(pol, kube_cli.config_for(kube_config, namespace), as_json)


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


@policy.command("diff")
@click.argument("a")
@click.argument("b")
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def policy_diff(a: str, b: str, as_json: bool) -> None:
    """What policy A allows that B does not, and what B allows that A does not (syscalls, mounts,
    limits, egress, env, runtime, timeouts). Exit 0: same; 1: they differ; 2: a profile is bad."""
    from sandbox.policydiff import run_cli

    sys.exit(run_cli(_load(a), _load(b), as_json))


# ------------------------------------------------------------------ images, doctor, gc

@main.group()
def images() -> None:
    """Build and list the sandbox images (offline: debootstrap + docker import)."""


@images.command("build")
@click.option("--force", is_flag=True, help="Rebuild even when the recipe is unchanged.")
def images_build(force: bool) -> None:
    """Build each recipe's image (skipped when the recipe is unchanged)."""
    import docker
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from sandbox import images as im

    client = _docker_client(docker, timeout=900)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=_console(stderr=True)) as prog:
        for r in im.recipes():
            task = prog.add_task(r.name, total=None)

            def step(msg: str, task: Any = task, name: str = r.name) -> None:
                prog.update(task, description=f"{name}: {msg}")
                if prog.console.is_terminal:
                    prog.console.log(f"{name}: {msg}")
                else:  # a log file: one plain line, not padded to the (unbounded) width
                    click.echo(f"{time.strftime('%H:%M:%S')} {name}: {msg}", err=True)

            try:
                tag = im.build(client, r, step, force=force)
            except RuntimeError as e:
                _fail(str(e))
            prog.update(task, description=f"{r.name}: {tag}", total=1, completed=1)


def _docker_client(docker: Any, timeout: int = 120) -> Any:
    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
        return client
    except Exception as e:  # noqa: BLE001 - DockerException and connection errors, in words
        fail(f"cannot reach the Docker engine: {e}; run `sandbox doctor`", EXIT_SANDBOX, "engine")


@images.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON document: {\"images\": [{\"tag\", \"present\"}]}.")
def images_list(as_json: bool) -> None:
    """The image each recipe builds, and whether it is present."""
    import docker

    from sandbox import images as im

    client = _docker_client(docker)
    try:
        rows = [{"recipe": r.name, "tag": r.image_tag(), "present": im.image_present(client, r.image_tag())}
                for r in im.recipes()]
    except RuntimeError as e:
        fail(str(e), EXIT_SANDBOX, "image")
    if as_json:
        emit_json({"images": rows})
        return
    for row in rows:
        click.echo(f"{row['tag']}\t{'present' if row['present'] else 'missing'}")


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--profile", "-p", default="default", show_default=True, help="Policy the self-test canaries run under.")
@click.option("--no-canaries", is_flag=True, help="Skip the attack canaries (no sandbox is started).")
# --- backend selection (CLUSTER) ---
@click.option("--backend", type=click.Choice(["docker", "kubernetes"]), default=None,
              help="What to check: this host's Docker engine, or the cluster of the Kubernetes backend "
                   "(default: $SANDBOX_BACKEND, else docker).")
@click.option("--config", "kube_config", type=click.Path(dir_okay=False), default=None,
              help="The Kubernetes backend configuration (default: $SANDBOX_KUBE_CONFIG).")
def doctor(as_json: bool, profile: str, no_canaries: bool, backend: str | None, kube_config: str | None) -> None:
    """Check the host (engine, cgroups, seccomp, runtimes, images), then run attack canaries in a sandbox.

    With --backend kubernetes: the cluster (CRDs, RuntimeClass, Pod Security, RBAC), then the canaries
    in a sandbox pod claimed from the policy's warm pool (NetworkPolicy enforcement among them)."""
    from sandbox.backend import backend_name
    from sandbox.doctor import Check, report, run_checks

    try:
        backend = backend_name(backend)
    except ValueError as e:
        fail(str(e), EXIT_USAGE, "usage")
    try:
        if backend == "kubernetes":
            from sandbox.kube.backend import KubeBackend
            from sandbox.kube.cli import config_for

            cfg = config_for(kube_config, None)
            token = cfg.egress_proxy.admin_token_file
            unreadable = bool(token) and not os.access(str(token), os.R_OK)
            if unreadable:
                # The admin token is mounted into the worker's pod only: on an operator's machine the
                # cluster is still checked, without the egress proxy's session registry.
                cfg = cfg.model_copy(update={"egress_proxy": cfg.egress_proxy.model_copy(
                    update={"admin_token_file": None})})
            checks = KubeBackend(cfg).doctor(None if no_canaries else profile)
            if unreadable:
                checks.insert(0, Check("egress admin token", "warn",
                                       f"{token} is not readable here: checked without the egress proxy's "
                                       "registry (the worker needs it to run policies with egress)",
                                       "run the doctor in the worker's pod to check the proxy too"))
        else:
            checks = run_checks(profile, canaries=not no_canaries)
    # --- end backend selection ---
    except Exception as e:  # noqa: BLE001 - a doctor that crashes helps nobody: say it in words
        fail(f"doctor could not run its checks: {type(e).__name__}: {e}", EXIT_SANDBOX, "doctor")
    if as_json:
        emit_json(report(checks))
    else:
        from rich.markup import escape
        from rich.table import Table

        t = Table(title="sandbox doctor")
        for col in ("check", "status", "detail", "fix"):
            t.add_column(col)
        for c in checks:
            # details quote engines, files and versions: never rich markup
            t.add_row(escape(c.name), {"ok": "[green]ok", "warn": "[yellow]warn", "fail": "[red]FAIL"}[c.status],
                      escape(c.detail), escape(c.fix or ""))
        _console().print(t)
    sys.exit(1 if any(c.status == "fail" for c in checks) else 0)


@main.command()
@click.option("--all", "everything", is_flag=True, help="Remove every sandbox of this host, live owners included.")
@click.option("--json", "as_json", is_flag=True, help="Print the removed sandboxes as JSON.")
def gc(everything: bool, as_json: bool) -> None:
    """Remove sandboxes left behind by crashed processes on this host."""
    from sandbox.runtime import Runtime

    try:
        removed = Runtime(owner_kind="gc").gc(everything=everything)
    except Exception as e:  # noqa: BLE001 - engine errors, in words
        fail(f"cannot reach the Docker engine: {e}; run `sandbox doctor`", EXIT_SANDBOX, "engine")
    if as_json:
        emit_json({"removed": removed})
    else:
        click.echo(f"removed {len(removed)} sandbox(es)" + (": " + " ".join(removed) if removed else ""))


# ------------------------------------------------------------------ ps

def _age(seconds: float) -> str:
    s = int(max(0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def list_sandboxes() -> list[dict[str, Any]]:
    """The live sandboxes of this host, one dict each (what `sandbox ps --json` prints)."""
    import time

    from sandbox import spec
    from sandbox.engine import NotFound
    from sandbox.runtime import Runtime, owner_alive

    rt = Runtime(owner_kind="ps")
    rows = []
    now = time.time()
    for c in rt.list_managed():
        lab = c.get("Labels") or {}
        try:
            info = rt.engine.inspect(c["Id"])
        except NotFound:
            continue  # removed while we listed
        hc = info.get("HostConfig") or {}
        cfg = info.get("Config") or {}
        owner = lab.get(spec.LABEL_OWNER, "")
        kind, _, rest = owner.partition(":")
        pid = rest.partition(":")[0]
        user = cfg.get("User") or ""
        uid = lab.get(spec.LABEL_UID) or user.partition(":")[0]
        created = float(c.get("Created") or now)
        nano = hc.get("NanoCpus") or 0
        rows.append({
            "id": c["Id"][:12],
            "name": (c.get("Names") or ["?"])[0].lstrip("/"),
            "session": lab.get(spec.LABEL_SESSION, ""),
            "profile": lab.get(spec.LABEL_POLICY, ""),
            "policy_digest": lab.get(spec.LABEL_DIGEST, ""),
            "uid": int(uid) if str(uid).isdigit() else uid or None,
            "user": user,
            "state": c.get("State", ""),
            "created": created,
            "age_s": round(now - created, 1),
            "owner": owner,
            "owner_kind": kind,
            "owner_pid": int(pid) if pid.isdigit() else None,
            "owner_alive": owner_alive(owner) if owner else False,
            "runtime": hc.get("Runtime") or "runc",
            "limits": {"memory_mb": (hc.get("Memory") or 0) >> 20 or None, "cpus": nano / 1e9 if nano else None,
                       "pids": hc.get("PidsLimit") or None},
        })
    rows.sort(key=lambda r: r["created"])
    return rows


@main.command("ps")
@click.option("--json", "as_json", is_flag=True, help="One JSON document: {\"sandboxes\": [...]}.")
@click.option("--quiet", "-q", is_flag=True, help="Only the sandboxes' ids.")
def ps_cmd(as_json: bool, quiet: bool) -> None:
    """List the live sandboxes of this host: session, profile, uid, age, owner process, limits."""
    try:
        rows = list_sandboxes()
    except Exception as e:  # noqa: BLE001 - engine errors, in words
        fail(f"cannot list sandboxes: cannot reach the Docker engine: {e}; run `sandbox doctor`", EXIT_SANDBOX, "engine")
    if as_json:
        emit_json({"sandboxes": rows})
        return
    if quiet:
        for r in rows:
            click.echo(r["id"])
        return
    from rich.table import Table

    t = Table(title=f"{len(rows)} sandbox(es)")
    for col in ("id", "session", "profile", "uid", "age", "owner", "alive", "memory", "cpus", "pids", "runtime"):
        t.add_column(col, no_wrap=True, overflow="fold")
    for r in rows:
        lim = r["limits"]
        t.add_row(r["id"], r["session"], r["profile"], str(r["uid"] or "?"), _age(r["age_s"]), r["owner"],
                  "yes" if r["owner_alive"] else "NO (orphan: `sandbox gc`)",
                  f"{lim['memory_mb']} MiB" if lim["memory_mb"] else "-", f"{lim['cpus']:g}" if lim["cpus"] else "-",
                  str(lim["pids"] or "-"), r["runtime"])
    _console().print(t)


if __name__ == "__main__":
    main()
