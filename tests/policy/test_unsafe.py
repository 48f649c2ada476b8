"""Weakening is loud, and the digest is the policy.

A policy weaker than the shipped baseline (a dangerous syscall, a lifted argument
check, a default action that lets unlisted calls run, a non-public egress range)
does not load and does not lint unless it accepts the weakening in writing under
``unsafe:``; then lint, explain and ``exec -v`` name it. The digest covers the
resolved seccomp filter, so editing an allowlist file changes it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from pydantic import ValidationError

from sandbox import seccomp as sc
from sandbox.cli import describe_line, main
from sandbox.explain import FIXED, explain_table
from sandbox.policy import PROFILES_DIR, Policy, PolicyError, load_policy, policy_from_dict
from sandbox.policy_base import PyStrictLoader, StrictLoader, read_yaml

HERE = Path(__file__).parent
BAD = HERE / "bad"
DECLARED = HERE / "declared"


def lint(*paths: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, ["policy", "lint", *paths])
    return r.exit_code, r.output


def _expectation(path: Path) -> tuple[str, str]:
    key, _, reason = re.search(r"^# expect: (.*)$", path.read_text(), re.M).group(1).partition(": ")
    return key, reason


# ---------------------------------------------------------------- lint refuses each weakening

@pytest.mark.parametrize("path", sorted(BAD.glob("*.yaml")), ids=lambda p: p.stem)
def test_lint_exits_nonzero_naming_file_key_and_reason(path: Path) -> None:
    key, reason = _expectation(path)
    code, out = lint(str(path))
    assert code == 1, out
    lines = [ln for ln in out.splitlines() if reason in ln]
    assert lines, out
    assert key == "-" or any(key in ln for ln in lines), out
    assert "ok (" not in out


KNOWN_DANGEROUS = [n for n in sc.DANGEROUS_SYSCALLS if sc.syscall_known(n)]


@pytest.mark.parametrize("name", KNOWN_DANGEROUS)
def test_every_dangerous_syscall_is_refused_unless_declared(name: str) -> None:
    with pytest.raises(PolicyError) as info:
        policy_from_dict({"name": "x", "seccomp": {"extra_allow": [name]}}, source="x.yaml")
    (f, k, r), = info.value.problems
    assert (f, k) == ("x.yaml", "seccomp.extra_allow") and r.startswith(f"allows {name}: ")
    assert f"unsafe: {{seccomp.allow.{name}: <reason>}}" in r
    pol = policy_from_dict({"name": "x", "seccomp": {"extra_allow": [name]},
                            "unsafe": {f"seccomp.allow.{name}": "deliberately, for this test"}})
    assert [(w.id, w.reason) for w in pol.weakenings()] == [(f"seccomp.allow.{name}", "deliberately, for this test")]
    assert name in pol.seccomp_filter().allowed_names


def test_the_reviews_list_is_refused_one_error_per_syscall() -> None:
    code, out = lint(str(BAD / "seccomp_allow_issue_list.yaml"))
    assert code == 1
    for name in ("mount", "ptrace", "bpf", "unshare", "keyctl"):
        assert f"seccomp.extra_allow: allows {name}: " in out


def test_exec_refuses_an_undeclared_weakening_before_any_sandbox_starts() -> None:
    r = subprocess.run([sys.executable, "-m", "sandbox.cli", "exec", "-p", str(BAD / "seccomp_default_action_log.yaml"),
                        "--", "true"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r
    assert f"{BAD / 'seccomp_default_action_log.yaml'}: seccomp.default_action: allows default action log" in r.stderr


def test_a_policy_built_in_code_cannot_skip_the_declaration() -> None:
    with pytest.raises(ValidationError, match=r"seccomp\.extra_allow: allows ptrace"):
        Policy.model_validate({"name": "x", "seccomp": {"extra_allow": ["ptrace"]}})
    with pytest.raises(ValidationError, match=r"seccomp\.default_action: allows default action log"):
        Policy(name="x", seccomp={"default_action": "log"})
    assert Policy(name="x", seccomp={"extra_allow": ["ptrace"]},
                  unsafe={"seccomp.allow.ptrace": "tests the code path"}).weakenings()[0].declared


def test_kill_process_and_extra_deny_are_not_weakenings() -> None:
    pol = policy_from_dict({"name": "x", "seccomp": {"default_action": "kill_process", "extra_deny": ["chmod"]}})
    assert pol.weakenings() == []


@pytest.mark.parametrize("path", sorted(PROFILES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_profiles_make_no_weakening(path: Path) -> None:
    pol = load_policy(str(path))
    assert pol.weakenings() == [] and pol.unsafe == {}
    if pol.runtime == "runsc":  # gVisor's clone3 adjustment happens after the check, in gVisor's kernel only
        assert "clone3" in pol.seccomp_filter().allow


def test_a_weakening_set_by_a_parent_names_the_parent_file(tmp_path: Path) -> None:
    parent = tmp_path / "parent.yaml"
    parent.write_text("extends: default\nseccomp: {extra_allow: [ptrace]}\n"
                      "unsafe: {seccomp.allow.ptrace: debugging sessions only}\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: parent\nunsafe: {seccomp.allow.ptrace: null}\n")  # withdraws the acceptance
    assert load_policy(str(parent)).weakenings()[0].id == "seccomp.allow.ptrace"
    with pytest.raises(PolicyError) as info:
        load_policy(str(child))
    (f, k, r), = info.value.problems
    assert (f, k) == (str(parent), "seccomp.extra_allow") and r.endswith(f"(loading {child})")


# ---------------------------------------------------------------- declared weakenings are named

def test_declared_weakening_lints_and_is_named_by_lint_explain_and_exec_v() -> None:
    path = DECLARED / "debug_ptrace.yaml"
    code, out = lint(str(path))
    assert code == 0 and out.strip().endswith("UNSAFE (declared): seccomp.allow.ptrace"), out
    r = CliRunner().invoke(main, ["policy", "explain", str(path), "--json"])
    doc = json.loads(r.output)
    assert doc["weakenings"] == [{"id": "seccomp.allow.ptrace", "allows": f"ptrace: {sc.DANGEROUS['ptrace']}",
                                  "file": "policy", "key": "seccomp.extra_allow",
                                  "reason": "gdb and strace inside the sandbox for a debugging session"}]
    unsafe_rows = [row for row in doc["rows"] if row["area"] == "UNSAFE"]
    assert [(row["setting"], row["source"]) for row in unsafe_rows] == [("seccomp.allow.ptrace", str(path))]
    assert "gdb and strace" in unsafe_rows[0]["value"]
    line = describe_line(load_policy(str(path)))
    assert "seccomp default +ptrace" in line
    assert line.endswith("UNSAFE: seccomp.allow.ptrace (gdb and strace inside the sandbox for a debugging session)")
    assert "UNSAFE" not in describe_line(load_policy("default"))


def test_declared_egress_range_is_named() -> None:
    pol = load_policy(str(DECLARED / "metadata_cidr.yaml"))
    (w,) = pol.weakenings()
    assert w.id == "egress.allow_cidrs.10.1.2.0/24" and "office network" in w.reason
    assert lint(str(DECLARED / "metadata_cidr.yaml"))[0] == 0


@pytest.mark.docker
def test_exec_v_names_the_declared_weakening(docker_client) -> None:
    r = subprocess.run([sys.executable, "-m", "sandbox.cli", "exec", "-v", "-p", str(DECLARED / "debug_ptrace.yaml"),
                        "--", "true"], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "UNSAFE: seccomp.allow.ptrace (gdb and strace" in r.stderr and "seccomp default +ptrace" in r.stderr


# ---------------------------------------------------------------- the digest is the policy

@pytest.fixture
def shipped() -> str:
    """The shipped default policy's digest, taken before any copy is put on the search path."""
    return load_policy(str(PROFILES_DIR / "default.yaml")).digest()


@pytest.fixture
def profiles_copy(shipped: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the shipped profiles, first on the search path (the shipped files are never edited)."""
    d = tmp_path / "profiles"
    shutil.copytree(PROFILES_DIR, d)
    monkeypatch.setenv("SANDBOX_PROFILES", str(d))
    return d


def _edit_allowlist(d: Path, old: str, new: str) -> None:
    f = d / "seccomp" / "default.yaml"
    text = f.read_text()
    assert text.count(old) == 1
    f.write_text(text.replace(old, new))


def test_copied_profiles_digest_like_the_shipped_ones(profiles_copy: Path, shipped: str) -> None:
    (profiles_copy / "seccomp" / "default.yaml").write_text("# a comment changes nothing enforced\n"
                                                             + (profiles_copy / "seccomp" / "default.yaml").read_text())
    assert load_policy("default").digest() == shipped  # the copy is what was loaded...
    assert sc.compile_filter(load_policy("default").seccomp).source.startswith(str(profiles_copy))


def test_removing_one_syscall_from_the_allowlist_changes_the_digest(profiles_copy: Path, shipped: str) -> None:
    _edit_allowlist(profiles_copy, " syncfs,", "")
    pol = load_policy("default")
    assert "syncfs" not in pol.seccomp_filter().allowed_names
    assert pol.digest() != shipped


def test_adding_a_dangerous_syscall_to_the_allowlist_file_is_refused_naming_that_file(profiles_copy: Path) -> None:
    _edit_allowlist(profiles_copy, " syncfs,", " syncfs, mount, ptrace, bpf,")
    with pytest.raises(PolicyError) as info:
        load_policy("default")
    allowlist = str((profiles_copy / "seccomp" / "default.yaml").resolve())
    assert [(f, k, r.split(":")[0]) for f, k, r in info.value.problems] == [
        (allowlist, "allow", "allows bpf"), (allowlist, "allow", "allows mount"), (allowlist, "allow", "allows ptrace")]
    assert all(str(profiles_copy / "default.yaml") in r for _, _, r in info.value.problems)
    code, out = lint("default")
    assert code == 1 and f"{allowlist}: allow: allows mount" in out


def test_adding_a_declared_syscall_to_the_allowlist_file_changes_the_digest(profiles_copy: Path, shipped: str) -> None:
    _edit_allowlist(profiles_copy, " syncfs,", " syncfs, io_setup,")
    with pytest.raises(PolicyError, match="allows io_setup: not in the shipped allowlist"):
        load_policy("default")
    prof = profiles_copy / "aio.yaml"
    prof.write_text("extends: default\nunsafe: {seccomp.allow.io_setup: the database engine under test uses AIO}\n")
    pol = load_policy("aio")
    assert [w.id for w in pol.weakenings()] == ["seccomp.allow.io_setup"] and pol.digest() != shipped


def test_widening_an_argument_check_is_a_weakening(profiles_copy: Path) -> None:
    _edit_allowlist(profiles_copy, "    - [{index: 0, op: eq, value: 16}]\n",
                    "    - [{index: 0, op: eq, value: 16}]\n    - [{index: 0, op: eq, value: 17}]\n")  # AF_PACKET
    with pytest.raises(PolicyError, match="allows socket with arguments beyond the shipped check"):
        load_policy("default")


def test_narrowing_an_argument_check_is_not_a_weakening(profiles_copy: Path, shipped: str) -> None:
    _edit_allowlist(profiles_copy, "    - [{index: 0, op: eq, value: 16}]\n", "")  # no netlink sockets
    pol = load_policy("default")
    assert pol.weakenings() == [] and pol.digest() != shipped


def test_digest_changes_with_image_runtime_filter_and_stays_put_otherwise() -> None:
    base = load_policy("default")
    variants = {
        "image": {"image": "sandbox-runtime:other"},
        "runtime": {"runtime": "runsc"},  # also changes the filter: clone3 is allowed under gVisor
        "extra_deny": {"seccomp": {"extra_deny": ["chmod"]}},
        "default_action": {"seccomp": {"default_action": "kill_process"}},
        "limits": {"limits": {"pids": 129}},
        "unsafe reason": {"seccomp": {"extra_allow": ["ptrace"]}, "unsafe": {"seccomp.allow.ptrace": "reason one"}},
    }
    raw = base.model_dump(mode="json")
    digests = {"base": base.digest()}
    for what, change in variants.items():
        merged = {**raw, **{k: ({**raw[k], **v} if isinstance(v, dict) and k != "unsafe" else v)
                            for k, v in change.items()}}
        digests[what] = policy_from_dict(merged).digest()
    digests["other reason"] = policy_from_dict({**raw, "seccomp": {**raw["seccomp"], "extra_allow": ["ptrace"]},
                                                "unsafe": {"seccomp.allow.ptrace": "reason two"}}).digest()
    assert len(set(digests.values())) == len(digests), digests
    assert base.digest() == load_policy("default").digest() == policy_from_dict(raw).digest()


# ---------------------------------------------------------------- explain: who set what

def test_explain_names_the_file_of_the_extends_chain_that_set_each_value() -> None:
    rows = {(r["area"], r["setting"]): r for r in explain_table(load_policy("worker"))}
    worker, default = str(PROFILES_DIR / "worker.yaml"), str(PROFILES_DIR / "default.yaml")
    assert rows[("limits", "memory")]["source"] == worker
    assert rows[("rlimits", "cpu time")]["source"] == default
    assert rows[("runtime", "image")]["source"] == default
    assert rows[("identity", "privileges")]["source"] == FIXED
    gv = {(r["area"], r["setting"]): r["source"] for r in explain_table(load_policy("gvisor"))}
    assert gv[("runtime", "OCI runtime")] == str(PROFILES_DIR / "gvisor.yaml")
    assert gv[("limits", "memory")] == default


# ---------------------------------------------------------------- duplicate keys

def test_duplicate_keys_use_the_c_loader_when_present() -> None:
    if getattr(yaml, "__with_libyaml__", False):
        assert issubclass(StrictLoader, yaml.CSafeLoader)


@pytest.mark.parametrize("loader", [StrictLoader, PyStrictLoader], ids=["default", "pure-python"])
def test_duplicate_keys_are_caught_by_either_parser(loader: type) -> None:
    doc = "a: 1\nb:\n  c: [1, {d: 1, e: 2, d: 3}]\n"
    with pytest.raises(yaml.MarkedYAMLError, match=r"duplicate key 'd' on line 3 \(columns 11 and 23\)"):
        yaml.load(doc, Loader=loader)  # noqa: S506 - safe loaders
    assert yaml.load("a: 1\nb: {a: 2}\n", Loader=loader) == {"a": 1, "b": {"a": 2}}  # noqa: S506


def test_yaml_merge_keys_still_override(tmp_path: Path) -> None:
    f = tmp_path / "m.yaml"
    f.write_text("base: &b {pids: 64, cpus: 1.0}\nlimits:\n  <<: *b\n  pids: 100\n")
    assert read_yaml(f)["limits"] == {"pids": 100, "cpus": 1.0}


def test_duplicate_key_in_a_seccomp_allowlist_is_an_error(profiles_copy: Path) -> None:
    (profiles_copy / "seccomp" / "default.yaml").write_text(
        (profiles_copy / "seccomp" / "default.yaml").read_text() + "errno:\n  clone3: 1\n")
    with pytest.raises(PolicyError, match=r"duplicate key 'errno' on lines \d+ and \d+"):
        load_policy("default")
