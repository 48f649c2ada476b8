"""Policy models: strict, canonical at load, and refusing rules broader than meant."""

from __future__ import annotations

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
