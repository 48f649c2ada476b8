"""A certificate authority per sandbox session, for the hosts whose rules the proxy terminates.

The CA's private key exists only in the proxy's memory (never on disk, never in the
sandbox); the sandbox gets the CA *certificate* through ``ca.pem`` and ``ca-bundle.pem``
in its read-only /run/sandbox-egress. The CA carries critical name constraints listing
exactly the session's terminated hosts, so even a leaked key could not impersonate any
other name to a client that checks constraints (OpenSSL, GnuTLS, Go and Java do).

Leaf certificates are ECDSA P-256 (one key per session, so a new host costs a signature,
not a key generation), short-lived (1 day, re-minted before they expire), carry the AKI that
Python 3.13's strict verification requires, and are cached per host with their
``SSLContext``. ``load_cert_chain`` only reads files, so chains are loaded through a memfd.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_FILE = "ca.pem"  # the session CA alone (additive trust: NODE_EXTRA_CA_CERTS)
BUNDLE_FILE = "ca-bundle.pem"  # the host's roots plus the session CA (replacing trust: SSL_CERT_FILE, ...)
LEAF_LIFETIME = datetime.timedelta(days=1)
CA_LIFETIME = datetime.timedelta(days=30)
_LEAF_CACHE_MAX = 256


def host_roots() -> bytes:
    """The host's trust store (PEM), for the bundle that keeps tunnelled hosts verifying."""
    paths = ssl.get_default_verify_paths()
    for p in (paths.cafile, paths.openssl_cafile, "/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"):
        if p and os.path.isfile(p):
            try:
                return Path(p).read_bytes()
            except OSError:
                continue
    return b""


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _permitted(hosts: Iterable[str]) -> list[x509.GeneralName]:
    """The CA's permitted subtrees for exactly these hosts (an IP address as a /32 or /128)."""
    permitted: list[x509.GeneralName] = []
    for h in sorted(set(hosts)):
        gn = _general_name(h)
        if isinstance(gn, x509.IPAddress):
            ip = gn.value
            permitted.append(x509.IPAddress(ipaddress.ip_network(f"{ip}/{32 if ip.version == 4 else 128}")))
        else:
            permitted.append(gn)
    return permitted


class SessionCAError(ValueError):
    """A session CA handed to the proxy that it will not use. Never carries key material."""


class SessionCA:
    def __init__(self, hosts: Iterable[str], label: str = "sandbox session",
                 lifetime: datetime.timedelta = CA_LIFETIME) -> None:
        self.hosts = frozenset(hosts)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sandbox egress proxy"),
                          x509.NameAttribute(NameOID.COMMON_NAME, f"{label} CA"[:64])])
        permitted = _permitted(self.hosts)
        builder = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + min(lifetime, CA_LIFETIME))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
        )  # fmt: skip
        if permitted:
            builder = builder.add_extension(x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=None), critical=True)
        self.cert = builder.sign(self._key, hashes.SHA256())
        self.not_after = self.cert.not_valid_after_utc
        self._contexts: dict[str, tuple[datetime.datetime, ssl.SSLContext]] = {}

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes, hosts: Iterable[str]) -> "SessionCA":
        """A session CA made elsewhere (on a cluster, by the worker, so that every proxy replica
        presents leaves of the one CA the sandbox trusts). Checked before use: an EC P-256 key that
        matches the certificate, a CA certificate valid now whose critical name constraints permit
        exactly ``hosts``. Errors name the reason, never the key."""
        hosts = frozenset(hosts)
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            raise SessionCAError("the session CA certificate is not a PEM certificate") from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise SessionCAError("the session CA key is not an unencrypted PEM private key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
            raise SessionCAError("the session CA key must be an EC P-256 key")
        if key.public_key() != cert.public_key():
            raise SessionCAError("the session CA key does not match its certificate")
        now = datetime.datetime.now(datetime.UTC)
        if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
            raise SessionCAError("the session CA certificate is not valid now")
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
            nc = cert.extensions.get_extension_for_class(x509.NameConstraints)
        except x509.ExtensionNotFound:
            raise SessionCAError("the session CA certificate needs basic and name constraints") from None
        if not (bc.critical and bc.value.ca and bc.value.path_length == 0):
            raise SessionCAError("the session CA certificate is not a CA with path length 0")
        want = _permitted(hosts)
        got = list(nc.value.permitted_subtrees or [])
        if not nc.critical or nc.value.excluded_subtrees or sorted(map(repr, got)) != sorted(map(repr, want)):
            raise SessionCAError("the session CA's name constraints must permit exactly the session's terminated "
                                 f"hosts ({', '.join(sorted(hosts))})")
        ca = cls.__new__(cls)
        ca.hosts = hosts
        ca._key = key
        ca._leaf_key = ec.generate_private_key(ec.SECP256R1())  # each replica its own leaf key
        ca.cert = cert
        ca.not_after = cert.not_valid_after_utc
        ca._contexts = {}
        return ca

    def key_pem(self) -> bytes:
        """The CA's private key (PKCS#8 PEM), for the worker to hand to the proxy replicas over the
        authenticated admin channel. Never logged, never written to a file, never in a sandbox."""
        return self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write_trust(self, directory: Path, roots: bytes) -> None:
        """``ca.pem`` and ``ca-bundle.pem`` (roots + CA) for the sandbox, world-readable."""
        write_trust_files(directory, self.pem, roots)

    def _leaf(self, host: str) -> tuple[bytes, datetime.datetime]:
        now = datetime.datetime.now(datetime.UTC)
        not_after = min(now + LEAF_LIFETIME, self.not_after)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])]))
            .issuer_name(self.cert.subject).public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([_general_name(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )  # fmt: skip
        return cert.public_bytes(serialization.Encoding.PEM), not_after

    def server_context(self, host: str) -> ssl.SSLContext:
        """A server-side context presenting a leaf for ``host`` (cached until near expiry)."""
        if host not in self.hosts:
            raise ValueError("not a terminated host of this session")
        now = datetime.datetime.now(datetime.UTC)
        hit = self._contexts.get(host)
        if hit is not None and hit[0] - now > datetime.timedelta(minutes=10):
            return hit[1]
        leaf, not_after = self._leaf(host)
        key = self._leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])  # no HTTP/2: the proxy parses HTTP/1.1 only
        fd = os.memfd_create("egress-leaf", os.MFD_CLOEXEC)  # the key touches no file system
        try:
            os.write(fd, leaf + self.pem + key)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        if len(self._contexts) >= _LEAF_CACHE_MAX:
            self._contexts.pop(next(iter(self._contexts)))
        self._contexts[host] = (not_after, ctx)
        return ctx


def write_trust_files(directory: Path, ca_pem: bytes | None, roots: bytes) -> None:
    """Write ``ca-bundle.pem`` (always: the sandbox's CA variables point at it) and ``ca.pem``
    (the session CA, or empty when nothing is terminated), mode 0644, replaced atomically."""
    directory = Path(directory)
    bundle = roots.rstrip(b"\n") + b"\n" + (ca_pem or b"") if roots else (ca_pem or b"")
    for name, data in ((BUNDLE_FILE, bundle), (CA_FILE, ca_pem or b"")):
        tmp = directory / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, data)
            os.fchmod(fd, 0o644)
        finally:
            os.close(fd)
        os.replace(tmp, directory / name)
