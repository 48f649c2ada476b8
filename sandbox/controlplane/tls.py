"""TLS for a control plane that workers on other hosts reach: certificates, contexts, the advertised URL.

Server side: either the operator's PEM certificate and key (`--tls-cert/--tls-key`; the key file must be
private to us, like every other secret file), or a CA and server certificate generated once under
`<state-dir>/tls/` (`--tls`):

    tls/ca.pem        the CA certificate: give it to workers (`sandbox worker --ca-file`); public
    tls/ca.key        its key (0600); signs the server certificate, never leaves this directory
    tls/server.pem    the server certificate: localhost, 127.0.0.1, ::1, the bind address, the advertised host
    tls/server.key    its key (0600)

The server certificate is made again (same CA, so workers keep trusting it) when a name it must carry is
missing, when it expires within 30 days, or when it was not signed by the CA on disk.

Client side: `client_context(ca_file)` trusts exactly the given bundle (never the system roots on top, never
unverified), with hostname checking; `preflight(url, ctx)` does one handshake so a worker with the wrong CA
stops at start with the URL and the reason, instead of retrying the poll forever.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sandbox.secretfile import PrivateFileError, read_private_file

TLS_DIR = "tls"
CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server.key"

CA_DAYS = 3650
SERVER_DAYS = 397
RENEW_BEFORE = datetime.timedelta(days=30)
MAX_PEM_BYTES = 1 << 20  # a key file; certificate chains are read by the ssl module
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class TlsError(Exception):
    """TLS cannot be set up or verified (the message names the file or URL and the reason, never a secret)."""


@dataclass(frozen=True)
class ServerTls:
    """How a control plane serves TLS: the operator's certificate and key, or (both None) a generated CA."""

    cert_file: Path | None = None
    key_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise TlsError("--tls-cert and --tls-key go together (give both, or neither for a generated CA)")

    @property
    def generated(self) -> bool:
        return self.cert_file is None


# ------------------------------------------------------------------ addresses


def is_loopback_host(host: str) -> bool:
    h = host.strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def is_wildcard_host(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def url_host(host: str) -> str:
    """`host` as it appears in a URL (IPv6 in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def validate_advertise_url(url: str, *, tls: bool) -> str:
    """The URL workers on other hosts use, normalised (no trailing slash); TlsError says what is wrong.

    https unless the host is loopback (a worker sends its environment key there); with TLS on, https
    always; a host, no user info, no path beyond `/`, no query or fragment.
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as e:
        raise TlsError(f"--advertise-url {url!r} is not a valid URL: {e}") from None
    if parts.scheme not in ("http", "https"):
        raise TlsError(f"--advertise-url {url!r}: the scheme must be https (got {parts.scheme or 'none'!r})")
    host = parts.hostname or ""
    if not host:
        raise TlsError(f"--advertise-url {url!r} names no host (expected https://HOST:PORT)")
    if parts.username is not None or parts.password is not None:
        raise TlsError(f"--advertise-url {url!r} carries user info; workers authenticate with their own key")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise TlsError(f"--advertise-url {url!r}: only scheme, host and port are allowed (no path, query, fragment)")
    if parts.scheme == "http" and not is_loopback_host(host):
        raise TlsError(f"--advertise-url {url!r}: workers on other hosts must reach the control plane over https "
                       "(they send their environment key)")
    if parts.scheme == "http" and tls:
        raise TlsError(f"--advertise-url {url!r} is http but this control plane serves TLS: use https")
    if is_wildcard_host(host):
        raise TlsError(f"--advertise-url {url!r}: {host} is a bind-all address, not one a worker can connect to")
    netloc = url_host(host) + (f":{port}" if port is not None else "")
    return f"{parts.scheme}://{netloc}"


# ------------------------------------------------------------------ server side


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` with mode 0600, atomically (no window where it is wider)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    os.replace(tmp, path)


def _read_key(path: Path) -> Any:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    data = read_private_key_file(path)
    try:
        return load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise TlsError(f"{path} is not an unencrypted PEM private key ({type(e).__name__})") from None


def read_private_key_file(path: Path) -> bytes:
    """A private key file's bytes; refused when group/other can read it or it is not ours."""
    try:
        return read_private_file(path, MAX_PEM_BYTES)
    except FileNotFoundError:
        raise TlsError(f"TLS key file {path} does not exist") from None
    except PrivateFileError as e:
        raise TlsError(f"TLS key file {e}; chmod 600 it and treat the key as possibly leaked") from None


def _general_name(host: str) -> Any:
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return x509.DNSName(host.lower())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_ca(tls_dir: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    from sandbox.certs import make_ca

    now = _now()
    cert, key = make_ca("sandbox control plane", f"sandbox control plane CA {secrets.token_hex(4)}",
                        now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=CA_DAYS))
    _write_private(tls_dir / CA_KEY_FILE, key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    _write_public(tls_dir / CA_CERT_FILE, cert.public_bytes(serialization.Encoding.PEM))


def _load_cert(path: Path) -> Any:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise TlsError(f"{path} is not a PEM certificate ({type(e).__name__})") from None


def cert_names(cert: Any) -> set[str]:
    """The DNS names and IP addresses a certificate's subjectAltName carries (lower-case, IPs normalised)."""
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    names = {str(n).lower() for n in san.get_values_for_type(x509.DNSName)}
    names |= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return names


def covers(names: set[str], host: str) -> bool:
    """Would a client checking `host` accept a certificate for `names` (one leftmost wildcard label)?"""
    h = host.strip("[]").lower()
    try:
        return str(ipaddress.ip_address(h)) in names
    except ValueError:
        pass
    if h in names:
        return True
    first, _, rest = h.partition(".")
    return bool(rest) and f"*.{rest}" in names


def _server_cert_ok(tls_dir: Path, hosts: list[str], ca: Any) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        cert = _load_cert(tls_dir / SERVER_CERT_FILE)
        _read_key(tls_dir / SERVER_KEY_FILE)
    except (FileNotFoundError, TlsError):
        return False
    if cert.not_valid_after_utc - RENEW_BEFORE < _now():
        return False
    if not all(covers(cert_names(cert), h) for h in hosts):
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _new_server_cert(tls_dir: Path, hosts: list[str], ca: Any, ca_key: Any) -> None:
    from cryptography.hazmat.primitives import serialization

    from sandbox.certs import issue_server_cert

    now = _now()
    names: list[Any] = []
    for h in hosts:
        gn = _general_name(h)
        if gn not in names:
            names.append(gn)
    cert, key = issue_server_cert(ca, ca_key, names, hosts[0], now - datetime.timedelta(minutes=5),
                                  min(now + datetime.timedelta(days=SERVER_DAYS), ca.not_valid_after_utc))
    _write_private(tls_dir / SERVER_KEY_FILE, key.private_bytes(serialization.Encoding.PEM,
                                                               serialization.PrivateFormat.PKCS8,
                                                               serialization.NoEncryption()))
    _write_public(tls_dir / SERVER_CERT_FILE, cert.public_bytes(serialization.Encoding.PEM))


def ensure_generated(state_dir: Path, hosts: list[str]) -> tuple[Path, Path, Path]:
    """(server cert, server key, CA cert) under `<state_dir>/tls/`, made or renewed as needed."""
    tls_dir = state_dir / TLS_DIR
    tls_dir.mkdir(mode=0o700, exist_ok=True)
    if tls_dir.stat().st_mode & 0o077:
        tls_dir.chmod(0o700)
    if not (tls_dir / CA_KEY_FILE).exists() and not (tls_dir / CA_CERT_FILE).exists():
        _new_ca(tls_dir)
    try:
        ca = _load_cert(tls_dir / CA_CERT_FILE)
    except FileNotFoundError:
        raise TlsError(f"{tls_dir / CA_CERT_FILE} is missing but its key is there; delete {tls_dir} to start a "
                       "new CA (workers then need the new ca.pem)") from None
    ca_key = _read_key(tls_dir / CA_KEY_FILE)
    if ca.not_valid_after_utc - RENEW_BEFORE < _now():
        raise TlsError(f"the control plane CA {tls_dir / CA_CERT_FILE} expires on {ca.not_valid_after_utc:%Y-%m-%d}; "
                       f"delete {tls_dir} to make a new one and give workers the new ca.pem")
    if not _server_cert_ok(tls_dir, hosts, ca):
        _new_server_cert(tls_dir, hosts, ca, ca_key)
    return tls_dir / SERVER_CERT_FILE, tls_dir / SERVER_KEY_FILE, tls_dir / CA_CERT_FILE


def server_context(cert_file: Path, key_file: Path, *, must_cover: Sequence[str] = ()) -> ssl.SSLContext:
    """A server context (TLS 1.2+) from PEM files; the key file must be private to us, and the certificate
    must name every host in `must_cover` (the advertised host) or workers would refuse it."""
    read_private_key_file(key_file)  # refuse a key group/other can read before the ssl module reads it
    try:
        cert = _load_cert(cert_file)
    except FileNotFoundError:
        raise TlsError(f"TLS certificate file {cert_file} does not exist") from None
    names = cert_names(cert)
    for host in must_cover:
        if not covers(names, host):
            listed = ", ".join(sorted(names)) or "none"
            raise TlsError(f"TLS certificate {cert_file} does not name {host} (its names: {listed}); workers "
                           "connecting to the advertised URL would refuse it")
    if cert.not_valid_after_utc < _now():
        raise TlsError(f"TLS certificate {cert_file} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert_file), str(key_file))
    except ssl.SSLError as e:
        raise TlsError(f"cannot use {cert_file} with {key_file}: {e.reason or e}") from None
    return ctx


# ------------------------------------------------------------------ client side


def client_context(ca_file: Path) -> ssl.SSLContext:
    """Trust exactly the CA bundle in `ca_file` (PEM), hostname checked, TLS 1.2+. Never unverified."""
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file))
    except FileNotFoundError:
        raise TlsError(f"CA file {ca_file} does not exist") from None
    except (ssl.SSLError, OSError) as e:
        raise TlsError(f"CA file {ca_file} holds no usable PEM certificate: {getattr(e, 'reason', None) or e}") from None
    if not ctx.get_ca_certs():
        raise TlsError(f"CA file {ca_file} holds no CA certificate")
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def sdk_http_client(ca_file: Path | None) -> Any:
    """The `http_client` for `AsyncAnthropic` that trusts `ca_file` (None: the SDK's default client)."""
    if ca_file is None:
        return None
    import anthropic

    return anthropic.DefaultAsyncHttpxClient(verify=client_context(ca_file))


def sync_http_client(ca_file: Path | None, timeout: float) -> Any:
    import httpx2

    return httpx2.Client(timeout=timeout, verify=client_context(ca_file) if ca_file is not None else True)


def preflight(url: str, ctx: ssl.SSLContext | None, *, timeout: float = 10.0, ca_file: Path | None = None) -> str | None:
    """One TLS handshake with the control plane at `url` (https only).

    Raises TlsError when the certificate cannot be verified or the handshake fails: the worker must not
    start then. Returns a note (None if fine) when the host cannot be reached at all: it may be down for a
    while, and the worker rides out control plane outages.
    """
    parts = urlsplit(url)
    if parts.scheme != "https":
        return None
    host = parts.hostname or ""
    port = parts.port or 443
    if ctx is None:
        ctx = ssl.create_default_context()
    trust = f"--ca-file {ca_file}" if ca_file is not None else "the system's CA store (no --ca-file)"
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as tls:
            tls.settimeout(timeout)
    except ssl.SSLCertVerificationError as e:
        reason = e.verify_message or e.reason or "certificate verify failed"
        raise TlsError(f"cannot verify the control plane's TLS certificate at {url}: {reason} (trusting {trust}; "
                       "is it the CA that signed the control plane's certificate? `sandbox control-plane` prints "
                       "its CA file)") from None
    except ssl.SSLError as e:
        raise TlsError(f"TLS handshake with the control plane at {url} failed: {e.reason or e}") from None
    except (OSError, TimeoutError) as e:
        return f"cannot reach the control plane at {url} yet ({e.strerror or type(e).__name__}); will keep trying"
    return None
