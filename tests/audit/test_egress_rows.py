"""The audit's egress L7 rows (issue 12) on real sandboxes: `inside.egress_secrets` (no configured
secret readable inside), `inside.egress_trust_store` (host roots plus the name-constrained session
CA, the CA's key nowhere inside) and `inside.egress_sni` (a ClientHello naming another host than
the CONNECT target is refused). Each passes on a sandbox set up like
tests/sandbox_egress/test_sandbox_credentials.py (the real daemon, a loopback HTTPS upstream with a
test CA) and fails on a deliberately broken one. Loopback only: the SNI probe is run only
against hosts the test serves on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from sandbox.audit import egress
from sandbox.audit import probe_script as probe
from sandbox.audit.catalog import INSIDE_IDS
from sandbox.audit.checks import Expectations, evaluate_inside
from sandbox.audit.runner import audit_egress, audit_policy
from sandbox.policy import policy_from_dict
from tests.egress.tls_helpers import TestCA, TlsTarget

SECRET = f"ghp_AUDITSECRET{uuid.uuid4().hex}"
ENV = "SANDBOX_TEST_AUDIT_TOKEN"
LOOPBACK = {"egress.allow_cidrs.127.0.0.0/8": "test upstream listens on loopback"}


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[tuple[TlsTarget, Path]]:
    ca = TestCA()
    t = TlsTarget("127.0.0.1", ca, ["localhost"], tmp_path).start()
    yield t, ca.write(tmp_path / "upstream-ca.pem")
    t.close()


def cred_policy(t: TlsTarget, ca_file: Path, *, env: dict[str, str] | None = None, basic: bool = False) -> dict:
    cred = {"name": "gh", "basic_user": "audit-bot"} if basic else {"name": "gh", "format": "Bearer {secret}"}
    return {
        "name": f"audit-cred-{t.port}",
        "env": env or {},
        "egress": {
            "rules": [{"host": "localhost", "ports": [t.port], "tls_ports": [t.port], "upstream_ca": str(ca_file),
                       "credential": cred}],
            "allow_cidrs": ["127.0.0.0/8"],
            "credentials": {"gh": {"env": ENV}},
        },
        "unsafe": {**LOOPBACK, "egress.upstream_ca.localhost": "the test upstream has a test CA"},
    }


def rows_of(sb, docker_client) -> dict[str, object]:
    rows = {r.id: r for r in audit_egress(sb, docker_client)}
    assert set(rows) == set(egress.EGRESS_IDS)
    for r in rows.values():  # evidence names credentials, never a value or a form of it
        assert SECRET not in r.observed and SECRET[8:20] not in r.observed, r
    return rows


def session_dir(docker_client, sb) -> Path:
    src = egress.egress_mount_source(docker_client.api.inspect_container(sb.id))
    assert src
    return Path(src)


# ---------------------------------------------------------------- no Docker: the design's invariants

def test_the_probe_gets_a_salt_never_the_secret_nor_a_digest_of_it(monkeypatch: pytest.MonkeyPatch, upstream) -> None:
    t, ca_file = upstream
    pol = policy_from_dict(cred_policy(t, ca_file, basic=True))
    monkeypatch.setenv(ENV, SECRET)
    exp = egress.prepare(pol, {"Mounts": []}, "s1")
    assert exp is not None and exp.credentials == ["gh"] and not exp.unread
    cfg = json.dumps(egress.probe_section(exp, ["/workspace"]))
    assert SECRET not in cfg and base64.b64encode(SECRET.encode()).decode()[:20] not in cfg
    for d in exp.forms:
        assert d.hex() not in cfg and base64.b64encode(d).decode().rstrip("=") not in cfg
    assert {label for name, label in exp.forms.values()} >= {"the secret", "its Authorization value",
                                                              "its Basic user:secret base64"}
    # The probe's digests of what it reads meet the host's digests of the forms.
    basic = base64.b64encode(f"audit-bot:{SECRET}".encode()).decode()
    for text in (f'{{"token": "{SECRET}"}}', f"export GH={SECRET}", f"https://x:{SECRET}@h/p?t=1",
                 f"Authorization: Basic {basic}", f"auth={basic.rstrip('=')}"):
        seen = {probe.hashlib.sha256(exp.salt + tok).digest()[:8] for tok in probe._tokens(text.encode())}
        assert seen & set(exp.forms), text
    assert exp.records is None and exp.sni_targets == [("localhost", t.port, f"localhost:{t.port}")]


def test_an_unreadable_credential_fails_the_row_naming_it_not_passing_silently(upstream) -> None:
    t, ca_file = upstream
    pol = policy_from_dict(cred_policy(t, ca_file))
    exp = egress.prepare(pol, {"Mounts": []}, "s1", env={})
    assert exp is not None and "gh" in exp.unread and ENV in exp.unread["gh"]
    row = egress.evaluate({"configured": True, "sources": [], "files": 0, "processes": 3}, exp)[0]
    assert row.status == "fail" and "could not read" in row.observed and "gh" in row.observed


def test_without_egress_the_rows_are_info_not_pass_and_a_missing_scan_never_passes() -> None:
    rows = evaluate_inside({"egress": {"configured": False}}, Expectations(), only=egress.EGRESS_IDS)
    assert [r.status for r in rows] == ["info"] * 3 and all("no egress" in r.observed for r in rows)
    assert set(egress.EGRESS_IDS) <= set(INSIDE_IDS)
    exp = egress.EgressExpect(salt=b"s" * 16, credentials=["gh"], tls_rules=1)
    for section in (None, {}, {"configured": False}, {"configured": True, "sources": "junk"}):
        rows = egress.evaluate(section, exp)
        assert all(r.status != "pass" for r in rows), (section, rows)
    # A scan that stopped at its bounds says so and does not pass.
    row = egress.evaluate({"configured": True, "sources": [], "files": 3000, "processes": 2,
                           "files_truncated": True}, exp)[0]
    assert row.status == "warn" and "stopped at its bounds" in row.observed
    assert (probe.TOKEN_MIN, probe.TOKEN_MAX) == (egress.TOKEN_MIN, egress.TOKEN_MAX)


# ---------------------------------------------------------------- real sandboxes

@pytest.fixture
def cred_sb(make_sandbox, upstream, monkeypatch: pytest.MonkeyPatch):
    t, ca_file = upstream
    monkeypatch.setenv(ENV, SECRET)  # the owner's environment, not the sandbox's
    return make_sandbox(cred_policy(t, ca_file))


@pytest.mark.docker
@pytest.mark.timeout(180)
def test_the_three_rows_pass_on_a_sandbox_whose_proxy_injects_a_credential(cred_sb, upstream, docker_client) -> None:
    t, _ = upstream
    r = cred_sb.exec(["curl", "-sS", "--noproxy", "", "-m", "20", f"https://localhost:{t.port}/warm"], timeout=60)
    assert r.exit_code == 0 and t.requests[0].header("authorization") == [f"Bearer {SECRET}"], r  # in use
    rows = rows_of(cred_sb, docker_client)
    assert {i: r.status for i, r in rows.items()} == dict.fromkeys(egress.EGRESS_IDS, "pass"), rows
    assert "credential(s) (gh)" in rows["inside.egress_secrets"].observed
    assert "files under" in rows["inside.egress_secrets"].observed
    trust = rows["inside.egress_trust_store"].observed
    assert "constrained to localhost" in trust and "session CA yes" in trust
    sni = rows["inside.egress_sni"].observed
    assert "refused" in sni and "sni-mismatch" in sni and "control with SNI localhost: handshake" in sni
    assert t.requests[1:] == [], "a refused ClientHello reaches no upstream; the control was terminated by the proxy"


@pytest.mark.docker
@pytest.mark.timeout(180)
def test_a_secret_in_the_sandbox_environment_fails_egress_secrets(make_sandbox, upstream, docker_client,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    t, ca_file = upstream
    monkeypatch.setenv(ENV, SECRET)
    # The policy refuses ANTHROPIC_* names, not arbitrary ones: a name that looks harmless.
    sb = make_sandbox(cred_policy(t, ca_file, env={"GH_CONFIG_DIR_HINT": SECRET}))
    row = rows_of(sb, docker_client)["inside.egress_secrets"]
    assert row.status == "fail", row
    assert "credential gh: the secret in pid" in row.observed and "environ GH_CONFIG_DIR_HINT" in row.observed


@pytest.mark.docker
@pytest.mark.timeout(180)
def test_a_basic_header_left_in_a_workspace_file_fails_egress_secrets(make_sandbox, upstream, docker_client,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    t, ca_file = upstream
    monkeypatch.setenv(ENV, SECRET)
    sb = make_sandbox(cred_policy(t, ca_file, basic=True))
    assert rows_of(sb, docker_client)["inside.egress_secrets"].status == "pass"
    basic = base64.b64encode(f"audit-bot:{SECRET}".encode()).decode()
    # What a leak would look like: a captured request header in a log file of the workspace.
    r = sb.exec(["sh", "-c", f"mkdir -p ~/logs && printf 'GET / HTTP/1.1\\r\\nAuthorization: Basic {basic}\\r\\n' > ~/logs/req.txt"])
    assert r.exit_code == 0, r
    row = rows_of(sb, docker_client)["inside.egress_secrets"]
    assert row.status == "fail" and "credential gh:" in row.observed and "/logs/req.txt" in row.observed, row
    assert "Basic" in row.observed or "Authorization" in row.observed


@pytest.mark.docker
@pytest.mark.timeout(180)
def test_a_bundle_with_an_extra_ca_fails_egress_trust_store(cred_sb, docker_client) -> None:
    bundle = session_dir(docker_client, cred_sb) / "ca-bundle.pem"
    bundle.write_bytes(bundle.read_bytes() + TestCA("an extra CA slipped in").pem)  # the host side: root writes it
    row = rows_of(cred_sb, docker_client)["inside.egress_trust_store"]
    assert row.status == "fail" and "trusts 1 certificate(s) that are neither" in row.observed, row


@pytest.mark.docker
@pytest.mark.timeout(180)
def test_a_ca_whose_key_is_inside_and_unconstrained_fails_egress_trust_store(cred_sb, docker_client) -> None:
    d = session_dir(docker_client, cred_sb)
    rogue = TestCA("rogue session CA")  # no name constraints, and we hold its key
    bundle = d / "ca-bundle.pem"
    text = bundle.read_bytes()
    old_ca = (d / "ca.pem").read_bytes()
    bundle.write_bytes(text.replace(old_ca, rogue.pem))
    (d / "ca.pem").write_bytes(rogue.pem)
    key = rogue.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()).decode()
    other = TestCA("unrelated").key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()).decode()
    r = cred_sb.exec(["sh", "-c", f"printf '%s' '{other}' > ~/unrelated.key && printf '%s' '{key}' > /tmp/ca.key"])
    assert r.exit_code == 0, r
    row = rows_of(cred_sb, docker_client)["inside.egress_trust_store"]
    assert row.status == "fail", row
    assert "PRIVATE KEY is readable at /tmp/ca.key" in row.observed and "unrelated.key" not in row.observed
    assert "NOT name-constrained" in row.observed


@pytest.mark.docker
@pytest.mark.timeout(180)
def test_sni_off_fails_egress_sni_and_the_probe_sees_the_upstream_answer(make_sandbox, upstream, docker_client,
                                                                         runtime) -> None:
    t, _ = upstream
    sb = make_sandbox({"name": f"audit-sni-off-{t.port}",
                       "egress": {"rules": [{"host": "localhost", "ports": [t.port], "tls_ports": [t.port], "sni": "off"}],
                                  "allow_cidrs": ["127.0.0.0/8"]},
                       "unsafe": {**LOOPBACK, "egress.sni_off.localhost": "testing that the audit catches it"}})
    row = rows_of(sb, docker_client)["inside.egress_sni"]
    assert row.status == "fail", row
    assert "sni off" in row.observed and "got a TLS handshake through the tunnel" in row.observed, row
    # Pinned, the same tunnel passes: the refusal is seen live and in the proxy's own record. A host
    # off this machine is never tried (the proxy would connect to it before reading the hello).
    pinned = make_sandbox({"name": f"audit-sni-pin-{t.port}",
                           "egress": {"rules": [{"host": "localhost", "ports": [t.port], "tls_ports": [t.port]},
                                                {"host": "example.com", "ports": [443]}],
                                      "allow_cidrs": ["127.0.0.0/8"]},
                           "unsafe": LOOPBACK})
    rows = rows_of(pinned, docker_client)
    assert rows["inside.egress_sni"].status == "pass", rows["inside.egress_sni"]
    assert "not probed live" in rows["inside.egress_sni"].observed and "example.com:443" in rows["inside.egress_sni"].observed
    recs = runtime.egress.records(session=pinned.session_id, limit=1000)
    assert {r.get("sni") for r in recs if r.get("host") == "localhost"} == {egress.WRONG_SNI, "localhost"}
    assert not [r for r in recs if r.get("host") == "example.com"], "the audit tried a host off this machine"
    assert rows["inside.egress_secrets"].status == "info" and rows["inside.egress_trust_store"].status == "pass"
    assert "session CA no" in rows["inside.egress_trust_store"].observed  # nothing terminated: roots only


@pytest.mark.docker
@pytest.mark.timeout(300)
def test_a_full_profile_audit_carries_the_egress_rows(runtime, upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    t, ca_file = upstream
    monkeypatch.setenv(ENV, SECRET)
    report = audit_policy(policy_from_dict(cred_policy(t, ca_file)), runtime, fork_test=False)
    rows = report.by_id()
    assert {i: rows[i].status for i in egress.EGRESS_IDS} == dict.fromkeys(egress.EGRESS_IDS, "pass"), \
        {i: rows[i].observed for i in egress.EGRESS_IDS}
    assert SECRET not in json.dumps(report.to_dict())
