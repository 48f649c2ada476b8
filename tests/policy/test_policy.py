"""The policy loader refuses every broken profile with the file, key and reason."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sandbox.policy import PolicyError, load_policy, policy_from_dict

BAD = Path(__file__).parent / "bad"
PROFILES = Path(__file__).resolve().parents[2] / "sandbox" / "profiles"


def _expectation(path: Path) -> str:
    m = re.search(r"^# expect: (.*)$", path.read_text(), re.M)
    assert m, f"{path.name} lacks an '# expect:' line"
    return m.group(1)


@pytest.mark.parametrize("path", sorted(BAD.glob("*.yaml")), ids=lambda p: p.stem)
def test_broken_policy_is_refused_with_its_reason(path: Path) -> None:
    from sandbox import seccomp as sc

    expected = _expectation(path)
    with pytest.raises(PolicyError) as info:
        pol = load_policy(str(path))
        sc.compile_filter(pol.seccomp)  # syscall names are checked at compile time
    text = str(info.value)
    assert str(path.name.split(".")[0]) in text or path.name in text or "circular" in text
    key, _, reason = expected.partition(": ")
    assert any((key == "-" or key in f"{k}: {r}") and reason.strip() in r for _, k, r in info.value.problems), text


@pytest.mark.parametrize("path", sorted(PROFILES.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_profile_is_valid(path: Path) -> None:
    from sandbox import seccomp as sc

    pol = load_policy(str(path))
    assert pol.user.uid != 0 and pol.user.gid != 0
    flt = sc.compile_filter(pol.seccomp)
    assert flt.dangerous_allowed() == []


def test_profile_by_name_and_extends_merge() -> None:
    pol = load_policy("worker")
    assert pol.name == "worker"
    assert pol.limits.memory_mb == 1024
    assert pol.rlimits.core == 0  # inherited from default
    assert pol.seccomp.profile == "default"


def test_symlink_to_dangerous_host_path_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "innocent"
    link.symlink_to("/var/run")
    with pytest.raises(PolicyError, match="/var/run|/run"):
        policy_from_dict({"name": "x", "read_only_mounts": [{"source": str(link), "target": "/data"}]})


def test_symlink_to_docker_socket_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "sock"
    link.symlink_to("/var/run/docker.sock")
    with pytest.raises(PolicyError, match="docker.sock|/run"):
        policy_from_dict({"name": "x", "read_only_mounts": [{"source": str(link), "target": "/data"}]})


def test_harmless_read_only_mount_is_accepted(tmp_path: Path) -> None:
    pol = policy_from_dict({"name": "x", "read_only_mounts": [{"source": str(tmp_path), "target": "/data"}]})
    assert pol.read_only_mounts[0].target == "/data"


def test_digest_changes_with_any_setting() -> None:
    a = load_policy("default")
    b = a.model_copy(update={"limits": a.limits.model_copy(update={"pids": 129})})
    assert a.digest() != b.digest()
    assert a.digest() == load_policy("default").digest()


def test_policy_error_lists_every_problem() -> None:
    with pytest.raises(PolicyError) as info:
        policy_from_dict({"name": "x", "user": {"uid": 0}, "limits": {"pids": 1}, "bogus": 1})
    keys = {k for _, k, _ in info.value.problems}
    assert {"user.uid", "limits.pids", "bogus"} <= keys
