"""Credentials: generation, 0600 key files, hashing, redaction.

Three kinds of bearer secret exist, each told apart by its prefix (the same
prefixes the real service uses, so a leaked one is recognisable by scanners):

- environment key `sk-ant-oat01-...`: the worker's standing credential, one per
  environment, kept in a key file;
- admin key `sk-ant-admin-local-...`: stands in for the organisation API key,
  kept in a key file; the worker never needs it;
- sessions token `sk-ant-req-...`: minted per work-item delivery, handed out
  only inside the poll response's `secret`, stored here only as a hash.

Plaintext keys live only in key files (mode 0600, owned by us) and in memory.
The database holds SHA-256 hashes; lookups hash first, so a timing side channel
can at most reveal a prefix of a hash, and direct comparisons use
`hmac.compare_digest`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path

from sandbox.secretfile import PrivateFileError, read_private_file

ENV_KEY_PREFIX = "sk-ant-oat01-"
ADMIN_KEY_PREFIX = "sk-ant-admin-local-"
SESSIONS_TOKEN_PREFIX = "sk-ant-req-"

# Anything that looks like one of our (or Anthropic's) secrets, for log redaction.
_SECRET_RE = re.compile(r"sk-ant-[A-Za-z0-9_\-]{4,}")


class KeyFileError(Exception):
    """A key file is missing, malformed, or readable by someone other than us."""


def new_environment_key() -> str:
    return ENV_KEY_PREFIX + secrets.token_urlsafe(32)


def new_admin_key() -> str:
    return ADMIN_KEY_PREFIX + secrets.token_urlsafe(32)


def new_sessions_token() -> str:
    return SESSIONS_TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The stored form of a credential."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def fingerprint(key: str) -> str:
    """A short, non-reversible label for logs and reprs (never the key itself)."""
    return "fp:" + hash_key(key)[:10]


def same_key(a: str, b: str) -> bool:
    """Constant-time equality for credentials."""
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def redact(text: str) -> str:
    """Replace anything shaped like a secret with its fingerprint."""
    return _SECRET_RE.sub(lambda m: f"<redacted {fingerprint(m.group(0))}>", text)


def encode_work_secret(sessions_token: str, api_base_url: str) -> str:
    """The per-item `secret`: unpadded base64url JSON, as the SDK worker decodes it."""
    raw = json.dumps({"sessions_token": sessions_token, "api_base_url": api_base_url}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode("utf-8")).decode("ascii").rstrip("=")


def write_key_file(path: Path, key: str) -> None:
    """Write `key` to `path` with mode 0600, atomically (no window where it is wider)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.write(fd, (key + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_key_file(path: Path, prefix: str) -> str:
    """Read a key file, refusing one that group/other can access or that is not ours.

    A key that others could read must be treated as leaked, so we stop rather
    than serve with it; the fix (chmod 600 or delete to regenerate) is the
    operator's call.
    """
    try:
        data = read_private_file(path)
    except PrivateFileError as e:
        raise KeyFileError(f"key file {e}; chmod 600 it, or delete it to generate a new key") from None
    key = data.decode("utf-8", errors="replace").strip()
    if not key.startswith(prefix) or len(key) < len(prefix) + 16 or any(c.isspace() for c in key):
        # Do not echo the content: it may be a real secret of another kind.
        raise KeyFileError(f"key file {path} does not hold a {prefix}... key")
    return key


def load_or_create_key(path: Path, prefix: str, generate: Callable[[], str]) -> tuple[str, bool]:
    """Return (key, created): the key in `path`, or a fresh one written there."""
    try:
        return read_key_file(path, prefix), False
    except FileNotFoundError:
        key = generate()
        write_key_file(path, key)
        return key, True
