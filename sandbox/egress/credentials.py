"""Credential values for injection, read on the host by the process that owns the sandbox.

The policy names a credential and where it lives (``egress.credentials.<name>``: an
environment variable of this process, a file, or a command's output); the value is read
here, by the runtime's :class:`~sandbox.egress.manager.EgressManager`, and handed to the
proxy daemon over its owner-only control socket. It is never written to disk, into the
policy, the sandbox (environment, files, /proc), a log line, an exception message or the
audit: every error below names the credential and its source, never the value.
"""

from __future__ import annotations

import base64
import os
import stat
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.egress.rules import Credential, CredentialSource, EgressPolicy

MAX_SECRET_BYTES = 8 * 1024
MAX_COMMAND_OUTPUT = 1024 * 1024


class CredentialError(ValueError):
    """A credential that cannot be read or is unfit for a header. Never carries the value."""


@dataclass(frozen=True)
class SessionMaterial:
    """What the proxy needs besides the policy: secret values by credential name, and the PEM
    text of each rule's extra upstream CA by its path (read here, where the files are readable)."""

    secrets: dict[str, str] = field(default_factory=dict)
    upstream_cas: dict[str, str] = field(default_factory=dict)

    def to_wire(self) -> dict[str, dict[str, str]]:
        return {"secrets": dict(self.secrets), "upstream_cas": dict(self.upstream_cas)}

    @classmethod
    def from_wire(cls, d: object) -> SessionMaterial:
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise CredentialError("session material must be a mapping")
        secrets, cas = d.get("secrets") or {}, d.get("upstream_cas") or {}
        if not all(isinstance(k, str) and isinstance(v, str) for m in (secrets, cas) for k, v in m.items()):
            raise CredentialError("session material must map strings to strings")
        for name, value in secrets.items():
            check_secret(name, value)
        return cls(dict(secrets), dict(cas))

    def __repr__(self) -> str:  # never show values, e.g. in a traceback's locals
        return f"SessionMaterial(secrets=<{len(self.secrets)} hidden>, upstream_cas={sorted(self.upstream_cas)})"


def check_secret(name: str, value: str) -> None:
    """Fit for an HTTP header value: visible ASCII with inner spaces/tabs, no CR/LF/NUL, <= 8 KiB."""
    if not value:
        raise CredentialError(f"credential {name!r} is empty")
    if len(value.encode("utf-8", "replace")) > MAX_SECRET_BYTES:
        raise CredentialError(f"credential {name!r} is longer than {MAX_SECRET_BYTES} bytes")
    if any(not (0x21 <= ord(c) < 0x7F or c in " \t") for c in value) or value[0] in " \t" or value[-1] in " \t":
        raise CredentialError(f"credential {name!r} holds characters a header value cannot carry (control, non-ASCII or edge spaces)")


def header_value(cred: Credential, secret: str) -> str:
    if cred.basic_user is not None:
        return "Basic " + base64.b64encode(f"{cred.basic_user}:{secret}".encode()).decode("ascii")
    return cred.format.replace("{secret}", secret)


def _strip_newline(text: str) -> str:
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


def read_source(name: str, src: CredentialSource, env: Mapping[str, str] | None = None) -> str:
    if env is None:
        env = os.environ
    where = f"credential {name!r} ({src.describe()})"
    if src.env is not None:
        value = env.get(src.env)
        if value is None:
            raise CredentialError(f"{where}: the variable is not set in the process that owns the sandbox")
    elif src.file is not None:
        value = _read_file(where, Path(src.file))
    else:
        assert src.command is not None
        try:
            proc = subprocess.run(src.command, stdin=subprocess.DEVNULL, capture_output=True, timeout=src.timeout_s, check=False, shell=False)
        except FileNotFoundError:
            raise CredentialError(f"{where}: the command was not found") from None
        except subprocess.TimeoutExpired:
            raise CredentialError(f"{where}: the command did not finish within {src.timeout_s:g}s") from None
        if proc.returncode != 0:
            raise CredentialError(f"{where}: the command exited with status {proc.returncode}")  # its output may be the secret: not shown
        if len(proc.stdout) > MAX_COMMAND_OUTPUT:
            raise CredentialError(f"{where}: the command printed more than {MAX_COMMAND_OUTPUT} bytes")
        try:
            value = proc.stdout.decode("ascii")
        except UnicodeDecodeError:
            raise CredentialError(f"{where}: the command's output is not ASCII") from None
    value = _strip_newline(value)
    check_secret(name, value)
    return value


def _read_file(where: str, path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise CredentialError(f"{where}: no such file") from None
    except OSError as e:
        raise CredentialError(f"{where}: cannot open it ({e.strerror or type(e).__name__}; symlinks are refused)") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CredentialError(f"{where}: not a regular file")
        if st.st_uid != os.geteuid():
            raise CredentialError(f"{where}: owned by uid {st.st_uid}, not by the user that owns the sandbox ({os.geteuid()})")
        if st.st_mode & 0o077:
            raise CredentialError(f"{where}: readable or writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it")
        if st.st_size > MAX_SECRET_BYTES + 2:
            raise CredentialError(f"{where}: larger than {MAX_SECRET_BYTES} bytes")
        data = os.read(fd, MAX_SECRET_BYTES + 3)
    finally:
        os.close(fd)
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise CredentialError(f"{where}: the file is not ASCII") from None


def resolve(policy: EgressPolicy, env: Mapping[str, str] | None = None) -> SessionMaterial:
    """Read every credential the policy's rules use, and every rule's extra upstream CA."""
    names = sorted({r.credential.name for r in policy.rules if r.credential is not None})
    secrets = {n: read_source(n, policy.credentials[n], env) for n in names}
    cas: dict[str, str] = {}
    for r in policy.rules:
        if r.upstream_ca is not None and r.upstream_ca not in cas:
            try:
                text = Path(r.upstream_ca).read_text(encoding="ascii")
            except (OSError, UnicodeDecodeError) as e:
                raise CredentialError(f"rule {r.host}: cannot read upstream_ca {r.upstream_ca}: {getattr(e, 'strerror', None) or type(e).__name__}") from None
            if "-----BEGIN CERTIFICATE-----" not in text:
                raise CredentialError(f"rule {r.host}: upstream_ca {r.upstream_ca} holds no PEM certificate")
            # Only the certificates: a key that shares the file never leaves this process.
            cas[r.upstream_ca] = "".join(_pem_blocks(text, "CERTIFICATE"))
    return SessionMaterial(secrets, cas)


def _pem_blocks(text: str, kind: str) -> list[str]:
    out, begin, end = [], f"-----BEGIN {kind}-----", f"-----END {kind}-----"
    pos = 0
    while (i := text.find(begin, pos)) >= 0:
        j = text.find(end, i)
        if j < 0:
            break
        out.append(text[i : j + len(end)] + "\n")
        pos = j + len(end)
    return out
