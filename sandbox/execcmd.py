"""`sandbox exec` after its options are parsed, and its click-free front door.

The body of `sandbox exec` lives here so that it runs the same whether the options were
parsed by click (:mod:`sandbox.cli`, every option) or by :func:`main`, the console
script's first stop, which handles only the plainest form without importing click::

    sandbox exec [-p|--profile NAME] [--json] [--] COMMAND [ARGS...]

Anything else (another command, any other option, ``--help``, an option value that looks
like an option, no command) goes to the full command line unchanged. A cold
``sandbox exec`` is mostly waiting for Docker; the command line's own imports were a
fifth of it (measured by bench/bench_runtime.py). Errors, JSON documents and exit
statuses are the ones :mod:`sandbox.cli` documents: its ``fail``/``emit_json`` write
exactly what these do. Only the standard library is imported here.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any, NoReturn

EXIT_USAGE = 2        # bad option, profile, policy, environment or timeout
EXIT_SANDBOX = 240    # the sandbox could not run the command (engine, image, workspace, agent)


def emit_json(doc: Any) -> None:
    """One JSON document on stdout (what sandbox.cli.emit_json writes)."""
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _err(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def fail(msg: str, code: int = EXIT_USAGE, kind: str | None = None, *, as_json: bool = False,
         **extra: Any) -> NoReturn:
    """`sandbox: MSG` on stderr; with --json also ``{"error": {...}}`` on stdout (as sandbox.cli.fail)."""
    kind = kind or {EXIT_USAGE: "usage", EXIT_SANDBOX: "sandbox"}.get(code, "error")
    if as_json:
        emit_json({"error": {"kind": kind, "message": msg, "exit_code": code, **extra}})
    _err(f"sandbox: {msg}")
    sys.exit(code)


def exit_now(status: int) -> NoReturn:
    """Exit without the interpreter's teardown (a final garbage collection of every module's
    objects) when this is the real process; under a test runner's captured streams, sys.exit."""
    if sys.stdout is sys.__stdout__ and sys.stderr is sys.__stderr__:
        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError):
                pass
        logging = sys.modules.get("logging")
        if logging is not None:
            logging.shutdown()
        os._exit(status)
    sys.exit(status)


def run_exec(*, profile: str, workspace: str | None, timeout: str | None, env: dict[str, str],
             origin: dict[str, str], interactive: bool, as_json: bool, verbose: bool, argv: list[str]) -> NoReturn:
    """Create the sandbox, run ``argv``, stream or collect its output, order the teardown, exit."""
    from sandbox import api

    def die(msg: str, code: int = EXIT_USAGE, kind: str | None = None, **extra: Any) -> NoReturn:
        fail(msg, code, kind, as_json=as_json, **extra)

    policy: Any
    try:
        if env or timeout is not None or verbose:
            policy = api.load_profile(profile)
        else:
            # The policy cache: the same validation and digest, served without the policy model
            # while every file it was built from is unchanged (sandbox/policycache.py).
            policy = api.load_compiled(profile)
    except api.PolicyError as e:
        die(str(e), kind="policy", problems=[list(p) for p in e.problems])
    if env:
        try:
            policy = api.with_overrides(policy, env=env, source="--env")
        except api.PolicyError as e:
            reasons = "; ".join(r for _, _, r in e.problems)
            where = next((w for k, w in origin.items() if repr(k) in reasons), "-e/--env-file")
            die(f"{where}: {reasons}", kind="env")
    if timeout is not None:
        try:
            policy = api.with_overrides(policy, timeout=timeout, source="--timeout")
        except api.PolicyError as e:
            die(f"--timeout {timeout}: " + "; ".join(r for _, _, r in e.problems), kind="timeout")
    if verbose:
        from sandbox.explain import summary_line  # names the filter's changes and every declared weakening

        _err(f"sandbox: {summary_line(policy)}")

    sb: Any = None

    def on_signal(signum: int, _frame: Any) -> None:
        if sb is not None:
            sb.close()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        sb = api._create(policy, workspace=workspace, owner_kind="exec")
    except api.WorkspaceError as e:
        die(str(e), EXIT_SANDBOX, "workspace")
    except api.ImageMissing as e:
        die(str(e), EXIT_SANDBOX, "image")
    except api.EngineUnavailable as e:
        die(str(e), EXIT_SANDBOX, "engine")
    except api.SandboxError as e:
        die(str(e), EXIT_SANDBOX, "sandbox")
    try:
        if verbose:
            _err(f"sandbox: started {sb.id[:12]} (session {sb.session_id}, uid {sb.uid}:{sb.gid})")
        for w in sb.warnings:
            _err(f"sandbox: warning: {w}")
        stdin = sys.stdin.buffer if interactive else None
        if as_json:
            res = sb.exec(argv, stdin=stdin)
        else:
            out, err = sys.stdout.buffer, sys.stderr.buffer

            def stream(fd: int, data: bytes) -> None:
                w = err if fd == 2 else out
                w.write(data)
                w.flush()

            res = sb.exec(argv, stdin=stdin, on_output=stream)
    except api.SandboxStopped as e:
        sb.close()
        die(str(e), EXIT_SANDBOX, "stopped")
    except BaseException:
        sb.close()
        raise
    # Ends through the agent and waits for proof that every process of the sandbox is gone
    # (PID 1's pidfd; ~5 ms), the engine's kill as the fallback: see Runtime._teardown.
    sb.close()
    if as_json:
        doc = res.to_json()
        doc.update(profile=policy.name, session=sb.session_id, sandbox=sb.id, uid=sb.uid,
                   warnings=sb.warnings)
        emit_json(doc)
    else:
        if res.error:
            _err(f"sandbox: {res.error}")
        if res.limit:
            _err(f"sandbox: limit hit: {res.limit}: {res.limit_message}")
    exit_now(res.status)


def _plain_exec(args: list[str]) -> tuple[str, bool, list[str]] | None:
    """(profile, as_json, command) for ``exec [-p|--profile NAME] [--json] [--] COMMAND...``;
    None for anything else (the full command line handles it)."""
    if not args or args[0] != "exec":
        return None
    profile, as_json, i = "default", False, 1
    while i < len(args):
        t = args[i]
        if t == "--":
            i += 1
            break
        if t == "--json":
            as_json = True
        elif t in ("-p", "--profile"):
            if i + 1 >= len(args) or args[i + 1].startswith("-"):
                return None
            profile = args[i + 1]
            i += 1
        elif t.startswith("--profile="):
            profile = t.split("=", 1)[1]
        elif t.startswith("-"):
            return None  # any other option (or "-", or --help): click's job
        else:
            break
        i += 1
    command = args[i:]
    if not command or not profile:
        return None
    return profile, as_json, command


def main() -> Any:
    """The ``sandbox`` console script: the plainest ``sandbox exec`` here, everything else in
    :mod:`sandbox.cli` (click)."""
    plan = _plain_exec(sys.argv[1:])
    if plan is None:
        from sandbox.cli import main as cli_main

        return cli_main(prog_name="sandbox")
    profile, as_json, command = plan
    from sandbox import api

    try:
        argv = api._argv(command)
    except ValueError as e:
        fail(f"exec: {e}", as_json=as_json)
    run_exec(profile=profile, workspace=None, timeout=None, env={}, origin={}, interactive=False,
             as_json=as_json, verbose=False, argv=argv)
