"""Policy models: strict, canonical at load, and refusing rules broader than meant."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from sandbox.egress.rules import EgressPolicy, EgressRule


def test_hosts_are_canonicalised_at_load() -> None:
    assert EgressRule(host="PyPI.org.", ports=[443]).host == "pypi.org"
    assert EgressRule(host="*.Example.COM", ports=[443]).host == "*.example.com"
    assert EgressRule(host="bücher.test", ports=[443]).host == "xn--bcher-kva.test"
    assert EgressRule(host="[::1]", ports=[1]).host == "::1"


@pytest.mark.parametrize("host", ["*.com", "*", "**.example.com", "ex*ample.com", "*.127.0.0.1", "a b.com", "http://x.com", "x.com:443", "user@x.com", ""])
def test_bad_or_too_broad_hosts_are_load_errors(host: str) -> None:
    with pytest.raises(ValidationError):
        EgressRule(host=host, ports=[443])


@pytest.mark.parametrize("ports", [[], [0], [65536], [-1]])
def test_ports_must_be_given_and_valid(ports: list[int]) -> None:
    with pytest.raises(ValidationError):
        EgressRule(host="x.com", ports=ports)


def test_unknown_keys_are_errors() -> None:
    with pytest.raises(ValidationError):
        EgressPolicy.model_validate({"rules": [], "allow_all": True})
    with pytest.raises(ValidationError):
        EgressRule.model_validate({"host": "x.com", "ports": [1], "scheme": "https"})


@pytest.mark.parametrize("cidr", ["0.0.0.0/0", "::/0", "10.0.0.1/8", "not-a-net", "::ffff:0:0/96", "10.0.0.0/7"])
def test_bad_or_too_broad_cidrs_are_load_errors(cidr: str) -> None:
    with pytest.raises(ValidationError):
        EgressPolicy(allow_cidrs=[cidr])


def test_enabled_only_with_rules_or_cidrs() -> None:
    assert not EgressPolicy().enabled
    assert EgressPolicy(rules=[EgressRule(host="x.com", ports=[443])]).enabled
    assert EgressPolicy(allow_cidrs=["10.0.0.0/8"]).enabled


def test_models_are_frozen() -> None:
    p = EgressPolicy()
    with pytest.raises(ValidationError):
        p.max_connections = 5  # type: ignore[misc]


# ------------------------------------------------------------ termination, credentials, http rules

def _cred_policy(**rule: object) -> dict:
    base = {"host": "api.example.com", "ports": [443], "credential": {"name": "gh"}}
    return {"rules": [{**base, **rule}], "credentials": {"gh": {"env": "GH_TOKEN"}}}


def test_a_credential_rule_is_terminated_and_names_its_source() -> None:
    p = EgressPolicy.model_validate(_cred_policy())
    assert p.rules[0].terminates and p.terminates and p.rules[0].tls_port_set == {443}


@pytest.mark.parametrize(
    ("rule", "why"),
    [
        ({"host": "*.example.com"}, "exact host"),
        ({"ports": [80]}, "TLS port"),
        ({"credential": {"name": "other"}}, "no entry in egress.credentials"),
        ({"credential": {"name": "gh", "header": "Host"}}, "header"),
        ({"credential": {"name": "gh", "format": "Bearer"}}, "{secret}"),
        ({"credential": {"name": "gh", "format": "Bearer {secret}\r\nX: {secret}"}}, "{secret}"),
        ({"http": [{"methods": ["TRACE"]}]}, "TRACE"),
        ({"http": [{"methods": ["GET"], "paths": ["/repos/../admin"]}]}, "path pattern"),
        ({"http": [{"methods": ["GET"], "paths": ["/repos/a*"]}]}, "path pattern"),
        ({"sni": "off"}, "SNI"),
    ],
)
def test_unsafe_termination_rules_are_load_errors(rule: dict, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)):
        EgressPolicy.model_validate(_cred_policy(**rule))


def test_a_credential_source_names_exactly_one_place() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        EgressPolicy.model_validate({**_cred_policy(), "credentials": {"gh": {"env": "A", "file": "/x"}}})
    with pytest.raises(ValueError, match="absolute"):
        EgressPolicy.model_validate({**_cred_policy(), "credentials": {"gh": {"file": "rel/x"}}})


def test_path_patterns_match_whole_segments() -> None:
    from sandbox.egress.rules import path_matches

    assert path_matches("/repos/acme/**", "/repos/acme/x/pulls")
    assert not path_matches("/repos/acme/**", "/repos/acme-evil/x")
    assert path_matches("/repos/*/issues", "/repos/acme/issues") and not path_matches("/repos/*/issues", "/repos/a/b/issues")
    assert path_matches("/**", "/") and path_matches("/user", "/user") and not path_matches("/user", "/user/x")


def test_policy_explain_shows_termination_credential_name_and_http_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox.explain import explain_rows
    from sandbox.policy import policy_from_dict

    monkeypatch.setenv("GITHUB_TOKEN", "ghp_value_never_shown")
    p = policy_from_dict({"name": "cred-demo", "egress": {
        "rules": [{"host": "api.github.com", "ports": [443], "credential": {"name": "github"}, "max_body_bytes": 1024,
                   "http": [{"methods": ["GET"], "paths": ["/**"]}, {"methods": ["POST"], "paths": ["/repos/acme/**"]}]},
                  {"host": "pypi.org", "ports": [443]}],
        "credentials": {"github": {"env": "GITHUB_TOKEN"}}}})
    allow = [v for area, what, v in explain_rows(p) if area == "network" and what == "allow"]
    assert "TLS TERMINATED on 443" in allow[0] and "injects credential github from env GITHUB_TOKEN" in allow[0]
    assert "only GET /**; POST /repos/acme/**" in allow[0] and "<= 1024 bytes" in allow[0]
    assert "end-to-end TLS tunnel on 443: SNI must name the host" in allow[1]
    assert "ghp_value_never_shown" not in repr(explain_rows(p))
