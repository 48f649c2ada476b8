"""The API's validation without Docker: overrides change only what they name, and are checked
by the policy's own rules; the version without package metadata."""

from __future__ import annotations

import importlib.metadata
import math

import pytest

from sandbox import api
from sandbox.policy import PROFILES_DIR

SHIPPED = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


@pytest.mark.parametrize("profile", SHIPPED)
def test_overrides_change_only_env_and_call_timeout(profile: str) -> None:
    pol = api.load_profile(profile)
    new = api.with_overrides(pol, env={"EXTRA": "1"}, timeout="7.5")
    assert new.env == {**pol.env, "EXTRA": "1"} and new.timeouts.call_s == 7.5
    assert new.model_dump(exclude={"env", "timeouts"}) == pol.model_dump(exclude={"env", "timeouts"})
    assert new.timeouts.session_s == pol.timeouts.session_s
    assert api.with_overrides(pol) is pol


@pytest.mark.parametrize("timeout", [math.nan, math.inf, -math.inf, 1e12, 0, -1, "nan", "soon"])
def test_timeout_override_is_refused_with_the_policy_key(timeout: object) -> None:
    with pytest.raises(api.PolicyError) as ei:
        api.with_overrides(api.load_profile("default"), timeout=timeout, source="--timeout")
    assert ei.value.problems[0][:2] == ("--timeout", "timeouts.call_s")


@pytest.mark.parametrize("name", ["ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "LD_PRELOAD", "LD_AUDIT",
                                  "LD_LIBRARY_PATH", "DOCKER_HOST", "", "1A", "A B", "A=B"])
def test_env_override_is_refused_by_the_policy_rules(name: str) -> None:
    with pytest.raises(api.PolicyError) as ei:
        api.with_overrides(api.load_profile("default"), env={name: "v"}, source="--env")
    assert ei.value.problems[0][:2] == ("--env", "env")
    assert isinstance(ei.value, api.SandboxError) and isinstance(ei.value, ValueError)


def test_version_falls_back_to_pyproject_in_a_source_tree(monkeypatch: pytest.MonkeyPatch) -> None:
    import sandbox

    def missing(_name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(_name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    v = sandbox._version()
    assert v.endswith("+source") and v.split("+")[0].count(".") >= 1
