"""The audit's egress L7 rows, judged on the host: secrets, trust store, SNI pinning.

``inside.egress_secrets``: the host reads each configured credential as the sandbox's owner
does (:func:`sandbox.egress.credentials.read_source`) and computes salted, truncated SHA-256
digests of the secret and of the forms the proxy sends (its header value, the header line,
Basic and plain base64). The probe gets only the random salt, never a secret nor a digest
of one: it reports the same digests of everything the sandbox can read (every readable
process environment and command line, files under the writable paths and
/run/sandbox-egress, bounded) and the host intersects. Evidence names the credential, the
form and the place, never a value. A secret is found as a whole line, a whole
environment value, the value after ``=``/``:``, or a token between whitespace or
punctuation; a secret embedded in a longer token together with other characters is not
(documented limit).

``inside.egress_trust_store``: certificates (by SHA-256) in every bundle a CA variable names
and in /run/sandbox-egress, against the host's roots (the ones the daemon writes) plus the
session CA from the session's host directory (the bind mount's source); the CA's own
fields (CA, path length 0, critical name constraints equal to exactly the terminated hosts)
from the host copy whose digest the sandbox's copy must equal; any PEM private key the
probe finds is loaded against the CA certificate inside (only the CA's own key loads).

``inside.egress_sni``: configuration (every TLS-port rule pins the SNI) and, for rules
whose host the daemon reaches on this machine only (a loopback literal, or a hosts-file
name that maps to loopback), a live probe through the sandbox's proxy: CONNECT, then a
ClientHello naming another host; the proxy's own audit record for the session must say
``sni-mismatch``. The proxy connects to the upstream before it reads the ClientHello, so a
rule whose host lies off this machine is never probed live (the audit sends no packet off
the machine): for those, the row rests on the configuration and says so.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import secrets as _secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox.audit.catalog import result
from sandbox.audit.model import CheckResult

EGRESS_IDS = ("inside.egress_secrets", "inside.egress_trust_store", "inside.egress_sni")
WRONG_SNI = "sni-audit.invalid"  # .invalid (RFC 6761): never a real host
MAX_SNI_TARGETS = 4
DIGEST_BYTES = 8
TOKEN_MIN, TOKEN_MAX = 4, 16384  # probe_script.TOKEN_MIN/MAX: shorter or longer candidates are not reported


def digest(salt: bytes, token: bytes) -> bytes:
    """What the probe computes per token (probe_script._Digests)."""
    return hashlib.sha256(salt + token).digest()[:DIGEST_BYTES]


def _b64_forms(raw: str) -> list[str]:
    b = base64.b64encode(raw.encode()).decode("ascii")
    return [b, b.rstrip("=")]


def secret_forms(policy_egress: Any, name: str, secret: str) -> dict[str, str]:
    """form label -> text, for one credential: the secret and what the proxy makes of it."""
    from sandbox.egress.credentials import header_value

    forms: dict[str, str] = {"the secret": secret}
    for b in _b64_forms(secret):
        forms.setdefault(f"its base64 ({'padded' if b.endswith('=') else 'unpadded'})", b)
    for r in policy_egress.rules:
        c = r.credential
        if c is None or c.name != name:
            continue
        value = header_value(c, secret)
        forms.setdefault(f"its {c.header} value", value)
        forms.setdefault(f"its {c.header} header line", f"{c.header}: {value}")
        if c.basic_user is not None:
            for b in _b64_forms(f"{c.basic_user}:{secret}"):
                forms.setdefault("its Basic user:secret base64", b)
    return forms


@dataclass
class EgressExpect:
    """What the host knows before the probe runs. Holds digests of the secrets, never values."""

    salt: bytes
    forms: dict[bytes, tuple[str, str]] = field(default_factory=dict)  # digest -> (credential, form)
    credentials: list[str] = field(default_factory=list)
    unread: dict[str, str] = field(default_factory=dict)  # credential -> why the host could not read it
    short: list[str] = field(default_factory=list)  # forms outside the probe's token lengths: not searched
    host_dir: str | None = None
    ca_pem: bytes | None = None
    ca_error: str | None = None
    roots: frozenset[str] = frozenset()
    terminated: frozenset[str] = frozenset()
    sni_targets: list[tuple[str, int, str]] = field(default_factory=list)  # (host, port, rule label)
    sni_offline: list[str] = field(default_factory=list)  # rule labels not probed live
    sni_config: list[tuple[str, str]] = field(default_factory=list)  # (status, text)
    tls_rules: int = 0
    records: list[dict[str, Any]] | None = None
    records_error: str | None = None
    session: str | None = None

    @property
    def audit_path(self) -> Path | None:
        """The daemon's audit.jsonl: the session dir is <state>/sessions/<token>."""
        return Path(self.host_dir).parent.parent / "audit.jsonl" if self.host_dir else None

    def load_records(self) -> None:
        from sandbox.egress.audit import read_records

        path = self.audit_path
        if path is None or self.session is None:
            self.records_error = "no session directory or session id known"
            return
        try:
            self.records = read_records(path, session=self.session, limit=500)
        except OSError as e:
            self.records_error = f"cannot read the proxy's records ({type(e).__name__})"


def egress_mount_source(attrs: dict[str, Any]) -> str | None:
    from sandbox.spec import EGRESS_MOUNT

    for m in attrs.get("Mounts") or []:
        if m.get("Destination") == EGRESS_MOUNT:
            return str(m.get("Source") or "") or None
    return None


def _cert_digests(pem: bytes) -> list[str]:
    out = []
    for block in pem.split(b"-----BEGIN CERTIFICATE-----")[1:]:
        body = block.split(b"-----END CERTIFICATE-----", 1)[0]
        try:
            out.append(hashlib.sha256(binascii.a2b_base64(body)).hexdigest())
        except (binascii.Error, ValueError):
            continue
    return out


def _is_local(host: str) -> bool:
    """Does the daemon reach ``host`` on this machine without a DNS query? (resolve.py reads the
    hosts file first.)"""
    from sandbox.egress.hosts import is_ip_literal
    from sandbox.egress.resolve import hosts_file_addrs

    if is_ip_literal(host):
        addrs = [host.strip("[]")]
    else:
        addrs = hosts_file_addrs(host)
    if not addrs:
        return False
    try:
        return all(ipaddress.ip_address(a.split("%", 1)[0]).is_loopback for a in addrs)
    except ValueError:
        return False


def prepare(policy: Any, attrs: dict[str, Any], session: str | None, env: Any = None) -> EgressExpect | None:
    """The host's side, before the probe: None when the policy allows no egress."""
    from sandbox.egress.credentials import CredentialError, read_source
    from sandbox.egress.mitm import CA_FILE, host_roots

    eg = getattr(policy, "egress", None)
    if eg is None or not eg.enabled:
        return None
    exp = EgressExpect(salt=_secrets.token_bytes(16), session=session, host_dir=egress_mount_source(attrs))
    for name in sorted(eg.credentials):
        exp.credentials.append(name)
        try:
            secret = read_source(name, eg.credentials[name], env)
        except CredentialError as e:
            exp.unread[name] = str(e)  # names the credential and its source, never a value
            continue
        for label, text in secret_forms(eg, name, secret).items():
            if TOKEN_MIN <= len(text) <= TOKEN_MAX:
                exp.forms.setdefault(digest(exp.salt, text.encode()), (name, label))
            else:
                exp.short.append(f"{name} ({label})")
        del secret
    exp.roots = frozenset(_cert_digests(host_roots()))
    exp.terminated = frozenset(r.host for r in eg.rules if r.terminates)
    if exp.host_dir is None:
        exp.ca_error = "no /run/sandbox-egress mount found on the container"
    else:
        try:
            exp.ca_pem = (Path(exp.host_dir) / CA_FILE).read_bytes()
        except OSError as e:
            exp.ca_error = f"cannot read the session's {CA_FILE} on the host ({e.strerror or type(e).__name__})"
    for r in eg.rules:
        ports = sorted(r.tls_port_set)
        if not ports:
            continue
        exp.tls_rules += 1
        if r.sni == "off":
            exp.sni_config.append(("fail", f"{r.label()}: sni off, the ClientHello is NOT checked"))
        elif r.allow_ech:
            exp.sni_config.append(("warn", f"{r.label()}: ECH allowed, the real name is hidden behind the outer SNI"))
        elif r.sni == "allow-missing":
            exp.sni_config.append(("note", f"{r.label()}: a missing SNI is allowed (a wrong one is not)"))
        if r.host.startswith("*.") or not _is_local(r.host):
            exp.sni_offline.append(r.label())
        elif len(exp.sni_targets) < MAX_SNI_TARGETS:
            exp.sni_targets.append((r.host, ports[0], r.label()))
        else:
            exp.sni_offline.append(r.label())
    return exp


def probe_section(exp: EgressExpect, scan_roots: list[str]) -> dict[str, Any]:
    """The probe's ``egress`` config: the salt and where to look; no secret, no digest of one."""
    from sandbox.egress.manager import CA_ENV_VARS
    from sandbox.egress.mitm import BUNDLE_FILE, CA_FILE
    from sandbox.spec import EGRESS_MOUNT

    # The session dir is mode 0711 (the sandbox cannot list it): its known files are named.
    known = [f"{EGRESS_MOUNT}/{BUNDLE_FILE}", f"{EGRESS_MOUNT}/{CA_FILE}"]
    return {"salt": exp.salt.hex(), "scan_roots": sorted(set(scan_roots) | {EGRESS_MOUNT, *known}),
            "max_files": 3000, "max_file_bytes": 1 << 20, "max_total_bytes": 64 << 20, "max_tokens": 150000,
            "ca_vars": list(CA_ENV_VARS), "bundle_paths": [f"{EGRESS_MOUNT}/{BUNDLE_FILE}", f"{EGRESS_MOUNT}/{CA_FILE}"],
            "ca_file": f"{EGRESS_MOUNT}/{CA_FILE}", "proxy": ["127.0.0.1", 3128], "wrong_sni": WRONG_SNI,
            "sni": [{"host": h, "port": p} for h, p, _ in exp.sni_targets], "timeout": 10}


# ---------------------------------------------------------------- judging

def _d(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _l(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def _few(items: list[str], n: int = 5) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def evaluate(section: Any, exp: EgressExpect | None, *, no_egress_reason: str = "the policy allows no egress"
             ) -> list[CheckResult]:
    if exp is None:
        return [result(i, "info", f"not applicable: {no_egress_reason} (no proxy, no credential, no CA bundle)")
                for i in EGRESS_IDS]
    p = _d(section)
    if not p.get("configured"):
        return [result(i, "fail", "the probe reported no egress scan") for i in EGRESS_IDS]
    return [_secrets_row(p, exp), _trust_row(p, exp), _sni_row(p, exp)]


def _secrets_row(p: dict[str, Any], exp: EgressExpect) -> CheckResult:
    rid = "inside.egress_secrets"
    if not exp.credentials:
        return result(rid, "info", "the policy configures no credential (egress.credentials is empty): nothing to find")
    hits: dict[str, list[str]] = {}
    for src in _l(p.get("sources")):
        src = _d(src)
        try:
            blob = base64.b64decode(str(src.get("d", "")), validate=True)
        except (binascii.Error, ValueError):
            return result(rid, "fail", "unreadable probe output (digest list)")
        where = str(src.get("where", "?"))[:200]
        for i in range(0, len(blob) - DIGEST_BYTES + 1, DIGEST_BYTES):
            hit = exp.forms.get(blob[i:i + DIGEST_BYTES])
            if hit is not None:
                hits.setdefault(hit[0], []).append(f"{hit[1]} in {where}")
    files, procs = p.get("files"), p.get("processes")
    scope = (f"{len(_l(p.get('sources')))} sources from {procs} processes (environment, command line) and "
             f"{files} files under the writable paths and /run/sandbox-egress")
    limits = [x for x, on in (("file count", p.get("files_truncated")), ("token budget", p.get("tokens_truncated")),
                              (f"{len(_l(p.get('read_partly')))} files read in part", _l(p.get("read_partly"))))
              if on]
    if limits:
        scope += "; the scan stopped at its bounds: " + ", ".join(limits)
    if exp.short:
        scope += f"; not searchable (under {TOKEN_MIN} characters): {_few(exp.short, 3)}"
    unreadable = _l(p.get("environ_unreadable"))
    if unreadable:
        scope += f"; {len(unreadable)} environments unreadable to the sandbox ({_few([str(u) for u in unreadable], 3)})"
    if hits:
        return result(rid, "fail", "READABLE in the sandbox: " + "; ".join(
            f"credential {n}: {_few(sorted(set(w)), 3)}" for n, w in sorted(hits.items())) + f" ({scope})")
    if exp.unread:
        return result(rid, "fail", "the host could not read " + "; ".join(exp.unread.values())
                      + f" to compare; the others ({_few(sorted(set(exp.credentials) - set(exp.unread)))}) "
                      f"were not found ({scope})")
    if not isinstance(files, int) or not isinstance(procs, int) or procs < 1:
        return result(rid, "fail", "the probe scanned nothing")
    return result(rid, "warn" if limits or exp.short else "pass",
                  f"{len(exp.credentials)} credential(s) ({_few(exp.credentials)}) in none of their "
                  f"forms (secret, header value and line, base64) in {scope}")


def _ca_facts(pem: bytes, terminated: frozenset[str]) -> tuple[list[str], str]:
    """Problems with the session CA certificate, and a description of it."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return ["the session's ca.pem is not a certificate"], "?"
    bad = []
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        if not (bc.critical and bc.value.ca and bc.value.path_length == 0):
            bad.append("BasicConstraints not critical CA with path length 0")
    except x509.ExtensionNotFound:
        bad.append("no BasicConstraints")
    try:
        nc = cert.extensions.get_extension_for_class(x509.NameConstraints)
    except x509.ExtensionNotFound:
        return bad + ["NOT name-constrained"], "no name constraints"
    names = set()
    for gn in nc.value.permitted_subtrees or []:
        v = gn.value
        if isinstance(v, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            names.add(str(v.network_address) if v.num_addresses == 1 else str(v))
        else:
            names.add(str(v))
    want = {str(ipaddress.ip_address(h.strip("[]"))) if _ip(h) else h for h in terminated}
    if not nc.critical:
        bad.append("name constraints not critical")
    if names != want:
        extra, missing = sorted(names - want), sorted(want - names)
        bad.append("name constraints differ from the terminated hosts"
                   + (f" (also permits {_few(extra)})" if extra else "") + (f" (misses {_few(missing)})" if missing else ""))
    return bad, f"CA \"{cert.subject.rfc4514_string()[:80]}\" constrained to {_few(sorted(names))}"


def _ip(h: str) -> bool:
    try:
        ipaddress.ip_address(h.strip("[]"))
        return True
    except ValueError:
        return False


def _trust_row(p: dict[str, Any], exp: EgressExpect) -> CheckResult:
    from sandbox.egress.manager import CA_BUNDLE, CA_ENV_VARS
    from sandbox.egress.mitm import CA_FILE
    from sandbox.spec import EGRESS_MOUNT

    rid = "inside.egress_trust_store"
    trust = _d(p.get("trust"))
    files = {str(k): _d(v) for k, v in _d(trust.get("files")).items()}
    env = {str(k): v for k, v in _d(trust.get("env")).items()}
    bad: list[str] = []
    notes: list[str] = []
    if exp.ca_error:
        bad.append(exp.ca_error)
    ca_digests = _cert_digests(exp.ca_pem or b"")
    if exp.terminated:
        if not ca_digests:
            bad.append(f"the policy terminates {_few(sorted(exp.terminated))} but the session has no CA")
        else:
            problems, desc = _ca_facts(exp.ca_pem or b"", exp.terminated)
            bad += problems
            notes.append(desc)
    elif ca_digests:
        bad.append("a session CA exists although the policy terminates no host")
    allowed = set(exp.roots) | set(ca_digests)
    pointed = {v for k, v in env.items() if isinstance(v, str) and v}
    off = sorted(f"{k}={'unset' if not v else str(v)[:80]}" for k, v in env.items() if v != CA_BUNDLE)
    if off:
        notes.append(f"CA variables not pointing at {CA_BUNDLE}: {_few(off, 4)}")
    if not env or set(env) != set(CA_ENV_VARS):
        bad.append("the probe did not report the CA variables")
    for path in sorted(set(files) | pointed):
        f = files.get(path)
        if f is None:
            bad.append(f"{path}: not read by the probe")
            continue
        if "error" in f:
            if path in pointed or path == CA_BUNDLE:
                bad.append(f"{path}: {str(f['error'])[:30]} (a CA variable names it)")
            continue
        certs = [str(c) for c in _l(f.get("certs"))]
        extra = sorted({c for c in certs if c not in allowed})
        if extra:
            bad.append(f"{path} trusts {len(extra)} certificate(s) that are neither the host's roots nor the session CA "
                       f"(sha256 {_few([c[:16] for c in extra], 3)})")
        if f.get("other_blocks") or f.get("unparsable"):
            bad.append(f"{path} holds {f.get('other_blocks') or 0} non-certificate PEM block(s) and "
                       f"{f.get('unparsable') or 0} unparsable one(s)")
        if path == CA_BUNDLE:
            if ca_digests and not set(ca_digests) <= set(certs):
                bad.append(f"{path} lacks the session CA")
            missing = len(exp.roots - set(certs))
            notes.append(f"{path}: {len(certs)} certificates = session CA {'yes' if set(ca_digests) & set(certs) else 'no'}"
                         f" + {len(set(certs) & exp.roots)} host roots" + (f" ({missing} host roots absent)" if missing else ""))
        if path == f"{EGRESS_MOUNT}/{CA_FILE}" and sorted(set(certs)) != sorted(set(ca_digests)):
            bad.append(f"{path} is not exactly the session CA")
    keys = [_d(k) for k in _l(p.get("private_keys"))]
    leaked = [str(k.get("path"))[:120] for k in keys if k.get("ca") == "MATCHES"]
    in_mount = [str(k.get("path"))[:120] for k in keys if str(k.get("path", "")).startswith(EGRESS_MOUNT + "/")]
    if leaked:
        bad.append(f"the session CA's PRIVATE KEY is readable at {_few(leaked, 3)}")
    if in_mount and not leaked:
        bad.append(f"a private key lies in {EGRESS_MOUNT}: {_few(in_mount, 3)}")
    notes.append(f"{len(keys)} other PEM private key(s) under the scanned paths, none the CA's" if keys and not leaked
                 else "no PEM private key under the scanned paths")
    if bad:
        return result(rid, "fail", "; ".join(bad) + " (" + "; ".join(notes) + ")")
    return result(rid, "pass", "; ".join(notes))


def _sni_row(p: dict[str, Any], exp: EgressExpect) -> CheckResult:
    rid = "inside.egress_sni"
    if exp.tls_rules == 0:
        return result(rid, "info", "no rule carries TLS ports: no tunnel to pin")
    bad = [t for s, t in exp.sni_config if s == "fail"]
    warn = [t for s, t in exp.sni_config if s == "warn"]
    notes = [t for s, t in exp.sni_config if s == "note"]
    live: list[str] = []
    refused_live = 0
    inconclusive: list[str] = []
    recs = [r for r in (exp.records or []) if isinstance(r, dict)]
    probed = {(str(_d(x).get("host")), _d(x).get("port")): _d(x) for x in _l(p.get("sni"))}
    for host, port, label in exp.sni_targets:
        got = probed.get((host, port))
        if got is None:
            inconclusive.append(f"{label}: not probed")
            continue
        wrong, right = _d(got.get("wrong")), _d(got.get("right"))
        if not str(wrong.get("connect", "")).startswith("HTTP/1.1 200"):
            inconclusive.append(f"{label}: CONNECT {host}:{port} got {str(wrong.get('connect') or wrong)[:60]}")
            continue
        rec = [r for r in recs if r.get("host") == host and r.get("port") == port and r.get("sni") == WRONG_SNI]
        codes = sorted({str(r.get("code")) for r in rec})
        answer = str(wrong.get("answer"))
        ctrl = f"control with SNI {host}: {str(right.get('answer') or right.get('connect') or right)[:40]}"
        if answer == "handshake":
            bad.append(f"{label}: a ClientHello naming {WRONG_SNI} got a TLS handshake through the tunnel "
                       f"(proxy record: {_few(codes) or 'none'}; {ctrl})")
        elif "sni-mismatch" in codes and answer in ("alert", "closed"):
            refused_live += 1
            alert = f" (TLS alert {wrong.get('alert')})" if answer == "alert" else ""
            live.append(f"{label}: SNI {WRONG_SNI} refused{alert}, proxy record sni-mismatch; {ctrl}")
        elif exp.records is None:
            inconclusive.append(f"{label}: answer {answer}, but the proxy's records could not be read "
                                f"({exp.records_error})")
        else:
            bad.append(f"{label}: SNI {WRONG_SNI} answered {answer}, proxy record {_few(codes) or 'none'} "
                       f"(not sni-mismatch); {ctrl}")
    offline = (f"not probed live (the proxy connects upstream before it reads the ClientHello, and the audit sends "
               f"nothing off this machine): {_few(exp.sni_offline, 4)}") if exp.sni_offline else ""
    parts = bad + warn + live + inconclusive + notes + ([offline] if offline else [])
    obs = "; ".join(parts)
    if bad:
        return result(rid, "fail", obs)
    if warn:
        return result(rid, "warn", obs)
    if inconclusive:
        return result(rid, "warn", "inconclusive: " + obs)
    if refused_live:
        return result(rid, "pass", obs)
    return result(rid, "info", f"all {exp.tls_rules} TLS-port rule(s) pin the SNI by configuration; " + obs)
