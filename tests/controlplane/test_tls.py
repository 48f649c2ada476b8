"""TLS for workers on other hosts: the control plane serves HTTPS with a generated CA or the operator's
files, advertises the URL workers use (in each work secret), refuses a plain-HTTP non-loopback bind, and a
client with the wrong CA is refused with the URL and the reason. Real sockets on loopback, real TLS."""

from __future__ import annotations

import base64
import json
import socket
import stat
from pathlib import Path

import anthropic
import httpx2
import pytest
from click.testing import CliRunner
from cryptography import x509

from sandbox.controlplane import ControlPlane, ControlPlaneError, LocalAdmin
from sandbox.controlplane.cli import control_plane_cmd, session_group
from sandbox.controlplane.endpoint import read_endpoint
from sandbox.controlplane.tls import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    SERVER_CERT_FILE,
    SERVER_KEY_FILE,
    TLS_DIR,
    ServerTls,
    TlsError,
    cert_names,
    client_context,
    ensure_generated,
    preflight,
    validate_advertise_url,
)

from tests.worker.helpers import free_port


def _sdk(base_url: str, key: str, ca_file: Path) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=base_url, auth_token=key, api_key=None, max_retries=0, timeout=10,
                               http_client=httpx2.Client(verify=client_context(ca_file), timeout=10))


def _secret(secret: str) -> dict[str, str]:
    doc: dict[str, str] = json.loads(base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4)))
    return doc


def _other_ca(tmp_path: Path) -> Path:
    d = tmp_path / "elsewhere"
    d.mkdir(mode=0o700)
    return ensure_generated(d, ["localhost", "127.0.0.1"])[2]


# ------------------------------------------------------------------ refusals before anything listens


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_a_plain_http_bind_on_a_non_loopback_address_is_refused_before_it_listens(tmp_path: Path, host: str) -> None:
    with pytest.raises(ControlPlaneError, match="without TLS") as e:
        ControlPlane(tmp_path / "cp", host=host, port=0).start()
    assert "--tls" in str(e.value)
    assert not (tmp_path / "cp").exists()  # nothing made, nothing bound


def test_the_cli_refuses_a_plain_http_non_loopback_bind_with_a_clear_error(tmp_path: Path) -> None:
    res = CliRunner().invoke(control_plane_cmd, ["--state-dir", str(tmp_path / "cp"), "--host", "0.0.0.0",
                                                 "--port", "0"])
    assert res.exit_code == 2 and "refusing to listen on 0.0.0.0 without TLS" in res.output, res.output


@pytest.mark.parametrize(("url", "why"), [
    ("http://cp.example.test:7787", "must reach the control plane over https"),
    ("https://:7787", "names no host"),
    ("ftp://cp.example.test", "scheme must be https"),
    ("cp.example.test:7787", "scheme must be https"),
    ("https://user:pw@cp.example.test:7787", "user info"),
    ("https://cp.example.test:7787/v1", "no path"),
    ("https://cp.example.test:7787/?x=1", "no path"),
    ("https://0.0.0.0:7787", "bind-all"),
    ("https://cp.example.test:99999", "not a valid URL"),
])
def test_a_bad_advertise_url_is_refused_with_the_reason(url: str, why: str) -> None:
    with pytest.raises(TlsError, match="advertise-url") as e:
        validate_advertise_url(url, tls=True)
    assert why in str(e.value)


def test_an_http_advertise_url_is_refused_when_serving_tls_and_allowed_only_on_loopback_without() -> None:
    with pytest.raises(TlsError, match="serves TLS"):
        validate_advertise_url("http://127.0.0.1:7787", tls=True)
    assert validate_advertise_url("http://127.0.0.1:7787", tls=False) == "http://127.0.0.1:7787"
    assert validate_advertise_url("https://CP.Example.test:8443/", tls=True) == "https://cp.example.test:8443"
    assert validate_advertise_url("https://[2001:db8::1]:8443", tls=True) == "https://[2001:db8::1]:8443"


def test_a_bad_advertise_url_stops_the_control_plane(tmp_path: Path) -> None:
    with pytest.raises(ControlPlaneError, match="over https"):
        ControlPlane(tmp_path / "cp", port=0, advertise_url="http://cp.example.test:1").start()


# ------------------------------------------------------------------ the generated CA


def test_generated_ca_serves_https_and_the_work_secret_carries_the_advertised_url(tmp_path: Path) -> None:
    port = free_port()
    advertised = f"https://cp.fleet.test:{port}"
    with ControlPlane(tmp_path / "cp", port=port, tls=ServerTls(), advertise_url=advertised) as cp:
        assert cp.base_url == f"https://127.0.0.1:{port}" and cp.advertise_url == advertised
        tls_dir = tmp_path / "cp" / TLS_DIR
        assert cp.ca_file == tls_dir / CA_CERT_FILE
        for key in (CA_KEY_FILE, SERVER_KEY_FILE):
            assert stat.S_IMODE((tls_dir / key).stat().st_mode) == 0o600
        assert stat.S_IMODE(tls_dir.stat().st_mode) == 0o700
        cert = x509.load_pem_x509_certificate((tls_dir / SERVER_CERT_FILE).read_bytes())
        assert {"cp.fleet.test", "localhost", "127.0.0.1", "::1"} <= cert_names(cert)
        ep = read_endpoint(tmp_path / "cp")
        assert (ep.base_url, ep.advertise_url, ep.ca_file) == (cp.base_url, advertised, cp.ca_file)
        with LocalAdmin(cp.base_url, cp.admin_key, ca_file=cp.ca_file) as admin:
            sid = admin.create_session(cp.environment_id)
        with _sdk(cp.base_url, cp.environment_key, cp.ca_file) as client:
            item = client.beta.environments.work.poll(cp.environment_id, block_ms=500)
            assert item is not None and item.data.id == sid
            assert _secret(item.secret)["api_base_url"] == advertised  # type: ignore[arg-type]
        assert "sk-ant-" not in (tmp_path / "cp" / "endpoint.json").read_text()


def test_the_ca_survives_restarts_and_the_server_certificate_is_renewed_for_a_new_name(tmp_path: Path) -> None:
    sd = tmp_path / "cp"
    with ControlPlane(sd, port=0, tls=ServerTls(), advertise_url="https://one.fleet.test:1") as cp:
        ca_pem = cp.ca_file.read_bytes()  # type: ignore[union-attr]
    server_pem = (sd / TLS_DIR / SERVER_CERT_FILE).read_bytes()
    with ControlPlane(sd, port=0, tls=ServerTls(), advertise_url="https://one.fleet.test:1"):
        pass
    assert (sd / TLS_DIR / SERVER_CERT_FILE).read_bytes() == server_pem  # nothing new to name: kept
    with ControlPlane(sd, port=0, tls=ServerTls(), advertise_url="https://two.fleet.test:1") as cp:
        assert cp.ca_file.read_bytes() == ca_pem  # type: ignore[union-attr]  # workers keep their CA file
        names = cert_names(x509.load_pem_x509_certificate((sd / TLS_DIR / SERVER_CERT_FILE).read_bytes()))
        assert "two.fleet.test" in names
        with LocalAdmin(cp.base_url, cp.admin_key, ca_file=cp.ca_file) as admin:
            admin.create_session(cp.environment_id)


def test_a_generated_ca_key_readable_by_others_stops_the_start(tmp_path: Path) -> None:
    sd = tmp_path / "cp"
    with ControlPlane(sd, port=0, tls=ServerTls()):
        pass
    (sd / TLS_DIR / CA_KEY_FILE).chmod(0o644)
    with pytest.raises(ControlPlaneError, match="group/other") as e:
        ControlPlane(sd, port=0, tls=ServerTls()).start()
    assert str(sd / TLS_DIR / CA_KEY_FILE) in str(e.value)


def test_a_tls_bind_on_all_addresses_gives_local_clients_loopback_and_advertises_the_host_name(
        tmp_path: Path) -> None:
    with ControlPlane(tmp_path / "cp", host="0.0.0.0", port=0, tls=ServerTls()) as cp:
        port = cp.base_url.rsplit(":", 1)[1]
        assert cp.base_url == f"https://127.0.0.1:{port}"
        assert cp.advertise_url == f"https://{socket.gethostname()}:{port}"
        names = cert_names(x509.load_pem_x509_certificate((tmp_path / "cp" / TLS_DIR / SERVER_CERT_FILE).read_bytes()))
        assert socket.gethostname().lower() in names
        with LocalAdmin(cp.base_url, cp.admin_key, ca_file=cp.ca_file) as admin:
            admin.create_session(cp.environment_id)


# ------------------------------------------------------------------ clients that must be refused


def test_a_client_trusting_another_ca_is_refused_with_the_url_and_the_reason(tmp_path: Path) -> None:
    wrong = _other_ca(tmp_path)
    with ControlPlane(tmp_path / "cp", port=0, tls=ServerTls()) as cp:
        with pytest.raises(TlsError) as e:
            preflight(cp.base_url, client_context(wrong), ca_file=wrong)
        msg = str(e.value)
        assert cp.base_url in msg and "unable to get local issuer certificate" in msg and str(wrong) in msg
        assert "sk-ant-" not in msg
        # the SDK itself, with that CA: a connection error, never a request the server saw
        with _sdk(cp.base_url, cp.environment_key, wrong) as client:
            with pytest.raises(anthropic.APIConnectionError) as sdk_err:
                client.beta.environments.work.poll(cp.environment_id)
        assert "CERTIFICATE_VERIFY_FAILED" in repr(sdk_err.value.__cause__)
        # and with the system's roots only (no CA file): also refused
        with pytest.raises(TlsError, match="system's CA store"):
            preflight(cp.base_url, None)
        assert preflight(cp.base_url, client_context(cp.ca_file)) is None  # type: ignore[arg-type]


def test_a_certificate_for_another_name_is_refused_even_from_the_right_ca(tmp_path: Path) -> None:
    cert, key, ca = _operator_files(tmp_path, ["localhost"])
    with ControlPlane(tmp_path / "cp", port=0, tls=ServerTls(cert, key)) as cp:
        with pytest.raises(TlsError, match="IP address mismatch") as e:
            preflight(cp.base_url, client_context(ca), ca_file=ca)  # 127.0.0.1 is not in the certificate
        assert cp.base_url in str(e.value)
        assert preflight(cp.base_url.replace("127.0.0.1", "localhost"), client_context(ca)) is None


def test_plain_http_to_the_tls_port_is_told_to_use_https(tmp_path: Path) -> None:
    with ControlPlane(tmp_path / "cp", port=0, tls=ServerTls()) as cp:
        resp = httpx2.get(cp.base_url.replace("https://", "http://") + "/local/v1/health", timeout=10)
        assert resp.status_code == 400 and "HTTPS only" in resp.text
        # and the server still serves TLS clients afterwards
        with LocalAdmin(cp.base_url, cp.admin_key, ca_file=cp.ca_file) as admin:
            admin.create_session(cp.environment_id)


def test_a_connection_that_never_says_hello_does_not_hold_up_others(tmp_path: Path) -> None:
    with ControlPlane(tmp_path / "cp", port=0, tls=ServerTls()) as cp:
        host, port = "127.0.0.1", int(cp.base_url.rsplit(":", 1)[1])
        with socket.create_connection((host, port)):  # silent: its handshake waits in its own thread
            with LocalAdmin(cp.base_url, cp.admin_key, ca_file=cp.ca_file, timeout=5) as admin:
                admin.create_session(cp.environment_id)


def test_a_missing_or_empty_ca_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TlsError, match="does not exist"):
        client_context(tmp_path / "nope.pem")
    (tmp_path / "empty.pem").write_text("not a certificate\n")
    with pytest.raises(TlsError, match="empty.pem"):
        client_context(tmp_path / "empty.pem")


# ------------------------------------------------------------------ the operator's certificate


def _operator_files(tmp_path: Path, names: list[str]) -> tuple[Path, Path, Path]:
    """A CA and a server certificate made elsewhere (as an operator's PKI would), copied out as PEM files."""
    d = tmp_path / "pki"
    d.mkdir(mode=0o700)
    cert, key, ca = ensure_generated(d, names)
    out_cert, out_key = tmp_path / "cp.pem", tmp_path / "cp.key"
    out_cert.write_bytes(cert.read_bytes())
    out_key.write_bytes(key.read_bytes())
    out_key.chmod(0o600)
    return out_cert, out_key, ca


def test_the_operators_certificate_and_key_are_served(tmp_path: Path) -> None:
    cert, key, ca = _operator_files(tmp_path, ["cp.fleet.test", "127.0.0.1"])
    with ControlPlane(tmp_path / "cp", port=0, tls=ServerTls(cert, key),
                      advertise_url="https://cp.fleet.test:8443") as cp:
        assert cp.ca_file is None and not (tmp_path / "cp" / TLS_DIR).exists()
        with LocalAdmin(cp.base_url, cp.admin_key, ca_file=ca) as admin:
            admin.create_session(cp.environment_id)


def test_a_tls_key_readable_by_group_or_other_is_refused(tmp_path: Path) -> None:
    cert, key, _ = _operator_files(tmp_path, ["localhost", "127.0.0.1"])
    key.chmod(0o640)
    with pytest.raises(ControlPlaneError, match="group/other") as e:
        ControlPlane(tmp_path / "cp", port=0, tls=ServerTls(cert, key)).start()
    assert str(key) in str(e.value) and "BEGIN" not in str(e.value)
    res = CliRunner().invoke(control_plane_cmd, ["--state-dir", str(tmp_path / "cp2"), "--port", "0",
                                                 "--tls-cert", str(cert), "--tls-key", str(key)])
    assert res.exit_code == 2 and "group/other" in res.output, res.output


def test_an_operator_certificate_that_does_not_name_the_advertised_host_is_refused(tmp_path: Path) -> None:
    cert, key, _ = _operator_files(tmp_path, ["other.fleet.test"])
    with pytest.raises(ControlPlaneError, match="does not name cp.fleet.test"):
        ControlPlane(tmp_path / "cp", port=0, tls=ServerTls(cert, key),
                     advertise_url="https://cp.fleet.test:8443").start()


def test_tls_cert_without_key_and_tls_with_files_are_refused(tmp_path: Path) -> None:
    cert, key, _ = _operator_files(tmp_path, ["localhost"])
    res = CliRunner().invoke(control_plane_cmd, ["--state-dir", str(tmp_path / "cp"), "--tls-cert", str(cert)])
    assert res.exit_code == 2 and "go together" in res.output
    res = CliRunner().invoke(control_plane_cmd, ["--state-dir", str(tmp_path / "cp"), "--tls", "--tls-cert",
                                                 str(cert), "--tls-key", str(key)])
    assert res.exit_code == 2 and "do not combine" in res.output


def test_the_session_cli_finds_the_ca_through_endpoint_json(tmp_path: Path) -> None:
    with ControlPlane(tmp_path / "cp", port=0, tls=ServerTls()):
        res = CliRunner().invoke(session_group, ["new", "--state-dir", str(tmp_path / "cp")])
        assert res.exit_code == 0 and res.output.strip().startswith("session_"), res.output


def test_the_cli_prints_the_advertised_url_and_the_ca_file(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    port = free_port()
    state = tmp_path / "cp"
    proc = subprocess.Popen(
        [sys.executable, "-c", "from sandbox.controlplane.cli import control_plane_cmd; control_plane_cmd()",
         "--state-dir", str(state), "--port", str(port), "--tls", "--advertise-url", f"https://localhost:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        lines = [proc.stdout.readline() for _ in range(7)]  # type: ignore[union-attr]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    assert lines[0].split()[-1] == f"https://127.0.0.1:{port}"
    assert f"https://localhost:{port}" in lines[5] and "--base-url" in lines[5]
    assert str(state / TLS_DIR / CA_CERT_FILE) in lines[6] and "--ca-file" in lines[6]
    assert "sk-ant-" not in "".join(lines) + out + err and "PRIVATE KEY" not in "".join(lines) + out + err
