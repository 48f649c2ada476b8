"""The worker's one credential: the environment key. Refuse anything broader.

The environment key (`sk-ant-oat01-...`) can poll one environment's queue and
answer its sessions. An organisation API key can do everything, so a worker
host must never hold one: model-written code runs next to it. We refuse to
start when one is in our environment rather than trust ourselves never to leak
it. Once read, the key is removed from `os.environ`, so no child process (the
egress daemon, docker helpers) inherits it; sandboxes never get the host
environment at all (their env comes from the policy only).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sandbox.secretfile import PrivateFileError, read_private_file

ENV_KEY_VAR = "ANTHROPIC_ENVIRONMENT_KEY"
ENV_KEY_FILE_VAR = "ANTHROPIC_ENVIRONMENT_KEY_FILE"
ORG_KEY_VARS = ("ANTHROPIC_API_KEY",)
AUTH_TOKEN_VAR = "ANTHROPIC_AUTH_TOKEN"
# Variables the SDK or our own code would read; scrubbed after startup.
SCRUB_VARS = (ENV_KEY_VAR, AUTH_TOKEN_VAR, "ANTHROPIC_WORK_SECRET")
MAX_KEY_BYTES = 4096


class CredentialError(Exception):
    """The worker will not start with the credentials it was given (message names no secret)."""


@dataclass(frozen=True)
class EnvironmentKey:
    value: str
    source: str  # "env:ANTHROPIC_ENVIRONMENT_KEY" or "file:/path" - safe to log

    def __repr__(self) -> str:
        return f"EnvironmentKey(source={self.source!r})"

    __str__ = __repr__


def check_no_org_key(environ: dict[str, str] | os._Environ[str] | None = None) -> None:
    """Refuse to run when an organisation-scoped credential is in the environment."""
    env = os.environ if environ is None else environ
    for var in ORG_KEY_VARS:
        if env.get(var, "").strip():
            raise CredentialError(
                f"{var} is set in the worker's environment. It is an organisation-scoped key and code running "
                "on this host could exfiltrate it; the worker needs only the environment key "
                f"({ENV_KEY_VAR} or a key file). Unset {var} and start again."
            )
    token = env.get(AUTH_TOKEN_VAR, "").strip()
    if token and token != env.get(ENV_KEY_VAR, "").strip():
        raise CredentialError(
            f"{AUTH_TOKEN_VAR} is set and is not the environment key. The worker authenticates only with the "
            f"environment key; unset {AUTH_TOKEN_VAR} (or set it to the environment key) and start again."
        )


def read_key_file(path: Path) -> str:
    """Read a key file that only its owner can read; refuse anything looser."""
    try:
        data = read_private_file(path, MAX_KEY_BYTES)
    except FileNotFoundError:
        raise CredentialError(f"environment key file {path} does not exist") from None
    except PrivateFileError as e:
        raise CredentialError(f"environment key file {e}; chmod 600 it and treat the key as possibly leaked") from None
    key = data.decode("utf-8", "replace").strip()
    _check_shape(key, f"file {path}")
    return key


def _check_shape(key: str, where: str) -> None:
    if not key or any(c.isspace() for c in key) or len(key) < 16:
        # Never echo the value: it may be a real secret of another kind.
        raise CredentialError(f"the environment key from {where} is empty or malformed")


def load_environment_key(key_file: Path | None = None, environ: dict[str, str] | None = None,
                         *, scrub: bool = True) -> EnvironmentKey:
    """The environment key from `key_file`, $ANTHROPIC_ENVIRONMENT_KEY_FILE or $ANTHROPIC_ENVIRONMENT_KEY.

    Also runs the org-key guard. With `scrub`, the key variables are removed from
    the process environment afterwards so no child inherits them.
    """
    env = os.environ if environ is None else environ
    check_no_org_key(env)
    path = key_file or (Path(env[ENV_KEY_FILE_VAR]) if env.get(ENV_KEY_FILE_VAR) else None)
    if path is not None:
        key = EnvironmentKey(read_key_file(path), f"file:{path}")
    else:
        value = env.get(ENV_KEY_VAR, "").strip()
        if not value:
            raise CredentialError(
                f"no environment key: set {ENV_KEY_VAR}, or pass a key file (mode 0600) with --environment-key-file "
                f"or {ENV_KEY_FILE_VAR}"
            )
        _check_shape(value, f"${ENV_KEY_VAR}")
        key = EnvironmentKey(value, f"env:{ENV_KEY_VAR}")
    if scrub and environ is None:
        scrub_environment()
    return key


def scrub_environment() -> None:
    for var in SCRUB_VARS:
        os.environ.pop(var, None)
