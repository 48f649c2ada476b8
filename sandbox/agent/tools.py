"""The built-in agent tools, executed INSIDE the sandbox by the agent.

STDLIB ONLY: this file is copied into the sandbox image and runs with the
image's python3 as the sandbox uid. It mirrors the reference toolset of the
official SDK (`anthropic.lib.tools.agent_toolset`: `bash`, `read`, `write`,
`edit`, `glob`, `grep`), with the same limits and error texts, so a model sees
the same behaviour whether its hands run on a host or here.

`OPS` maps an op name to `fn(req) -> JSON value`; the agent runs each request in
its own thread and turns a raised exception into an error result. Expected
failures raise `ToolFailure` (the host strips the class name); anything else is
a bug and keeps its type name.

Path confinement: every path is resolved here, inside the sandbox, with every
symlink followed (the leaf too, even a dangling one) and refused unless it lies
in the workspace (`$HOME`, else /workspace). The file is then opened component
by component from the workspace root with O_NOFOLLOW, so a symlink swapped in
after the check (code in the sandbox can race us) makes the open fail instead of
escaping. The workspace boundary is a convenience for the model, not the
security boundary: that is the sandbox itself.
"""

from __future__ import annotations

import base64
import errno
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import threading
import time

import reaper  # PID 1's child registry: the reaper leaves these children to us

BASH_OUTPUT_LIMIT = 100 * 1024
BASH_DEFAULT_TIMEOUT = 120.0
MAX_FILE_BYTES = 256 * 1024
MAX_IMAGE_BASE64_BYTES = 5 * 1024 * 1024
# The reference allows 20 MiB PDFs; one agent event must stay under the host
# channel's 16 MiB line cap after base64 (4/3) and JSON framing.
MAX_PDF_BYTES = 11 * 1024 * 1024
BINARY_MEDIA_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".pdf": "application/pdf",
}
GREP_OUTPUT_LIMIT = 100 * 1024
GREP_MAX_LINE_LENGTH = 2000
GREP_TIMEOUT = 30.0
GLOB_RESULT_LIMIT = 200
WALK_MAX_ENTRIES = 50_000
MAX_SHELLS = 8
MAX_SYMLINK_HOPS = 40
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class ToolFailure(Exception):
    """An expected tool failure; its message is what the model reads."""


# ------------------------------------------------------------------ paths

def workspace_root() -> str:
    return os.path.realpath(os.environ.get("HOME") or "/workspace")


def _fs_reason(e: OSError) -> str:
    """The reference's wording for filesystem errors (never a raw errno dump)."""
    if isinstance(e, FileNotFoundError):
        return "no such file or directory"
    if isinstance(e, NotADirectoryError):
        return "not a directory"
    if isinstance(e, IsADirectoryError):
        return "is a directory"
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, FileExistsError):
        return "file already exists"
    if e.errno == errno.ELOOP:
        return "too many levels of symbolic links"
    if e.errno == errno.ENOSPC:
        return "no space left on device"
    if e.errno == errno.EFBIG:
        return "file too large"
    return (e.strerror or "i/o error").lower()


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def canonicalize(path: str) -> str:
    """`path` with `.`/`..` collapsed and every symlink followed, missing tail kept.

    Same outcome as the reference's `_canonicalize`: a new file under new
    directories still resolves, a dangling symlink is followed by hand, and more
    than MAX_SYMLINK_HOPS hops count as a loop.
    """
    prefix = os.path.normpath(path)
    tail: list[str] = []
    hops = 0
    while True:
        try:
            real = os.path.realpath(prefix, strict=True)
            return os.path.join(real, *reversed(tail)) if tail else real
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR):
                raise
            unresolved = e
        try:
            is_link = stat.S_ISLNK(os.lstat(prefix).st_mode)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR) or os.path.dirname(prefix) == prefix:
                raise
            tail.append(os.path.basename(prefix))
            prefix = os.path.dirname(prefix)
            continue
        if not is_link:
            raise unresolved
        hops += 1
        if hops > MAX_SYMLINK_HOPS:
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
        parent = os.path.realpath(os.path.dirname(prefix), strict=True)
        prefix = os.path.normpath(os.path.join(parent, os.readlink(prefix), *reversed(tail)))
        tail.clear()


def resolve(p: object, op: str, root: str) -> str:
    """Resolve a model-supplied path against the workspace; refuse one that escapes it."""
    if not isinstance(p, str) or not p:
        raise ToolFailure(f"{op}: file_path must be a non-empty string")
    if "\x00" in p:
        raise ToolFailure(f"{op}: path contains a NUL byte")
    if len(p.encode("utf-8", "replace")) > 4096:
        raise ToolFailure(f"{op}: path is longer than 4096 bytes")
    candidate = p if os.path.isabs(p) else os.path.join(root, p)
    try:
        full = canonicalize(candidate)
    except OSError as e:
        raise ToolFailure(f"{op}: path {p!r}: {_fs_reason(e)}") from None
    if not _within(full, root):
        raise ToolFailure(f"{op}: path {p!r} is outside the session's working directory")
    return full


def _open_beneath(root: str, full: str, flags: int, mode: int = 0o644, make_parents: bool = False) -> int:
    """Open `full` (canonical, inside `root`) walking from `root` with O_NOFOLLOW at every step."""
    rel = os.path.relpath(full, root)
    parts = [] if rel == "." else rel.split("/")
    fd = os.open(root, _DIR_FLAGS)
    try:
        if not parts:
            return os.dup(fd) if flags & (os.O_WRONLY | os.O_RDWR) == 0 else _raise_isdir()
        for part in parts[:-1]:
            try:
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not make_parents:
                    raise
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)
    finally:
        os.close(fd)


def _raise_isdir() -> int:
    raise IsADirectoryError(errno.EISDIR, "is a directory")


def _open_regular_for_read(root: str, full: str, op: str, file_path: str) -> tuple[int, os.stat_result]:
    """O_NONBLOCK so a FIFO cannot hang the open; anything but a regular file is refused."""
    try:
        fd = _open_beneath(root, full, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise ToolFailure(f"{op}: {file_path}: {_fs_reason(e)}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ToolFailure(f"{op}: {file_path}: not a regular file")
    return fd, st


def _read_all(fd: int, limit: int | None = None) -> bytes:
    chunks = []
    total = 0
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if limit is not None and total > limit:
            return b"".join(chunks)  # caller re-checks the size: the file grew under us


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _str_arg(req: dict, name: str, op: str, *, required: bool = True, limit: int | None = None) -> str | None:
    value = req.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise ToolFailure(f"{op}: {name} must be a string")
    if limit is not None and len(value) > limit:
        raise ToolFailure(f"{op}: {name} is {len(value)} characters, over the {limit}-character limit")
    return value


# ------------------------------------------------------------------ read

def _line_range(fd: int, file_path: str, start_line: int, end_line: int, limit: int) -> str:
    """Lines [start_line, end_line] (1-indexed, inclusive; end <= 0 = EOF), streamed, capped at `limit`."""
    start = max(0, start_line - 1)
    end = end_line if end_line > 0 else 1 << 62
    if end <= start:
        return ""
    out = bytearray()
    line = 0
    while line < end:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        pos = 0
        while pos < len(chunk) and line < end:
            nl = chunk.find(b"\n", pos)
            stop = len(chunk) if nl < 0 else nl
            if line >= start:
                out += chunk[pos:stop]
                if nl >= 0 and line + 1 < end:
                    out += b"\n"
                if len(out) > limit:
                    if end - start == 1:
                        raise ToolFailure(
                            f"read: line {start + 1} of {file_path} alone exceeds {limit}-byte limit. "
                            "The read tool cannot return part of a line, so view_range cannot narrow this further."
                        )
                    raise ToolFailure(
                        f"read: view_range [{start_line}, {end_line}] of {file_path} exceeds {limit}-byte limit. "
                        "Narrow the view_range to read a smaller portion."
                    )
            if nl < 0:
                break
            line += 1
            pos = nl + 1
    try:
        return bytes(out).decode("utf-8")
    except UnicodeDecodeError:
        raise ToolFailure(
            f"read: {file_path}: not valid UTF-8 text (binary files are only supported for image/PDF extensions)"
        ) from None


def _view_range(req: dict) -> list[int] | None:
    vr = req.get("view_range")
    if vr is None or vr == []:
        return None
    if not isinstance(vr, list) or len(vr) != 2:
        raise ToolFailure("read: view_range must be [start_line, end_line]")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in vr):
        raise ToolFailure("read: view_range must be two integers [start_line, end_line]")
    return vr


def op_read(req: dict) -> dict:
    root = workspace_root()
    file_path = _str_arg(req, "file_path", "read")
    assert file_path is not None
    full = resolve(file_path, "read", root)
    view_range = _view_range(req)
    fd, st = _open_regular_for_read(root, full, "read", file_path)
    try:
        media_type = BINARY_MEDIA_TYPES.get(os.path.splitext(full)[1].lower())
        if media_type is not None:
            if view_range:
                raise ToolFailure("read: view_range is not supported for image/PDF files")
            limit = MAX_PDF_BYTES if media_type == "application/pdf" else (MAX_IMAGE_BASE64_BYTES // 4) * 3
            if st.st_size > limit:
                raise ToolFailure(f"read: {file_path} is {st.st_size} bytes, exceeds {limit}-byte limit for image/PDF files.")
            data = _read_all(fd, limit)
            if len(data) > limit:
                raise ToolFailure(f"read: {file_path} is over {limit} bytes, exceeds {limit}-byte limit for image/PDF files.")
            encoded = base64.standard_b64encode(data).decode("ascii")
            kind = "document" if media_type == "application/pdf" else "image"
            return {"blocks": [{"type": kind, "source": {"type": "base64", "media_type": media_type, "data": encoded}}]}
        if st.st_size > MAX_FILE_BYTES:
            if not view_range:
                raise ToolFailure(
                    f"read: {file_path} is {st.st_size} bytes, exceeds {MAX_FILE_BYTES}-byte limit. "
                    "Use the view_range parameter to read specific line ranges, e.g. view_range: [1, 500]."
                )
            return {"text": _line_range(fd, file_path, view_range[0], view_range[1], MAX_FILE_BYTES)}
        raw = _read_all(fd, MAX_FILE_BYTES)
        if len(raw) > MAX_FILE_BYTES:
            raise ToolFailure(f"read: {file_path} grew past the {MAX_FILE_BYTES}-byte limit while being read")
    finally:
        os.close(fd)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ToolFailure(
            f"read: {file_path}: not valid UTF-8 text (binary files are only supported for image/PDF extensions)"
        ) from None
    if not view_range:
        return {"text": text}
    lines = text.split("\n")
    start = max(0, view_range[0] - 1)
    end = view_range[1] if view_range[1] > 0 else len(lines)
    return {"text": "\n".join(lines[start:end])}


# ------------------------------------------------------------------ write / edit

def _write_file(root: str, full: str, data: bytes, op: str, file_path: str, make_parents: bool) -> None:
    # No O_TRUNC at open: a FIFO or device must be refused before anything is done to it.
    try:
        fd = _open_beneath(root, full, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK, 0o644, make_parents=make_parents)
    except OSError as e:
        if e.errno == errno.ENXIO:
            raise ToolFailure(f"{op}: {file_path}: not a regular file") from None
        raise ToolFailure(f"{op}: {file_path}: {_fs_reason(e)}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ToolFailure(f"{op}: {file_path}: not a regular file")
        os.ftruncate(fd, 0)
        _write_all(fd, data)
    except OSError as e:
        raise ToolFailure(f"{op}: {file_path}: {_fs_reason(e)}") from None
    finally:
        os.close(fd)


def _utf8(text: str, op: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise ToolFailure(f"{op}: content is not valid Unicode text (it holds a lone surrogate)") from None


def op_write(req: dict) -> dict:
    root = workspace_root()
    file_path = _str_arg(req, "file_path", "write")
    content = _str_arg(req, "content", "write")
    assert file_path is not None and content is not None
    full = resolve(file_path, "write", root)
    data = _utf8(content, "write")
    _write_file(root, full, data, "write", file_path, make_parents=True)
    return {"text": f"wrote {len(data)} bytes to {file_path}"}


def op_edit(req: dict) -> dict:
    root = workspace_root()
    file_path = _str_arg(req, "file_path", "edit")
    old = _str_arg(req, "old_string", "edit")
    new = _str_arg(req, "new_string", "edit")
    assert file_path is not None and old is not None and new is not None
    replace_all = req.get("replace_all")
    if replace_all is not None and not isinstance(replace_all, bool):
        raise ToolFailure("edit: replace_all must be a boolean")
    if old == "":
        raise ToolFailure("edit: old_string must not be empty")
    full = resolve(file_path, "edit", root)
    fd, st = _open_regular_for_read(root, full, "edit", file_path)
    try:
        if st.st_size > MAX_FILE_BYTES:
            raise ToolFailure(
                f"edit: {file_path} is {st.st_size} bytes, exceeds {MAX_FILE_BYTES}-byte limit. "
                "The edit tool loads the whole file and cannot modify a file this large."
            )
        raw = _read_all(fd, MAX_FILE_BYTES)
    finally:
        os.close(fd)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ToolFailure(f"edit: {file_path}: not valid UTF-8 text (cannot edit binary files)") from None
    count = text.count(old)
    if count == 0:
        raise ToolFailure(f"edit: old_string not found in {file_path}")
    if not replace_all and count > 1:
        raise ToolFailure(f"edit: old_string appears {count} times in {file_path} (must be unique)")
    updated = text.replace(old, new) if replace_all else text.replace(old, new, 1)
    _write_file(root, full, _utf8(updated, "edit"), "edit", file_path, make_parents=False)
    return {"text": f"edited {file_path} ({count if replace_all else 1} replacement(s))"}


# ------------------------------------------------------------------ glob

def _split_braces(pattern: str) -> list[str]:
    """Expand one level of `{a,b}` at a time (doublestar syntax), bounded."""
    out = [pattern]
    for _ in range(8):
        nxt: list[str] = []
        changed = False
        for p in out:
            m = re.search(r"\{([^{}]*)\}", p)
            if m is None:
                nxt.append(p)
                continue
            changed = True
            for alt in m.group(1).split(","):
                nxt.append(p[: m.start()] + alt + p[m.end():])
        out = nxt[:256]
        if not changed:
            break
    return out


def _segment_regex(seg: str) -> str:
    out = []
    i = 0
    while i < len(seg):
        c = seg[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = seg.find("]", i + 1)
            if j < 0:
                out.append(re.escape(c))
            else:
                body = seg[i + 1 : j]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def glob_regex(pattern: str) -> re.Pattern[str]:
    """Doublestar glob -> regex over '/'-separated relative paths (`**` spans directories)."""
    alts = []
    for pat in _split_braces(pattern):
        parts = [p for p in pat.split("/") if p not in ("", ".")]
        rx = ""
        for k, seg in enumerate(parts):
            last = k == len(parts) - 1
            if seg == "**":
                rx += "(?:.*)" if last else "(?:[^/]+/)*"
            else:
                rx += _segment_regex(seg) + ("" if last else "/")
        alts.append(rx)
    return re.compile("^(?:" + "|".join(alts) + ")$", re.DOTALL)


def op_glob(req: dict) -> dict:
    root = workspace_root()
    pattern = _str_arg(req, "pattern", "glob", limit=4096)
    assert pattern is not None
    if pattern.startswith("/"):
        raise ToolFailure("glob: absolute pattern not permitted; pass a relative pattern (and optionally path)")
    if ".." in pattern.split("/"):
        raise ToolFailure("glob: '..' is not permitted in the pattern")
    if not pattern.strip():
        raise ToolFailure("glob: pattern must not be empty")
    path = _str_arg(req, "path", "glob", required=False)
    base = resolve(path, "glob", root) if path else root
    if not os.path.isdir(base):
        raise ToolFailure(f"glob: {path}: not a directory")
    try:
        rx = glob_regex(pattern)
    except re.error as e:
        raise ToolFailure(f"glob: invalid pattern: {e}") from None
    matches: list[tuple[float, str]] = []
    seen = 0
    stack = [""]
    while stack and seen < WALK_MAX_ENTRIES:
        rel_dir = stack.pop()
        try:
            it = os.scandir(os.path.join(base, rel_dir) if rel_dir else base)
        except OSError:
            continue
        with it:
            for entry in it:
                seen += 1
                if seen > WALK_MAX_ENTRIES:
                    break
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                try:
                    is_link = entry.is_symlink()
                    is_dir = entry.is_dir(follow_symlinks=False)
                except OSError:
                    continue
                if is_dir and not is_link:
                    stack.append(rel)  # never descend through a symlink
                if rx.match(rel):
                    full = os.path.join(base, rel)
                    if is_link:
                        # A symlink is listed only when what it points at is in the workspace.
                        try:
                            if not _within(os.path.realpath(full, strict=True), root):
                                continue
                        except OSError:
                            continue
                    try:
                        mtime = os.lstat(full).st_mtime
                    except OSError:
                        mtime = 0.0
                    matches.append((mtime, full))
    if not matches:
        return {"text": "no matches"}
    matches.sort(key=lambda m: m[0], reverse=True)
    return {"text": "\n".join(m[1] for m in matches[:GLOB_RESULT_LIMIT])}


# ------------------------------------------------------------------ grep

def _find_rg(root: str) -> str | None:
    for entry in os.environ.get("PATH", "/usr/bin:/bin").split(":"):
        if not entry.startswith("/"):
            continue
        cand = os.path.join(entry, "rg")
        if os.access(cand, os.X_OK):
            real = os.path.realpath(cand)
            if not _within(real, root) and not real.startswith("/tmp"):
                return cand  # never a binary the sandboxed code could have planted
    return None


def _run_capped(argv: list[str], limit: int, timeout: float) -> tuple[int, bytes, bytes, bool]:
    """Run argv; keep at most `limit` bytes of stdout (then kill it), stderr capped at 8 KiB."""
    proc = reaper.spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, close_fds=True)
    out = bytearray()
    err = bytearray()
    truncated = False
    deadline = time.monotonic() + timeout
    streams = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}  # type: ignore[union-attr]
    try:
        while streams:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _killpg(proc.pid)
                raise ToolFailure(f"grep: timed out after {timeout:.0f}s")
            ready, _, _ = select.select(list(streams), [], [], min(remaining, 1.0))
            for fd in ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    del streams[fd]
                    continue
                buf = streams[fd]
                cap = limit + 1 if buf is out else 8192
                buf += chunk[: max(0, cap - len(buf))]
                if buf is out and len(out) > limit:
                    truncated = True
                    _killpg(proc.pid)
                    streams = {}
                    break
    finally:
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
    code = proc.wait()
    return code, bytes(out), bytes(err), truncated


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _walk_grep(rx: re.Pattern[str], search: str) -> str:
    """Fallback without ripgrep: skips .git, node_modules, symlinks, binaries and long lines (ReDoS guard)."""
    hits: list[str] = []
    budget = GREP_OUTPUT_LIMIT
    deadline = time.monotonic() + GREP_TIMEOUT

    def scan(full: str) -> bool:
        nonlocal budget
        try:
            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return True
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode) or b"\x00" in f.read(512):
                return True
            f.seek(0)
            for i, raw in enumerate(f, 1):
                if time.monotonic() > deadline:
                    raise ToolFailure(f"grep: timed out after {GREP_TIMEOUT:.0f}s")
                if len(raw) > GREP_MAX_LINE_LENGTH:
                    continue
                line = raw.decode(errors="replace").rstrip("\r\n")
                if rx.search(line):
                    entry = f"{full}:{i}:{line}"
                    budget -= len(entry) + 1
                    if budget < 0:
                        hits.append(f"[output truncated at {GREP_OUTPUT_LIMIT} bytes]")
                        return False
                    hits.append(entry)
        return True

    if os.path.isfile(search):
        scan(search)
    else:
        seen = 0
        for dirpath, dirnames, filenames in os.walk(search):
            dirnames[:] = [d for d in dirnames if d not in (".git", "node_modules")
                           and not os.path.islink(os.path.join(dirpath, d))]
            for name in filenames:
                seen += 1
                if seen > WALK_MAX_ENTRIES or not scan(os.path.join(dirpath, name)):
                    return "\n".join(hits) if hits else "no matches"
    return "\n".join(hits) if hits else "no matches"


def op_grep(req: dict) -> dict:
    root = workspace_root()
    pattern = _str_arg(req, "pattern", "grep", limit=65536)
    assert pattern is not None
    if pattern == "":
        raise ToolFailure("grep: pattern must not be empty")
    path = _str_arg(req, "path", "grep", required=False)
    search = resolve(path, "grep", root) if path else root
    if not os.path.exists(search):
        raise ToolFailure(f"grep: {path}: no such file or directory")
    rg = req.get("_rg", True) and _find_rg(root)
    if rg:
        code, out, err, truncated = _run_capped([rg, "--no-config", "-n", "--no-heading", "-e", pattern, "--", search],
                                                GREP_OUTPUT_LIMIT, GREP_TIMEOUT)
        if code == 1 and not out:
            return {"text": "no matches"}
        if truncated:
            text = out[:GREP_OUTPUT_LIMIT].decode(errors="replace")
            return {"text": text + f"\n[output truncated at {GREP_OUTPUT_LIMIT} bytes]"}
        if code not in (0, 1):
            msg = err.decode(errors="replace").strip()
            if "regex parse error" in msg or "error parsing regex" in msg.lower():
                raise ToolFailure(f"grep: invalid regex: {msg}")
            raise ToolFailure(f"grep: rg failed: {msg or f'exit status {code}'}")
        return {"text": out.decode(errors="replace")}
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ToolFailure(f"grep: invalid regex: {e}") from None
    return {"text": _walk_grep(rx, search)}


# ------------------------------------------------------------------ bash

class Shell:
    """One persistent `/bin/bash --noprofile --norc`; cwd, variables and jobs survive across calls."""

    def __init__(self, cwd: str) -> None:
        env = dict(os.environ)
        env.update({"PS1": "", "PS2": "", "TERM": "dumb"})
        self.proc = reaper.spawn(
            ["/bin/bash", "--noprofile", "--norc"], cwd=cwd, env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
        )
        self.lock = threading.Lock()

    @property
    def closed(self) -> bool:
        return self.proc.poll() is not None

    def close(self) -> None:
        # The whole process group: background jobs of the timed-out command go too.
        _killpg(self.proc.pid)
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()  # type: ignore[union-attr]
            except OSError:
                pass

    def run(self, cmd: str, timeout: float) -> dict:
        # Per-call nonce so output cannot spoof the exit-code framing; the '' split keeps
        # the literal out of what we write, only the shell's printf reassembles it.
        sentinel = f"__ANT_CMD_{os.urandom(16).hex()}_DONE__"  # uuid4().hex without uuid (0.2 MiB)
        split = f"{sentinel[:8]}''{sentinel[8:]}"
        wrapped = f"{{ {cmd}\n}} </dev/null 2>&1; printf '\\n{split}%d\\n' $?\n"
        try:
            self.proc.stdin.write(wrapped.encode("utf-8", "replace"))  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
        except OSError:
            raise ToolFailure("bash: bash session terminated; restart required") from None
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        marker = sentinel.encode()
        buf = bytearray()
        truncated = False
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            ready, _, _ = select.select([fd], [], [], min(remaining, 1.0))
            if not ready:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break  # the shell exited (e.g. `exit`)
            buf += chunk
            if len(buf) > BASH_OUTPUT_LIMIT + len(marker) + 32:
                # Keep only the tail: the sentinel stays detectable and memory bounded.
                del buf[: len(buf) - (BASH_OUTPUT_LIMIT + len(marker) + 32)]
                truncated = True
            # Only the new bytes (plus room for a marker split across reads) need scanning.
            window = bytes(buf[-(len(chunk) + len(marker) + 40):])
            idx = window.rfind(marker)
            if idx >= 0 and window.find(b"\n", idx) >= 0:
                break
        text = _ANSI.sub("", buf.decode("utf-8", errors="replace"))
        idx = text.rfind(sentinel)
        if idx < 0:
            out, code = text.strip(), -1
        else:
            out = text[:idx].rstrip("\n")
            tail = text[idx + len(sentinel):].strip()
            try:
                code = int(tail.splitlines()[0]) if tail else -1
            except ValueError:
                code = -1
        encoded = out.encode()
        if len(encoded) > BASH_OUTPUT_LIMIT:
            out = encoded[-BASH_OUTPUT_LIMIT:].decode("utf-8", errors="replace")
            truncated = True
        if truncated:
            out = "[output truncated]\n" + out
        return {"output": out, "exit_code": code, "truncated": truncated}


_shells: dict[str, Shell] = {}
_shells_lock = threading.Lock()


def _shell(shell_id: str, root: str, fresh: bool = False) -> Shell:
    with _shells_lock:
        sh = _shells.get(shell_id)
        if sh is not None and (fresh or sh.closed):
            sh.close()
            sh = None
            del _shells[shell_id]
        if sh is None:
            if len(_shells) >= MAX_SHELLS:
                raise ToolFailure(f"bash: at most {MAX_SHELLS} shells per sandbox")
            sh = _shells[shell_id] = Shell(root)
        return sh


def op_bash(req: dict) -> dict:
    root = workspace_root()
    shell_id = req.get("shell") or "default"
    if not isinstance(shell_id, str) or len(shell_id) > 64:
        raise ToolFailure("bash: shell id must be a string of at most 64 characters")
    restart = req.get("restart")
    if restart is not None and not isinstance(restart, bool):
        raise ToolFailure("bash: restart must be a boolean")
    if restart:
        _shell(shell_id, root, fresh=True)
        return {"output": "bash session restarted", "exit_code": 0, "truncated": False}
    command = req.get("command")
    if command is not None and not isinstance(command, str):
        raise ToolFailure("bash: command must be a string")
    if not command:
        raise ToolFailure("bash: command is required")
    timeout_ms = req.get("timeout_ms")
    if timeout_ms is not None and (not isinstance(timeout_ms, (int, float)) or isinstance(timeout_ms, bool)
                                   or timeout_ms < 0):
        raise ToolFailure("bash: timeout_ms must be a non-negative number")
    timeout = timeout_ms / 1000.0 if timeout_ms else BASH_DEFAULT_TIMEOUT
    max_timeout = req.get("_max_timeout")
    if isinstance(max_timeout, (int, float)) and max_timeout > 0:
        timeout = min(timeout, float(max_timeout))
    sh = _shell(shell_id, root)
    with sh.lock:
        try:
            return sh.run(command, timeout)
        except TimeoutError:
            # Kill and forget the shell: the timed-out command must not bleed into the next call.
            with _shells_lock:
                if _shells.get(shell_id) is sh:
                    del _shells[shell_id]
            sh.close()
            raise ToolFailure(f"bash: bash command timed out after {timeout}s") from None


# ------------------------------------------------------------------ probe

def op_tools_probe(req: dict) -> dict:
    """Which tools and helpers this sandbox has (the worker checks it once per sandbox)."""
    root = workspace_root()
    return {"root": root, "rg": _find_rg(root), "bash": shutil.which("bash") is not None}


OPS = {
    "bash": op_bash,
    "read": op_read,
    "write": op_write,
    "edit": op_edit,
    "glob": op_glob,
    "grep": op_grep,
    "tools_probe": op_tools_probe,
}
