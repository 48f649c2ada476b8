"""The package as a user gets it: a wheel, installed with the locked dependencies into a fresh
virtual environment outside the source tree, run from a directory outside it.

A wheel once shipped only the agent: profiles and recipes were read from the source tree, so
`sandbox exec -- true` found "no such profile; known: none" and `images list` printed nothing,
while every test run from the tree passed. An undeclared import (httpx) likewise hid behind an
interpreter that happened to have it. Here nothing from the tree is importable and the venv holds
only what requirements.lock pins.

The locked dependency wheels are downloaded once per lock into a cache (``$SANDBOX_TEST_CACHE``,
default /tmp/sandbox-test-cache) and installed offline from there with ``--require-hashes``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements.lock"
CACHE = Path(os.environ.get("SANDBOX_TEST_CACHE") or "/tmp/sandbox-test-cache") / "packaging"
PACKAGE_DATA = ("profiles", "recipes", "agent")  # directories under sandbox/ that must ship whole

pytestmark = pytest.mark.docker


def _run(cmd: list[str], timeout: float = 600, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]


def _check(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    p = _run(cmd, **kw)
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def _has_setuptools_68() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 68


def _locked_wheels() -> Path:
    """The lock's wheels for this interpreter and platform, downloaded once per lock content."""
    key = hashlib.sha256(LOCK.read_bytes()).hexdigest()[:16]
    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    dest = CACHE / f"wheels-{py}-{key}"
    if (dest / ".complete").exists():
        return dest
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(dest) + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _check([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--require-hashes",
            "--only-binary", ":all:", "-r", str(LOCK), "-d", str(tmp)])
    (tmp / ".complete").touch()
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


@dataclass
class Installed:
    wheel: Path
    venv: Path
    cwd: Path
    env: dict[str, str]
    src: Path

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return _run(list(args), timeout=timeout, cwd=self.cwd, env=self.env)

    def sandbox(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self.run(str(self.venv / "bin" / "sandbox"), *args, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory, docker_client: object) -> Iterator[Installed]:
    root = tmp_path_factory.mktemp("wheel")
    assert REPO not in root.parents

    # Build from a copy of what the tree holds now, so nothing (build/, egg-info) lands in it.
    src = root / "src"
    shutil.copytree(REPO / "sandbox", src / "sandbox",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / f, src / f)
    dist = root / "dist"
    isolation = ["--no-build-isolation"] if _has_setuptools_68() else []  # the lock pins setuptools
    _check([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps", *isolation,
            "-w", str(dist), str(src)], cwd=root)
    (wheel,) = dist.glob("sandbox-*.whl")

    venv = root / "venv"
    _check([sys.executable, "-m", "venv", str(venv)])
    pip = [str(venv / "bin" / "python"), "-m", "pip", "-q", "--disable-pip-version-check", "install"]
    _check([*pip, "--no-index", "--find-links", str(_locked_wheels()), "--require-hashes", "--only-binary", ":all:",
            "-r", str(LOCK)])
    _check([*pip, "--no-index", "--no-deps", str(wheel)])

    cwd = root / "elsewhere"
    cwd.mkdir()
    env = {
        "PATH": f"{venv / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(root / "home"),
        "XDG_CONFIG_HOME": str(root / "config"),  # no user profiles: only the shipped ones
        "SANDBOX_STATE_DIR": str(root / "state"),
        "LANG": "C.UTF-8",
        "COLUMNS": "200",
    }
    for k in ("DOCKER_HOST", "DOCKER_CONFIG", "CI", "TMPDIR"):
        if k in os.environ:
            env[k] = os.environ[k]
    yield Installed(wheel=wheel, venv=venv, cwd=cwd, env=env, src=src)


def test_wheel_ships_profiles_seccomp_lists_recipes_and_agent(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    expected = {str(p.relative_to(installed.src)) for d in PACKAGE_DATA for p in (installed.src / "sandbox" / d).rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    assert {"sandbox/profiles/default.yaml", "sandbox/profiles/seccomp/default.yaml",
            "sandbox/recipes/base/image.yaml", "sandbox/agent/agent.py"} <= expected
    missing = sorted(expected - names)
    assert not missing, f"not in the wheel (add them to [tool.setuptools.package-data]): {missing}"


def test_installed_package_is_the_wheel_not_the_source_tree(installed: Installed) -> None:
    p = installed.run(str(installed.venv / "bin" / "python"), "-c", "import sandbox; print(sandbox.__file__)")
    assert p.returncode == 0, p.stderr
    where = Path(p.stdout.strip())
    assert installed.venv in where.parents and REPO not in where.parents


def test_every_module_imports_with_only_the_locked_dependencies(installed: Installed) -> None:
    """An import that the lock does not provide fails here (sandbox.agent runs inside sandboxes: stdlib only)."""
    code = ("import importlib, pkgutil, sandbox\n"
            "for m in pkgutil.walk_packages(sandbox.__path__, 'sandbox.'):\n"
            "    if not m.name.startswith('sandbox.agent'):\n"
            "        importlib.import_module(m.name)\n")
    p = installed.run(str(installed.venv / "bin" / "python"), "-c", code)
    assert p.returncode == 0, p.stderr[-3000:]
    check = installed.run(str(installed.venv / "bin" / "python"), "-m", "pip", "check")
    assert check.returncode == 0, f"the wheel's dependencies are not satisfied by requirements.lock:\n{check.stdout}"


def test_help_from_the_console_script_and_python_dash_m(installed: Installed) -> None:
    for p in (installed.sandbox("--help"), installed.run(str(installed.venv / "bin" / "python"), "-m", "sandbox", "--help")):
        assert p.returncode == 0, p.stderr
        assert "exec" in p.stdout and "Usage:" in p.stdout


def test_shipped_profiles_are_found_outside_the_tree(installed: Installed) -> None:
    p = installed.sandbox("policy", "list")
    assert p.returncode == 0, p.stderr
    listed = dict(line.split("\t", 1) for line in p.stdout.splitlines() if "\t" in line)
    shipped = {f.stem for f in (installed.src / "sandbox" / "profiles").glob("*.yaml")}
    assert shipped <= set(listed), p.stdout
    for name in shipped:
        assert installed.venv in Path(listed[name]).parents, listed[name]


def test_installed_cli_finds_user_profiles_in_the_documented_places(installed: Installed, tmp_path: Path) -> None:
    places = {
        "from-env": tmp_path / "env",
        "from-cwd": installed.cwd / "profiles",
        "from-xdg": Path(installed.env["XDG_CONFIG_HOME"]) / "sandbox" / "profiles",
    }
    for name, d in places.items():
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{name}.yaml").write_text("extends: default\n")
    try:
        p = _run([str(installed.venv / "bin" / "sandbox"), "policy", "list"], timeout=120, cwd=installed.cwd,
                 env={**installed.env, "SANDBOX_PROFILES": str(places["from-env"])})
        assert p.returncode == 0, p.stderr
        listed = dict(line.split("\t", 1) for line in p.stdout.splitlines() if "\t" in line)
        for name, d in places.items():
            assert Path(listed[name]).resolve() == (d / f"{name}.yaml").resolve(), (name, p.stdout)
        # and one of them loads for real (extends: default resolves to the shipped default)
        q = _run([str(installed.venv / "bin" / "sandbox"), "exec", "-p", "from-xdg", "--", "true"], timeout=300,
                 cwd=installed.cwd, env=installed.env)
        assert q.returncode == 0, q.stderr[-3000:]
    finally:
        for name, d in places.items():
            (d / f"{name}.yaml").unlink(missing_ok=True)


def test_exec_true_runs_a_sandbox_from_the_installed_wheel(installed: Installed) -> None:
    p = installed.sandbox("exec", "--", "true")
    assert p.returncode == 0, f"exit {p.returncode}: {p.stderr[-3000:]}"
    p = installed.sandbox("exec", "--", "sh", "-c", "exit 7")
    assert p.returncode == 7, p.stderr[-3000:]


def test_images_list_names_the_image_the_tree_builds(installed: Installed) -> None:
    """The tag hashes the recipe and the agent's files: equal tags mean both shipped unchanged."""
    from sandbox import images

    want = [r.image_tag() for r in images.recipes()]
    p = installed.sandbox("images", "list")
    assert p.returncode == 0, p.stderr
    for tag in want:
        assert tag in p.stdout, f"{tag} not listed by the installed CLI:\n{p.stdout}"
        assert "present" in p.stdout.split(tag, 1)[1].splitlines()[0]


def test_doctor_finds_profiles_and_images(installed: Installed) -> None:
    from sandbox import images

    p = installed.sandbox("doctor", timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode in (0, 1), f"doctor crashed (exit {p.returncode}):\n{out[-3000:]}"
    assert "Traceback" not in out and "no such profile" not in out and "no image recipes" not in out, out[-3000:]
    for r in images.recipes():
        assert r.image_tag() in out, out[-3000:]
