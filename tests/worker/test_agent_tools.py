"""The in-sandbox tool ops (sandbox/agent/tools.py) run directly on a temp dir: no Docker.

The same file runs inside every sandbox; here HOME points at a temp workspace.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from types import ModuleType

import pytest

TOOLS_PATH = Path(__file__).resolve().parents[2] / "sandbox" / "agent" / "tools.py"


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "workspace"
    root.mkdir()
    monkeypatch.setenv("HOME", str(root))
    return root.resolve()


@pytest.fixture
def t(ws: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    # In the sandbox the agent's directory is on sys.path (tools.py imports its sibling `reaper`).
    monkeypatch.syspath_prepend(str(TOOLS_PATH.parent))
    spec = importlib.util.spec_from_file_location("sandbox_agent_tools_under_test", TOOLS_PATH)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    yield mod
    for sh in list(mod._shells.values()):
        sh.close()


def fails(fn, *args, match: str) -> str:  # noqa: ANN001
    with pytest.raises(Exception) as ei:
        fn(*args)
    assert type(ei.value).__name__ == "ToolFailure", ei.value
    assert match in str(ei.value), str(ei.value)
    return str(ei.value)


# ------------------------------------------------------------------ confinement

def test_paths_escaping_the_workspace_are_refused(t: ModuleType, ws: Path, tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("top secret")
    for p in ("../secret.txt", str(tmp_path / "secret.txt"), "/etc/passwd", "a/../../secret.txt"):
        fails(t.op_read, {"file_path": p}, match="outside the session's working directory")
        fails(t.op_write, {"file_path": p, "content": "x"}, match="outside the session's working directory")
    assert (tmp_path / "secret.txt").read_text() == "top secret"


def test_symlinks_cannot_escape(t: ModuleType, ws: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f.txt").write_text("outside")
    os.symlink(outside / "f.txt", ws / "leaf")
    os.symlink(outside, ws / "dir")
    os.symlink(tmp_path / "nowhere" / "new.txt", ws / "dangling")
    fails(t.op_read, {"file_path": "leaf"}, match="outside")
    fails(t.op_write, {"file_path": "leaf", "content": "pwned"}, match="outside")
    fails(t.op_write, {"file_path": "dir/new.txt", "content": "pwned"}, match="outside")
    fails(t.op_write, {"file_path": "dangling", "content": "pwned"}, match="outside")
    fails(t.op_edit, {"file_path": "leaf", "old_string": "outside", "new_string": "x"}, match="outside")
    fails(t.op_grep, {"pattern": "x", "path": "dir"}, match="outside")
    assert (outside / "f.txt").read_text() == "outside"
    assert not (outside / "new.txt").exists() and not (tmp_path / "nowhere").exists()
    # Symlinks that stay inside are fine, as in the reference.
    (ws / "real.txt").write_text("inside")
    os.symlink(ws / "real.txt", ws / "alias")
    assert t.op_read({"file_path": "alias"}) == {"text": "inside"}


def test_open_refuses_a_symlink_swapped_in_after_the_check(t: ModuleType, ws: Path, tmp_path: Path) -> None:
    (tmp_path / "target").mkdir()
    (ws / "d").mkdir()
    full = t.resolve("d/f.txt", "write", str(ws))
    # The race: after resolve() said "inside", the directory becomes a symlink to outside.
    (ws / "d").rmdir()
    os.symlink(tmp_path / "target", ws / "d")
    with pytest.raises(OSError):
        t._open_beneath(str(ws), full, os.O_WRONLY | os.O_CREAT, make_parents=False)
    assert not (tmp_path / "target" / "f.txt").exists()


def test_non_regular_files_are_refused(t: ModuleType, ws: Path) -> None:
    os.mkfifo(ws / "fifo")
    started = time.monotonic()
    fails(t.op_read, {"file_path": "fifo"}, match="not a regular file")
    fails(t.op_write, {"file_path": "fifo", "content": "x"}, match="not a regular file")
    assert time.monotonic() - started < 2  # a FIFO never blocks the open
    fails(t.op_read, {"file_path": "."}, match="not a regular file")


def test_bad_arguments_name_what_is_wrong(t: ModuleType) -> None:
    fails(t.op_read, {"file_path": 5}, match="read: file_path must be a string")
    fails(t.op_read, {"file_path": "a\x00b"}, match="NUL")
    fails(t.op_read, {"file_path": "x" * 5000}, match="longer than 4096")
    fails(t.op_read, {"file_path": "f", "view_range": [1]}, match="view_range must be [start_line, end_line]")
    fails(t.op_write, {"file_path": "f", "content": "\ud800"}, match="lone surrogate")
    fails(t.op_bash, {"command": 3}, match="command must be a string")
    fails(t.op_bash, {}, match="command is required")
    fails(t.op_glob, {"pattern": "/etc/*"}, match="absolute pattern not permitted")
    fails(t.op_glob, {"pattern": "a/../../*"}, match="'..' is not permitted")


# ------------------------------------------------------------------ read / write / edit

def test_write_read_edit_roundtrip(t: ModuleType, ws: Path) -> None:
    assert t.op_write({"file_path": "a/b/c.txt", "content": "héllo\nworld\n"}) == {"text": "wrote 13 bytes to a/b/c.txt"}
    assert (ws / "a/b/c.txt").read_bytes() == "héllo\nworld\n".encode()
    assert t.op_read({"file_path": "a/b/c.txt"}) == {"text": "héllo\nworld\n"}
    assert t.op_read({"file_path": str(ws / "a/b/c.txt"), "view_range": [2, 2]}) == {"text": "world"}
    assert t.op_read({"file_path": "a/b/c.txt", "view_range": [2, -1]}) == {"text": "world\n"}
    assert t.op_edit({"file_path": "a/b/c.txt", "old_string": "world", "new_string": "there"}) == \
        {"text": "edited a/b/c.txt (1 replacement(s))"}
    t.op_write({"file_path": "dup.txt", "content": "x x x"})
    fails(t.op_edit, {"file_path": "dup.txt", "old_string": "x", "new_string": "y"}, match="appears 3 times")
    assert t.op_edit({"file_path": "dup.txt", "old_string": "x", "new_string": "y", "replace_all": True}) == \
        {"text": "edited dup.txt (3 replacement(s))"}
    fails(t.op_edit, {"file_path": "dup.txt", "old_string": "zzz", "new_string": "y"}, match="old_string not found")
    fails(t.op_read, {"file_path": "missing.txt"}, match="no such file or directory")


def test_read_limits_and_binary(t: ModuleType, ws: Path) -> None:
    big = "".join(f"line {i}\n" for i in range(60_000))  # ~530 KiB
    (ws / "big.txt").write_text(big)
    fails(t.op_read, {"file_path": "big.txt"}, match="exceeds 262144-byte limit. Use the view_range parameter")
    assert t.op_read({"file_path": "big.txt", "view_range": [10, 12]}) == {"text": "line 9\nline 10\nline 11"}
    fails(t.op_read, {"file_path": "big.txt", "view_range": [1, 0]}, match="exceeds 262144-byte limit")
    fails(t.op_edit, {"file_path": "big.txt", "old_string": "line 1", "new_string": "x"}, match="cannot modify a file this large")
    (ws / "bin.dat").write_bytes(b"\xff\xfe\x00garbage")
    fails(t.op_read, {"file_path": "bin.dat"}, match="not valid UTF-8 text")
    (ws / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    blocks = t.op_read({"file_path": "img.png"})["blocks"]
    assert blocks[0]["type"] == "image" and blocks[0]["source"]["media_type"] == "image/png"
    fails(t.op_read, {"file_path": "img.png", "view_range": [1, 2]}, match="not supported for image/PDF")


# ------------------------------------------------------------------ glob / grep

def test_glob_doublestar_newest_first_confined(t: ModuleType, ws: Path, tmp_path: Path) -> None:
    for i, p in enumerate(["a.py", "src/b.py", "src/deep/c.py", "src/deep/d.txt"]):
        f = ws / p
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x")
        os.utime(f, (1000 + i, 1000 + i))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "evil.py").write_text("x")
    os.symlink(tmp_path / "out", ws / "link")
    os.symlink(tmp_path / "out" / "evil.py", ws / "src" / "evil_link.py")
    out = t.op_glob({"pattern": "**/*.py"})["text"].splitlines()
    assert out == [str(ws / "src/deep/c.py"), str(ws / "src/b.py"), str(ws / "a.py")]
    assert t.op_glob({"pattern": "*.py", "path": "src"})["text"] == str(ws / "src/b.py")
    assert t.op_glob({"pattern": "src/{deep/*.txt,b.py}"})["text"].splitlines() == \
        [str(ws / "src/deep/d.txt"), str(ws / "src/b.py")]
    assert t.op_glob({"pattern": "*.nothing"}) == {"text": "no matches"}


def test_glob_results_and_walk_are_capped(t: ModuleType, ws: Path) -> None:
    for i in range(250):
        (ws / f"f{i}.txt").write_text("")
    assert len(t.op_glob({"pattern": "*.txt"})["text"].splitlines()) == 200


@pytest.mark.parametrize("use_rg", [True, False], ids=["ripgrep", "fallback"])
def test_grep(t: ModuleType, ws: Path, use_rg: bool) -> None:
    if use_rg and t._find_rg(str(ws)) is None:
        pytest.skip("ripgrep not installed on this host (the sandbox image has it)")
    (ws / "a.txt").write_text("alpha\nbeta\ngamma\n")
    (ws / "sub").mkdir()
    (ws / "sub" / "b.txt").write_text("alphabet\n")
    out = t.op_grep({"pattern": "alph", "_rg": use_rg})["text"]
    assert f"{ws}/a.txt:1:alpha" in out and f"{ws}/sub/b.txt:1:alphabet" in out
    assert t.op_grep({"pattern": "zeta", "_rg": use_rg}) == {"text": "no matches"}
    fails(t.op_grep, {"pattern": "(unclosed", "_rg": use_rg}, match="grep: invalid regex")
    fails(t.op_grep, {"pattern": "", "_rg": use_rg}, match="pattern must not be empty")


def test_grep_output_is_capped(t: ModuleType, ws: Path) -> None:
    (ws / "many.txt").write_text("match this line please\n" * 20_000)
    out = t.op_grep({"pattern": "match"})["text"]
    assert out.endswith("[output truncated at 102400 bytes]")
    assert len(out.encode()) < 102400 + 200


# ------------------------------------------------------------------ bash

def test_bash_is_persistent_and_reports_exit_codes(t: ModuleType, ws: Path) -> None:
    assert t.op_bash({"command": "cd sub 2>/dev/null || mkdir sub && cd sub; export X=42; echo hi"})["output"] == "hi"
    r = t.op_bash({"command": "pwd; echo $X; echo err >&2; exit_code_test() { return 3; }; exit_code_test"})
    assert r == {"output": f"{ws}/sub\n42\nerr", "exit_code": 3, "truncated": False}
    assert t.op_bash({"command": "cat"})["exit_code"] == 0  # stdin is /dev/null: no hang
    assert t.op_bash({"command": "printf '\\033[31mred\\033[0m'"})["output"] == "red"


def test_bash_sentinel_cannot_be_spoofed(t: ModuleType) -> None:
    r = t.op_bash({"command": "echo __ANT_CMD_deadbeef_DONE__0; echo still here; false"})
    assert r["exit_code"] == 1 and "still here" in r["output"]


def test_bash_output_keeps_the_last_100k(t: ModuleType) -> None:
    r = t.op_bash({"command": "seq 1 200000"})
    assert r["truncated"] and r["output"].startswith("[output truncated]\n")
    assert r["output"].endswith("\n200000")
    assert len(r["output"].encode()) <= 100 * 1024 + 40


def test_bash_timeout_kills_and_restarts_the_shell(t: ModuleType, ws: Path) -> None:
    t.op_bash({"command": "export KEEP=1"})
    started = time.monotonic()
    fails(t.op_bash, {"command": "sleep 30 & wait", "timeout_ms": 300}, match="bash: bash command timed out after 0.3s")
    assert time.monotonic() - started < 5
    r = t.op_bash({"command": "echo ${KEEP:-fresh}"})
    assert r["output"] == "fresh"  # a new shell: the timed-out command cannot bleed into it
    t.op_bash({"command": "export KEEP=2"})
    assert t.op_bash({"restart": True})["output"] == "bash session restarted"
    assert t.op_bash({"command": "echo ${KEEP:-fresh}"})["output"] == "fresh"
