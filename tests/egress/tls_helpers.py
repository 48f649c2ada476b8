"""TLS test material: a test CA of our own, and an HTTPS server on a loopback address that
records what it receives (whether any byte arrived at all, and each decrypted request)."""

from __future__ import annotations

import datetime
import socket
import ssl
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.egress.egress_helpers import ALLOWED_ADDR, accept_forever


class TestCA:
    """An ECDSA CA that issues server certificates (tests only)."""

    __test__ = False

    def __init__(self, name: str = "egress test upstream CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(self.key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )  # fmt: skip

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, path: Path) -> Path:
        path.write_bytes(self.pem)
        return path

    def issue(self, names: list[str], directory: Path) -> tuple[Path, Path]:
        """(cert file, key file) for a server answering to ``names`` (DNS names or IPs)."""
        import ipaddress

        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        sans: list[x509.GeneralName] = []
        for n in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        cert = (
            x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )  # fmt: skip
        cert_path = directory / f"{names[0]}.crt"
        key_path = directory / f"{names[0]}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        return cert_path, key_path


@dataclass
class Seen:
    head: bytes
    body: bytes

    def header(self, name: str) -> list[str]:
        out = []
        for line in self.head.decode("latin-1").split("\r\n")[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == name.lower():
                out.append(v.strip())
        return out

    @property
    def request_line(self) -> str:
        return self.head.decode("latin-1").split("\r\n", 1)[0]


@dataclass
class TlsTarget:
    """An HTTPS/1.1 server on ``addr`` (certificate for ``names`` from ``ca``): one request per
    connection, answers ``ok:<path>`` (or ``body``), records every request it decrypts."""

    addr: str
    ca: TestCA
    names: list[str]
    tmp: Path
    body: bytes | None = None
    status: int = 200
    extra_headers: str = ""
    received_any: list[bool] = field(default_factory=list)  # per TCP connection: did any byte arrive
    handshake_errors: list[str] = field(default_factory=list)
    requests: list[Seen] = field(default_factory=list)
    port: int = 0

    def start(self) -> TlsTarget:
        cert, key = self.ca.issue(self.names, self.tmp)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((self.addr, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        accept_forever(self.sock, self._serve)
        return self

    def _serve(self, c: socket.socket) -> None:
        c.settimeout(5)
        try:
            try:
                self.received_any.append(bool(c.recv(1, socket.MSG_PEEK)))
            except OSError:
                self.received_any.append(False)
                return
            try:
                s = self.ctx.wrap_socket(c, server_side=True)
            except (ssl.SSLError, OSError) as e:
                self.handshake_errors.append(type(e).__name__ + ": " + str(e))
                return
            buf = b""
            while b"\r\n\r\n" not in buf:
                d = s.recv(65536)
                if not d:
                    return
                buf += d
            head, _, rest = buf.partition(b"\r\n\r\n")
            seen = Seen(head, b"")
            body = rest
            if [v for v in seen.header("transfer-encoding") if "chunked" in v.lower()]:
                while not body.endswith(b"0\r\n\r\n"):
                    d = s.recv(65536)
                    if not d:
                        break
                    body += d
            elif seen.header("content-length"):
                n = int(seen.header("content-length")[0])
                while len(body) < n:
                    d = s.recv(65536)
                    if not d:
                        break
                    body += d
            seen.body = body
            self.requests.append(seen)
            path = head.split(b" ")[1]
            payload = self.body if self.body is not None else b"ok:" + path
            s.sendall(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\nConnection: close\r\n%s\r\n" % (self.status, len(payload), self.extra_headers.encode()) + payload)
            try:
                s.unwrap()
            except (ssl.SSLError, OSError):
                pass
        except OSError:
            pass
        finally:
            c.close()

    def close(self) -> None:
        self.sock.close()


def real_client_hello(server_hostname: str | None) -> bytes:
    """The exact first flight Python's ssl module sends (records, ready to put on a socket)."""
    ctx = ssl.create_default_context()
    if server_hostname is None:
        ctx.check_hostname = False
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=server_hostname)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


def make_hello(sni: str | None = "allowed.test", extra: list[tuple[int, bytes]] | None = None, sni_type: int = 0) -> bytes:
    """A minimal synthetic ClientHello record (for parser and ECH tests)."""
    exts = b""
    if sni is not None:
        name = sni.encode()
        entry = bytes([sni_type]) + struct.pack(">H", len(name)) + name
        data = struct.pack(">H", len(entry)) + entry
        exts += struct.pack(">HH", 0, len(data)) + data
    for t, d in extra or []:
        exts += struct.pack(">HH", t, len(d)) + d
    body = b"\x03\x03" + b"\x11" * 32 + b"\x00" + struct.pack(">H", 2) + b"\x13\x01" + b"\x01\x00" + struct.pack(">H", len(exts)) + exts
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack(">H", len(hs)) + hs


def split_records(record: bytes, size: int) -> bytes:
    """The same handshake message re-fragmented into records of at most ``size`` bytes."""
    hs = record[5:]
    out = b""
    for i in range(0, len(hs), size):
        frag = hs[i : i + size]
        out += b"\x16\x03\x01" + struct.pack(">H", len(frag)) + frag
    return out


# Fixtures shared by the terminating-proxy tests (host and cluster): registered by the conftests that import them.
@pytest.fixture
def up_ca() -> TestCA:
    return TestCA()


@pytest.fixture
def upstream(up_ca: TestCA, tmp_path: Path) -> Iterator[TlsTarget]:
    t = TlsTarget(ALLOWED_ADDR, up_ca, ["allowed.test"], tmp_path).start()
    yield t
    t.close()

