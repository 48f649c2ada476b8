"""Where profiles, seccomp allowlists and state are found (sandbox/paths.py), as the README documents.

No Docker: profiles are resolved and loaded for real from temporary directories; only the
system directory (/etc/sandbox) is redirected, since a test must not write to /etc.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandbox import paths
from sandbox.policy import PolicyError, load_policy, resolve_profile

SHIPPED_DEFAULT = paths.SHIPPED_PROFILES_DIR / "default.yaml"
LOCATIONS = ("env", "cwd", "xdg", "etc", "shipped")


@pytest.fixture
def where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """One profile directory per documented location, all empty, the process in a scratch cwd."""
    dirs = {
        "env": tmp_path / "env-profiles",
        "cwd": tmp_path / "cwd" / "profiles",
        "xdg": tmp_path / "xdg-config" / "sandbox" / "profiles",
        "etc": tmp_path / "etc-sandbox" / "profiles",
    }
    for d in dirs.values():
        (d / "seccomp").mkdir(parents=True)
    monkeypatch.setenv("SANDBOX_PROFILES", str(dirs["env"]))
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setattr(paths, "SYSTEM_CONFIG_DIR", tmp_path / "etc-sandbox")
    dirs["shipped"] = paths.SHIPPED_PROFILES_DIR
    return dirs


def _put_profile(d: Path, name: str, marker: str) -> Path:
    p = d / f"{name}.yaml"
    p.write_text(f"extends: {SHIPPED_DEFAULT}\ndescription: {marker}\n")
    return p


def test_search_path_is_env_cwd_xdg_etc_then_package(where: dict[str, Path]) -> None:
    assert paths.profile_dirs() == [where[k] for k in LOCATIONS]
    assert paths.seccomp_dirs() == [where[k] / "seccomp" for k in LOCATIONS]


def test_each_location_shadows_the_ones_after_it(where: dict[str, Path]) -> None:
    made = {k: _put_profile(where[k], "layered", f"from-{k}") for k in LOCATIONS[:-1]}
    for k in LOCATIONS[:-1]:  # remove the winner each round: the next location must win
        pol = load_policy("layered")
        assert pol.description == f"from-{k}", f"expected the {k} profile to win"
        assert resolve_profile("layered") == made[k].resolve()
        made[k].unlink()
    with pytest.raises(PolicyError, match="no such profile"):
        load_policy("layered")


def test_user_profile_named_default_shadows_the_shipped_one(where: dict[str, Path]) -> None:
    assert resolve_profile("default") == SHIPPED_DEFAULT
    mine = where["xdg"] / "default.yaml"
    mine.write_text(SHIPPED_DEFAULT.read_text().replace("memory_mb: 512", "memory_mb: 400"))
    assert resolve_profile("default") == mine.resolve()
    assert load_policy("default").limits.memory_mb == 400


def test_resolve_after_a_file_finds_the_next_one_down_the_path(where: dict[str, Path]) -> None:
    """What a user's default.yaml saying `extends: default` needs: the next `default`, not itself."""
    mine = where["xdg"] / "default.yaml"
    mine.write_text(SHIPPED_DEFAULT.read_text())
    assert resolve_profile("default") == mine.resolve()
    assert resolve_profile("default", after=mine) == SHIPPED_DEFAULT
    etc = where["etc"] / "default.yaml"
    etc.write_text(SHIPPED_DEFAULT.read_text())
    assert resolve_profile("default", after=mine) == etc.resolve()
    with pytest.raises(PolicyError, match="no such profile"):
        resolve_profile("default", after=SHIPPED_DEFAULT)  # nothing after the last one


def test_sandbox_profiles_takes_several_directories_in_order(where: dict[str, Path], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    _put_profile(second, "two", "from-second")
    monkeypatch.setenv("SANDBOX_PROFILES", os.pathsep.join([str(first), str(second)]))
    assert load_policy("two").description == "from-second"
    _put_profile(first, "two", "from-first")
    assert load_policy("two").description == "from-first"


def test_unknown_profile_error_names_every_directory_searched(where: dict[str, Path]) -> None:
    with pytest.raises(PolicyError) as e:
        load_policy("nosuch")
    for k in LOCATIONS:
        assert str(where[k]) in str(e.value), k


def test_seccomp_allowlist_found_in_the_same_order(where: dict[str, Path]) -> None:
    from sandbox.seccomp import find_allowlist

    shipped = (paths.SHIPPED_PROFILES_DIR / "seccomp" / "default.yaml").read_text()
    made = {}
    for k in LOCATIONS[:-1]:
        made[k] = where[k] / "seccomp" / "layered.yaml"
        made[k].write_text(shipped)
    for k in LOCATIONS[:-1]:
        assert find_allowlist("layered") == made[k].resolve(), f"expected the {k} allowlist to win"
        made[k].unlink()
    with pytest.raises(PolicyError, match="no such seccomp allowlist"):
        find_allowlist("layered")
    assert find_allowlist("default") == (paths.SHIPPED_PROFILES_DIR / "seccomp" / "default.yaml").resolve()


def test_a_policy_compiles_with_a_users_seccomp_allowlist(where: dict[str, Path]) -> None:
    shipped = (paths.SHIPPED_PROFILES_DIR / "seccomp" / "default.yaml").read_text()
    (where["xdg"] / "seccomp" / "mine.yaml").write_text(shipped)
    (where["xdg"] / "uses-mine.yaml").write_text(f"extends: {SHIPPED_DEFAULT}\nseccomp: {{profile: mine}}\n")
    assert load_policy("uses-mine").seccomp.profile == "mine"
    (where["xdg"] / "seccomp" / "mine.yaml").unlink()
    with pytest.raises(PolicyError, match="no such seccomp allowlist"):
        load_policy("uses-mine")


# ---------------------------------------------------------------- state layout

@pytest.fixture
def no_layout_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for v in ("SANDBOX_STATE_DIR", "SANDBOX_ROOTFS_CACHE", "XDG_STATE_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(v, raising=False)


def _as(monkeypatch: pytest.MonkeyPatch, uid: int, home: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: uid)
    monkeypatch.setenv("HOME", str(home))


def test_root_keeps_state_in_var_lib_and_cache_in_var_cache(no_layout_env: None, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _as(monkeypatch, 0, tmp_path)
    assert paths.state_dir() == Path("/var/lib/sandbox")
    assert paths.controlplane_dir() == Path("/var/lib/sandbox/controlplane")
    assert paths.rootfs_cache_dir() == Path("/var/cache/sandbox/rootfs")


def test_other_users_follow_xdg(no_layout_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _as(monkeypatch, 1000, tmp_path)
    assert paths.state_dir() == tmp_path / ".local/state/sandbox"
    assert paths.rootfs_cache_dir() == tmp_path / ".cache/sandbox/rootfs"
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "st"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "ca"))
    assert paths.state_dir() == tmp_path / "st/sandbox"
    assert paths.rootfs_cache_dir() == tmp_path / "ca/sandbox/rootfs"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/dir")  # the XDG spec: ignore relative paths
    assert paths.state_dir() == tmp_path / ".local/state/sandbox"


@pytest.mark.parametrize("uid", [0, 1000])
def test_sandbox_state_dir_moves_every_part(no_layout_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            uid: int) -> None:
    from sandbox.controlplane.endpoint import resolve_state_dir
    from sandbox.egress.manager import default_state_dir as egress_default
    from sandbox.worker.cli import _default_worker_state_dir, default_session_store

    _as(monkeypatch, uid, tmp_path / "home")
    root = tmp_path / "state"
    monkeypatch.setenv("SANDBOX_STATE_DIR", str(root))
    parts = [paths.runtime_dir(), paths.workspaces_dir(), paths.egress_dir(), paths.worker_dir(),
             paths.sessions_dir(), paths.controlplane_dir(), paths.rootfs_cache_dir()]
    assert all(p == root or root in p.parents for p in parts), parts
    assert len(set(parts)) == len(parts), "two parts share a directory"
    # and the modules that own each part use the same directories
    assert resolve_state_dir(None) == paths.controlplane_dir() == root / "controlplane"
    assert egress_default() == paths.egress_dir() == root / "egress"
    assert _default_worker_state_dir() == paths.worker_dir() == root / "worker"
    assert default_session_store() == paths.sessions_dir() == root / "sessions"
    monkeypatch.setenv("SANDBOX_ROOTFS_CACHE", str(tmp_path / "rc"))
    assert paths.rootfs_cache_dir() == tmp_path / "rc"
    # uid leases stay host-wide: two state dirs must never hand out one uid
    assert root not in paths.uid_leases_dir().parents


def test_uid_leases_are_host_wide_and_agree_with_the_identity_module(no_layout_env: None, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox.identity import default_lease_dir

    for uid in (0, 1000):
        _as(monkeypatch, uid, tmp_path)
        for state in (tmp_path / "a", tmp_path / "b"):
            monkeypatch.setenv("SANDBOX_STATE_DIR", str(state))
            assert paths.uid_leases_dir() == default_lease_dir()
        if uid == 0:
            assert paths.uid_leases_dir() == Path("/run/sandbox/uids")
    monkeypatch.setenv("SANDBOX_UID_LEASES", str(tmp_path / "leases"))
    assert paths.uid_leases_dir() == default_lease_dir() == tmp_path / "leases"


def test_control_plane_and_runtime_agree_as_root(no_layout_env: None, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """As root the control plane once kept state under ~/.local/state while the runtime used /var/lib."""
    from sandbox.controlplane.endpoint import resolve_state_dir
    from sandbox.runtime import default_state_dir as runtime_default

    _as(monkeypatch, 0, tmp_path)
    assert runtime_default() == paths.state_dir()
    assert resolve_state_dir(None).parent == runtime_default()


def test_runtime_uses_the_shared_layout(no_layout_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox.runtime import default_state_dir as runtime_default

    _as(monkeypatch, 1000, tmp_path)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "st"))
    assert runtime_default() == paths.runtime_dir() == tmp_path / "st/sandbox"
