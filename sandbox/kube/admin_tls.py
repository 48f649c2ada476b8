"""TLS material for the egress proxy's admin channel on a cluster (`sandbox kube admin-tls DIR`).

The worker registers every session with every proxy replica on the admin port, sending the admin
token and, for policies that terminate TLS, the session CA's private key. The replicas serve that
port with one certificate (``--admin-tls-cert/--admin-tls-key``, a Secret mounted into the proxy
pods only) and the worker verifies it against one CA (``egress_proxy.admin_tls_ca_file``, public, a
ConfigMap) for one fixed name (``egress_proxy.admin_tls_name``): replicas are reached by pod IP,
which no certificate can list in advance, so the name is checked instead of the address.

What is written into DIR:

- ``ca.crt``: the CA certificate (public; mode 0644) for the worker;
- ``tls.crt``: the replicas' certificate for the one name (mode 0644), signed by that CA;
- ``tls.key``: its private key (mode 0600, written with that mode from the start).

The CA's own private key is never written anywhere: it signs the one server certificate and is
dropped, so nothing else can ever be signed by that CA, and the only secret to keep is
``tls.key``. Renewing (or rotating after a leak) is running the command again and replacing the
Secret and the ConfigMap, then restarting the proxy and the worker Deployments.
"""

from __future__ import annotations

import datetime
import os
import re
import secrets
import shlex
from dataclasses import dataclass
from pathlib import Path

DEFAULT_NAME = "sandbox-egress-admin"
DEFAULT_NAMESPACE = "sandbox-system"
SECRET_NAME = "sandbox-egress-admin-tls"     # kubernetes.io/tls: tls.crt, tls.key (proxy pods only)
CONFIGMAP_NAME = "sandbox-egress-admin-ca"   # ca.crt (public: the worker)
CA_FILE, CERT_FILE, KEY_FILE = "ca.crt", "tls.crt", "tls.key"
DEFAULT_DAYS = 365
MAX_DAYS = 3650
_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*$")


class AdminTlsError(ValueError):
    """Bad input (name, days, directory) or a file that would be overwritten; names the path or value."""


@dataclass(frozen=True)
class AdminTlsFiles:
    ca: Path
    cert: Path
    key: Path
    name: str
    not_after: datetime.datetime


def check_name(name: str) -> str:
    if not _DNS_NAME.match(name) or len(name) > 253:
        raise AdminTlsError(f"--name {name!r}: not a DNS name (lower-case letters, digits, '-', dots); "
                            "it is egress_proxy.admin_tls_name in the backend configuration")
    return name


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` created with ``mode`` (never wider for a moment), atomically."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # (the umask could only narrow it; make it exact)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def generate(directory: str | Path, name: str = DEFAULT_NAME, days: int = DEFAULT_DAYS,
             force: bool = False) -> AdminTlsFiles:
    """Make a CA and the replicas' certificate for ``name`` in ``directory`` (created mode 0700 if
    missing). Existing files are refused unless ``force``. The CA key is not kept (module docstring)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from sandbox.certs import issue_server_cert, make_ca

    check_name(name)
    if not 1 <= days <= MAX_DAYS:
        raise AdminTlsError(f"--days {days}: must be 1..{MAX_DAYS}")
    d = Path(directory)
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise AdminTlsError(f"{d}: cannot create the directory: {e.strerror or e}") from None
    if not d.is_dir():
        raise AdminTlsError(f"{d}: not a directory")
    files = {k: d / f for k, f in (("ca", CA_FILE), ("cert", CERT_FILE), ("key", KEY_FILE))}
    there = [str(p) for p in files.values() if p.exists() or p.is_symlink()]
    if there and not force:
        raise AdminTlsError(f"{', '.join(there)} already exist: pass --force to replace them (the Secret, the "
                            "ConfigMap and both Deployments must then be updated together)")

    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca, ca_key = make_ca("sandbox egress admin", f"sandbox egress admin CA {secrets.token_hex(4)}",
                         not_before, not_after)
    cert, key = issue_server_cert(ca, ca_key, [x509.DNSName(name)], name, not_before, not_after)
    del ca_key  # never written: nothing else can be signed by this CA
    _write(files["key"], key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()), 0o600)
    _write(files["cert"], cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(files["ca"], ca.public_bytes(serialization.Encoding.PEM), 0o644)
    return AdminTlsFiles(ca=files["ca"], cert=files["cert"], key=files["key"], name=name, not_after=not_after)


def kubectl_commands(f: AdminTlsFiles, namespace: str = DEFAULT_NAMESPACE) -> list[str]:
    """What to run to hand the material to the cluster (the names deploy/kubernetes uses)."""
    q = shlex.quote
    return [
        f"kubectl -n {q(namespace)} create secret tls {SECRET_NAME} --cert={q(str(f.cert))} --key={q(str(f.key))}",
        f"kubectl -n {q(namespace)} create configmap {CONFIGMAP_NAME} --from-file={q(f'{CA_FILE}={f.ca}')}",
    ]
