"""The egress proxy's admin channel over TLS, as shipped: the material `sandbox kube admin-tls` makes
(run as a real process), laid out where deploy/kubernetes mounts it, a real proxy started with the
very command of proxy.yaml (`python -m sandbox.egress.cluster`, paths and addresses moved to this
machine's loopback), and the worker's client built from the shipped backend-config.yaml. The
worker with the generated CA registers a session; a worker with another CA, another name, or
plain HTTP is refused; the readiness probe answers as the kubelet asks it (HTTPS, unverified);
no key or token reaches an output, a log or an error. Also: plain HTTP to an admin endpoint
beyond loopback is refused unless the configuration allows it by name."""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sandbox.egress.cluster import ClusterEgressClient, ClusterEgressError
from sandbox.egress.rules import EgressPolicy
from sandbox.kube.config import KubeConfigError, config_from_dict

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
TOKEN = "adm1n-" + "7e" * 20
POD = "127.0.0.5"
POLICY = EgressPolicy.model_validate({"rules": [{"host": "allowed.test", "ports": [80]}]})


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def _pod(name: str, deployment: str) -> tuple[dict[str, Any], dict[str, Any]]:
    spec = next(d for d in _docs(name) if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    return spec, next(c for c in spec["containers"] if c["name"] == deployment)


def admin_tls(directory: Path, *extra: str, umask: int | None = None) -> subprocess.CompletedProcess[str]:
    """`sandbox kube admin-tls DIRECTORY ...` as an operator runs it."""
    def set_umask() -> None:
        if umask is not None:
            os.umask(umask)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC", "SANDBOX_"))}
    return subprocess.run([sys.executable, "-m", "sandbox", "kube", "admin-tls", str(directory), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
                          preexec_fn=set_umask)


def _made(directory: Path, *extra: str) -> dict[str, Any]:
    r = admin_tls(directory, "--json", *extra)
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


class Volumes:
    """A container's volume mounts, each a directory here, filled as the kubelet would fill it."""

    def __init__(self, root: Path, spec: dict[str, Any], container: dict[str, Any]) -> None:
        self.dirs: dict[str, Path] = {}
        for m in container["volumeMounts"]:
            d = root / m["name"]
            d.mkdir(parents=True)
            self.dirs[m["mountPath"].rstrip("/")] = d
        self.by_volume = {m["name"]: self.dirs[m["mountPath"].rstrip("/")] for m in container["volumeMounts"]}
        self.spec = spec

    def local(self, path: str) -> str:
        for mount, d in sorted(self.dirs.items(), key=lambda kv: -len(kv[0])):
            if path == mount or path.startswith(mount + "/"):
                return str(d) + path[len(mount):]
        return path

    def fill(self, volume: str, files: dict[str, Path | str]) -> None:
        """A Secret or ConfigMap volume: each key a file, with the volume's defaultMode (0644 unless set)."""
        vol = next(v for v in self.spec["volumes"] if v["name"] == volume)
        mode = (vol.get("secret") or vol.get("configMap") or {}).get("defaultMode", 0o644)
        for key, src in files.items():
            dst = self.by_volume[volume] / key
            if isinstance(src, Path):
                shutil.copyfile(src, dst)
            else:
                dst.write_text(src)
            dst.chmod(mode)


class ProxyPod:
    """One proxy replica: proxy.yaml's command, run here."""

    def __init__(self, tmp: Path, material: dict[str, Any]) -> None:
        spec, c = _pod("proxy.yaml", "proxy")
        self.vols = Volumes(tmp / "proxy-pod", spec, c)
        secret = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"] if v.get("secret")}
        tls_volume = next(n for n, s in secret.items() if s == "sandbox-egress-admin-tls")
        self.vols.fill(tls_volume, {"tls.crt": Path(material["cert"]), "tls.key": Path(material["key"])})
        token_volume = next(n for n, s in secret.items() if s == "sandbox-egress-admin")
        self.vols.fill(token_volume, {"token": TOKEN})
        cmd = [self.vols.local(a) for a in c["command"]]
        assert cmd[1:3] == ["-m", "sandbox.egress.cluster"], cmd
        cmd[0] = sys.executable
        cmd[cmd.index("--listen") + 1] = "127.0.0.1:0"
        cmd[cmd.index("--admin-listen") + 1] = "127.0.0.1:0"
        self.probe = c["readinessProbe"]["httpGet"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC", "SANDBOX_"))}
        env["SANDBOX_EGRESS_LOOP"] = "asyncio"
        self.log_path = tmp / "proxy.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self._log)
        end, m = time.monotonic() + 30, None
        while time.monotonic() < end and self.proc.poll() is None and not m:
            m = re.search(r"admin endpoint on [\d.]+:(\d+)", self.log_path.read_text(errors="replace"))
            time.sleep(0.05)
        assert m, f"the proxy did not start: {self.log_path.read_text(errors='replace')}"
        self.admin_port = int(m.group(1))

    def kubelet_probe(self, scheme: str | None = None) -> tuple[int, dict[str, Any]]:
        """What the kubelet does for an httpGet probe: HTTPS without verifying the certificate."""
        scheme = (scheme or self.probe.get("scheme", "HTTP")).lower()
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        url = f"{scheme}://127.0.0.1:{self.admin_port}{self.probe['path']}"
        with urllib.request.urlopen(url, timeout=10, context=ctx if scheme == "https" else None) as r:
            return r.status, dict(json.loads(r.read()))

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._log.close()
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def material(tmp_path: Path) -> dict[str, Any]:
    return _made(tmp_path / "admin-tls")


@pytest.fixture
def proxy_pod(tmp_path: Path, material: dict[str, Any]) -> Iterator[ProxyPod]:
    pod = ProxyPod(tmp_path, material)
    yield pod
    pod.stop()


def worker_config(tmp_path: Path, ca_file: str | Path, admin_port: int, **override: Any) -> Any:
    """The shipped backend configuration as the worker pod sees it (its mounts filled here),
    pointed at this machine's one replica instead of the headless Service's DNS name."""
    spec, c = _pod("worker.yaml", "worker")
    vols = Volumes(tmp_path / f"worker-pod-{len(list(tmp_path.glob('worker-pod-*')))}", spec, c)
    data = yaml.safe_load(_docs("backend-config.yaml")[0]["data"]["kube.yaml"])
    ep = data["egress_proxy"]
    for key in ("admin_tls_ca_file", "admin_token_file"):
        ep[key] = vols.local(ep[key])
    Path(ep["admin_token_file"]).write_text(TOKEN)
    shutil.copyfile(ca_file, ep["admin_tls_ca_file"])
    ep.pop("admin_dns")
    ep["admin_urls"] = [f"https://127.0.0.1:{admin_port}"]
    ep.update(override)
    return config_from_dict(data).egress_proxy


def test_the_material_is_a_ca_for_the_worker_and_a_0600_key_for_the_one_name_and_the_ca_key_is_not_kept(
        tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_private_key

    d = tmp_path / "m"
    r = admin_tls(d, umask=0)  # a careless umask changes nothing
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in d.iterdir()) == ["ca.crt", "tls.crt", "tls.key"]
    assert (d / "tls.key").stat().st_mode & 0o777 == 0o600 and d.stat().st_mode & 0o077 == 0
    assert (d / "ca.crt").stat().st_mode & 0o777 == 0o644  # public: a ConfigMap
    assert "PRIVATE KEY" not in (d / "ca.crt").read_text() + (d / "tls.crt").read_text()
    ca = x509.load_pem_x509_certificate((d / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((d / "tls.crt").read_bytes())
    key = load_pem_private_key((d / "tls.key").read_bytes(), password=None)
    raw = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert key.public_key().public_bytes(*raw) == cert.public_key().public_bytes(*raw)
    assert key.public_key().public_bytes(*raw) != ca.public_key().public_bytes(*raw)  # the only key here is the leaf's
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["sandbox-egress-admin"] and not san.get_values_for_type(x509.IPAddress)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    # the printed commands name the files, never their content
    assert "kubectl -n sandbox-system create secret tls sandbox-egress-admin-tls" in r.stdout
    assert "kubectl -n sandbox-system create configmap sandbox-egress-admin-ca --from-file=ca.crt=" in r.stdout
    assert "PRIVATE" not in r.stdout + r.stderr and "BEGIN" not in r.stdout + r.stderr
    # existing material is not overwritten by accident; a name the worker could not check is refused
    again = admin_tls(d)
    assert again.returncode == 2 and "already exist: pass --force" in again.stderr and str(d / "tls.key") in again.stderr
    assert admin_tls(d, "--force").returncode == 0
    assert x509.load_pem_x509_certificate((d / "ca.crt").read_bytes()) != ca  # a new CA: the old one is gone
    bad = admin_tls(tmp_path / "n", "--name", "Not A Name")
    assert bad.returncode == 2 and "--name 'Not A Name': not a DNS name" in bad.stderr and not (tmp_path / "n").exists()


def test_a_worker_with_the_generated_ca_registers_with_the_shipped_proxy_command_and_others_are_refused(
        tmp_path: Path, material: dict[str, Any], proxy_pod: ProxyPod) -> None:
    # the readiness probe as the kubelet runs it: HTTPS, no token, no verification
    assert proxy_pod.probe["scheme"] == "HTTPS"
    status, health = proxy_pod.kubelet_probe()
    assert status == 200 and health["sessions"] == 0
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # no plain HTTP on the admin port at all
        proxy_pod.kubelet_probe("http")

    cfg = worker_config(tmp_path, material["ca"], proxy_pod.admin_port)
    assert cfg.admin_tls_name == material["name"]
    client = ClusterEgressClient.from_config(cfg)
    try:
        client.register("sess_admin_tls", POD, POLICY, ttl_s=60)
        assert proxy_pod.kubelet_probe()[1]["sessions"] == 1
        client.unregister("sess_admin_tls")
        assert proxy_pod.kubelet_probe()[1]["sessions"] == 0
    finally:
        client.close()

    other = _made(tmp_path / "other-ca")  # a CA of the same making, not this deployment's
    renamed = _made(tmp_path / "renamed", "--name", "sandbox-egress-admin.other")
    refused: dict[str, str] = {}
    for what, cfg_bad in (
            ("another CA", worker_config(tmp_path, other["ca"], proxy_pod.admin_port)),
            ("another name", worker_config(tmp_path, material["ca"], proxy_pod.admin_port,
                                           admin_tls_name="sandbox-egress-admin.other")),
            ("another CA for the other name", worker_config(tmp_path, renamed["ca"], proxy_pod.admin_port,
                                                            admin_tls_name="sandbox-egress-admin.other"))):
        bad = ClusterEgressClient.from_config(cfg_bad)
        try:
            with pytest.raises(ClusterEgressError, match="CERTIFICATE_VERIFY_FAILED") as e:
                bad.register("sess_other", POD, POLICY, ttl_s=60)
            refused[what] = str(e.value)
        finally:
            bad.close()
    # plain HTTP to the TLS port: the worker must opt in by name, and then the proxy still refuses it
    plain_cfg = worker_config(tmp_path, material["ca"], proxy_pod.admin_port, admin_tls_ca_file=None,
                              allow_plain_admin=True, admin_url=f"http://127.0.0.1:{proxy_pod.admin_port}",
                              admin_urls=[])
    plain = ClusterEgressClient.from_config(plain_cfg)
    try:
        with pytest.raises(ClusterEgressError, match="cannot reach") as e:
            plain.register("sess_plain", POD, POLICY, ttl_s=60)
        refused["plain"] = str(e.value)
    finally:
        plain.close()
    assert proxy_pod.kubelet_probe()[1]["sessions"] == 0  # nothing registered by any of them
    log = proxy_pod.stop()
    key = Path(material["key"]).read_text()
    for where, text in {"proxy log": log, **refused}.items():
        assert TOKEN not in text and "PRIVATE KEY" not in text and key.splitlines()[1] not in text, where


def test_plain_http_beyond_loopback_is_refused_unless_the_configuration_allows_it_by_name(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)

    def client(**ep: Any) -> ClusterEgressClient:
        return ClusterEgressClient.from_config(
            config_from_dict({"egress_proxy": {"admin_token_file": str(token), **ep}}).egress_proxy)

    for ep, key in (({"admin_url": "http://10.96.0.53:3129"}, "egress_proxy.admin_url"),
                    ({}, "egress_proxy.admin_url"),  # the default: the Service's DNS name
                    ({"admin_urls": ["http://127.0.0.1:3129", "http://10.0.0.7:3129"]}, "egress_proxy.admin_urls"),
                    ({"admin_dns": "sandbox-egress-replicas.sandbox-system.svc.cluster.local"}, "egress_proxy.admin_dns")):
        with pytest.raises(ClusterEgressError, match=f"{re.escape(key)}: .* plain HTTP beyond loopback.*"
                                                     "allow_plain_admin: true") as e:
            client(**ep)
        assert TOKEN not in str(e.value)
    # loopback needs no TLS; elsewhere plain HTTP is a written choice
    assert client(admin_url="http://127.0.0.1:3129").endpoints() == ["http://127.0.0.1:3129"]
    assert client(admin_urls=["http://[::1]:3129", "http://localhost:3129"]).endpoints()
    assert client(admin_url="http://10.96.0.53:3129", allow_plain_admin=True).endpoints() == ["http://10.96.0.53:3129"]
    # TLS and "plain allowed" at once is a contradiction; a CA with an http URL was refused already
    with pytest.raises(KubeConfigError, match="allow_plain_admin contradicts admin_tls_ca_file"):
        config_from_dict({"egress_proxy": {"admin_tls_ca_file": "/ca.crt", "allow_plain_admin": True}})
    with pytest.raises(KubeConfigError, match="admin_tls_name: 'Bad Name' is not a DNS name"):
        config_from_dict({"egress_proxy": {"admin_tls_name": "Bad Name"}})


def test_the_proxy_refuses_to_serve_the_admin_endpoint_in_clear_beyond_loopback_unless_allowed_by_name(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sandbox.egress.cluster import main, parser

    token = tmp_path / "token"
    token.write_text(TOKEN)
    base = ["--token-file", str(token), "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "state")]
    for admin in ("0.0.0.0:0", ":0", "[::]:0", "10.1.2.3:0"):  # (refused before anything is bound)
        assert main([*base, "--admin-listen", admin]) == 2
        err = capsys.readouterr().err
        assert f"--admin-listen {admin}: the admin endpoint takes the admin token" in err and "--admin-tls-cert" in err
    assert parser().parse_args([*base, "--admin-listen", "0.0.0.0:0", "--allow-plain-admin"]).allow_plain_admin
    # the shipped Deployment serves TLS and never opts out
    _, c = _pod("proxy.yaml", "proxy")
    args = parser().parse_args(c["command"][3:])
    assert args.admin_tls_cert and args.admin_tls_key and not args.allow_plain_admin


def _expired_ca(path: Path) -> Path:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "an expired admin CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=400))
            .not_valid_after(now - datetime.timedelta(days=35))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_the_worker_names_a_missing_or_wrong_ca_file_refuses_an_expired_one_and_warns_before_expiry(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    short = _made(tmp_path / "short", "--days", "10")
    cases = {tmp_path / "absent.crt": "cannot read it: No such file or directory",
             Path(short["key"]): "no PEM CA certificate in it",  # the key where the CA should be
             _expired_ca(tmp_path / "expired.crt"): "the CA expired on .*sandbox kube admin-tls"}
    for ca, why in cases.items():
        with pytest.raises(ClusterEgressError, match=f"egress_proxy.admin_tls_ca_file {re.escape(str(ca))}: {why}") as e:
            ClusterEgressClient(["https://127.0.0.1:1"], TOKEN, tls_ca_file=ca)
        assert "PRIVATE" not in str(e.value) and TOKEN not in str(e.value)
    with caplog.at_level(logging.WARNING, logger="sandbox.egress.cluster"):
        ClusterEgressClient(["https://127.0.0.1:1"], TOKEN, tls_ca_file=short["ca"]).close()
    assert any("expires on" in r.getMessage() and "sandbox kube admin-tls" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sandbox.egress.cluster"):
        ClusterEgressClient(["https://127.0.0.1:1"], TOKEN, tls_ca_file=_made(tmp_path / "long")["ca"]).close()
    assert not [r for r in caplog.records if "expires on" in r.getMessage()]


def test_a_ca_bundle_of_the_old_and_the_new_ca_lets_the_worker_reach_replicas_of_either_during_a_rotation(
        tmp_path: Path, material: dict[str, Any], proxy_pod: ProxyPod) -> None:
    # Rotation without an outage: the workers first trust old + new (ConfigMap), then the proxies
    # get the new certificate (Secret), then the old CA goes. An expired old CA in the bundle is no refusal.
    new = _made(tmp_path / "new")
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(_expired_ca(tmp_path / "old-expired.crt").read_bytes() + Path(new["ca"]).read_bytes()
                       + Path(material["ca"]).read_bytes())
    client = ClusterEgressClient.from_config(worker_config(tmp_path, bundle, proxy_pod.admin_port))
    try:
        client.register("sess_rotation", POD, POLICY, ttl_s=60)
        assert proxy_pod.kubelet_probe()[1]["sessions"] == 1
    finally:
        client.unregister("sess_rotation")
        client.close()
