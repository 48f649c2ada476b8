"""The Python API: open a sandbox, run commands in it, read and write its files, close it.

    import sandbox

    with sandbox.open(profile="default", workspace="./project") as sb:
        r = sb.exec(["python3", "-c", "print(6 * 7)"])
        assert r.exit_code == 0 and r.stdout == b"42\\n"
        sb.write_file("data.bin", b"\\x00\\x01")
        assert sb.read_file("data.bin") == b"\\x00\\x01"

Or without a ``with`` block (E2B style)::

    sb = sandbox.Sandbox.create(profile="default")
    try:
        ...
    finally:
        sb.close()

Every failure of the sandbox itself raises a :class:`SandboxError` subclass; a
command that fails or hits a limit is a :class:`Result` (``check=True`` turns it
into :class:`CommandFailed` / :class:`LimitExceeded`), as with ``subprocess.run``.
Environment variables and timeouts given here pass the same validation as a
policy file's ``env:`` and ``timeouts.call_s``. The ``sandbox exec`` command is
built on this module.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

from sandbox import errors as _errors
from sandbox import policycache as _cache
from sandbox import runtime as _rt
from sandbox.runtime import SandboxError

if TYPE_CHECKING:
    from sandbox import policy as _policy

__all__ = [
    "open",
    "Sandbox",
    "Result",
    "SandboxError",
    "PolicyError",
    "EngineUnavailable",
    "ImageMissing",
    "WorkspaceError",
    "SandboxStopped",
    "LimitExceeded",
    "CommandFailed",
    "LIMIT_EXIT_CODES",
    "SANDBOX_ERROR_EXIT",
]

LIMIT_EXIT_CODES: dict[str, int] = dict(_rt.LIMIT_EXIT_CODES)
SANDBOX_ERROR_EXIT: int = _rt.SANDBOX_ERROR_EXIT
LimitName = Literal["timeout", "memory", "pids", "output", "fsize", "cpu"]
Argv = Sequence[str] | str
Stdin = bytes | bytearray | memoryview | str | BinaryIO | None
OutputCallback = Callable[[int, bytes], None]
DEFAULT_READ_MAX = 64 << 20


# ------------------------------------------------------------------ exceptions
# SandboxError (re-exported from sandbox.runtime, so errors the runtime raises directly are
# caught by `except sandbox.SandboxError` too) is the base of everything below.

class PolicyError(SandboxError, _errors.PolicyError):
    """A profile, or an env/timeout given to the API, is invalid. ``problems``: (source, key, reason)."""

    def __init__(self, problems: list[tuple[str, str, str]]):
        _errors.PolicyError.__init__(self, problems)


class EngineUnavailable(SandboxError):
    """The Docker engine cannot be reached (or is not a local unix socket)."""


class ImageMissing(SandboxError):
    """The policy's image is not built (``sandbox images build``)."""


class WorkspaceError(SandboxError, ValueError):
    """The host workspace directory is missing, not a directory, or may never be mounted."""


class SandboxStopped(SandboxError):
    """The sandbox is closed, or stopped (its agent died, or its session time ran out)."""


class CommandFailed(SandboxError):
    """``exec(..., check=True)``: the command exited non-zero. ``result`` holds its output."""

    def __init__(self, result: Result, argv: list[str]):
        self.result = result
        self.argv = argv
        super().__init__(f"command {argv[0]!r} exited with status {result.exit_code}")


class LimitExceeded(CommandFailed):
    """``exec(..., check=True)``: a limit stopped the command (``result.limit`` says which)."""

    def __init__(self, result: Result, argv: list[str]):
        CommandFailed.__init__(self, result, argv)
        self.args = (f"command {argv[0]!r} stopped: {result.limit}: {result.limit_message}",)

    @property
    def limit(self) -> str:
        return self.result.limit or ""


# ------------------------------------------------------------------ result

class Result:
    """What one command did. ``limit`` names the limit that stopped it first (or None);
    ``exit_code`` is the command's own status (a killed command: 128 + signal, or 240
    when the sandbox could not run it). Immutable; equal when every field is."""

    # A plain immutable class rather than a frozen dataclass: `dataclasses` imports `inspect`,
    # ~8 ms of a cold `sandbox exec` (bench/bench_runtime.py).
    __slots__ = ("exit_code", "stdout", "stderr", "limit", "limits", "signal", "truncated", "duration", "error",
                 "argv")
    exit_code: int
    stdout: bytes
    stderr: bytes
    limit: str | None
    limits: tuple[str, ...]
    signal: int | None
    truncated: bool
    duration: float
    error: str | None
    argv: tuple[str, ...]

    def __init__(self, exit_code: int, stdout: bytes = b"", stderr: bytes = b"", limit: str | None = None,
                 limits: tuple[str, ...] = (), signal: int | None = None, truncated: bool = False,
                 duration: float = 0.0, error: str | None = None, argv: tuple[str, ...] = ()):
        for k, v in (("exit_code", exit_code), ("stdout", stdout), ("stderr", stderr), ("limit", limit),
                     ("limits", limits), ("signal", signal), ("truncated", truncated), ("duration", duration),
                     ("error", error), ("argv", argv)):
            object.__setattr__(self, k, v)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"cannot assign to field {name!r}: a Result is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}: a Result is immutable")

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, k) for k in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __reduce__(self) -> tuple[Any, ...]:  # copy and pickle
        return (type(self), self._values())

    def __repr__(self) -> str:
        return "Result(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__ if k != "argv") + ")"

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.limit is None and self.error is None

    @property
    def limit_message(self) -> str | None:
        return _rt.LIMIT_WORDS.get(self.limit) if self.limit else None

    @property
    def status(self) -> int:
        """The status ``sandbox exec`` exits with: the limit's own code, else the command's."""
        return LIMIT_EXIT_CODES[self.limit] if self.limit else self.exit_code

    @property
    def text(self) -> str:
        """stdout decoded as UTF-8 (invalid bytes replaced)."""
        return self.stdout.decode("utf-8", "replace")

    def check(self) -> Result:
        """Raise :class:`LimitExceeded` or :class:`CommandFailed` unless the command succeeded."""
        if self.limit:
            raise LimitExceeded(self, list(self.argv) or ["?"])
        if self.exit_code != 0 or self.error:
            raise CommandFailed(self, list(self.argv) or ["?"])
        return self

    def to_json(self) -> dict[str, Any]:
        return {"exit_code": self.exit_code, "status": self.status, "signal": self.signal, "limit": self.limit,
                "limits": list(self.limits), "limit_message": self.limit_message,
                "limit_exit_code": LIMIT_EXIT_CODES[self.limit] if self.limit else None,
                "truncated": self.truncated, "duration": round(self.duration, 4), "error": self.error,
                "stdout": self.stdout.decode("utf-8", "replace"), "stderr": self.stderr.decode("utf-8", "replace")}

    @classmethod
    def _from(cls, r: _rt.ExecResult, argv: list[str]) -> Result:
        return cls(exit_code=r.exit_code, stdout=r.stdout, stderr=r.stderr, limit=r.limit, limits=tuple(r.limits),
                   signal=r.signal, truncated=r.truncated, duration=r.duration, error=r.error, argv=tuple(argv))


# ------------------------------------------------------------------ validation

def load_profile(profile: str | os.PathLike[str] | _policy.Policy) -> _policy.Policy:
    """A :class:`~sandbox.policy.Policy` from a profile name, a YAML path, or a Policy."""
    from sandbox import policy as _policy

    if isinstance(profile, _policy.Policy):
        return profile
    try:
        return _policy.load_policy(os.fspath(profile))
    except _policy.PolicyError as e:
        raise PolicyError(e.problems) from None


def load_compiled(profile: str | os.PathLike[str]) -> _cache.CompiledPolicy:
    """The compiled policy of a profile name or YAML path, through the policy cache
    (:mod:`sandbox.policycache`: used only while every file it was built from is unchanged;
    otherwise loaded and validated exactly as :func:`load_profile` does)."""
    try:
        return _cache.load(os.fspath(profile))
    except _errors.PolicyError as e:
        raise PolicyError(e.problems) from None


def with_overrides(policy: _policy.Policy, *, env: Mapping[str, str] | None = None, timeout: Any = None,
                   source: str = "<api>") -> _policy.Policy:
    """A copy of ``policy`` with extra ``env`` and ``timeouts.call_s``, validated by the policy's
    own rules (a forbidden name such as ANTHROPIC_API_KEY or LD_PRELOAD, a NaN, infinite, huge,
    zero or negative timeout are refused). Errors name ``source`` and the policy key."""
    if not env and timeout is None:
        return policy
    from sandbox import policy as _policy

    data = policy.model_dump(mode="json")
    if env:
        data["env"] = {**data.get("env", {}), **dict(env)}
    if timeout is not None:
        data["timeouts"] = {**data["timeouts"], "call_s": timeout}
    try:
        return _policy.policy_from_dict(data, source=source)
    except _policy.PolicyError as e:
        raise PolicyError(e.problems) from None


def _argv(argv: Argv) -> list[str]:
    if isinstance(argv, str):
        if not argv.strip():
            raise ValueError("the command is empty")
        return ["/bin/sh", "-c", argv]
    args = list(argv)
    if not args:
        raise ValueError("the command is empty")
    for a in args:
        if not isinstance(a, str):
            raise TypeError(f"command arguments must be str, not {type(a).__name__}")
        if "\x00" in a:
            raise ValueError(f"command argument {a[:40]!r} contains a NUL byte")
    if not args[0]:
        raise ValueError("the command name is empty (an empty string was given as the program to run)")
    return args


def _stdin(data: Stdin) -> bytes | BinaryIO | None:
    if data is None or isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    if not hasattr(data, "read"):
        raise TypeError(f"stdin must be bytes, str or a binary file object, not {type(data).__name__}")
    return data  # streamed by the runtime in chunks, with flow control


def workspace_dir(workspace: str | os.PathLike[str]) -> Path:
    """Check a host workspace directory; errors name the path as it was given."""
    typed = os.fspath(workspace)
    if not typed:
        raise WorkspaceError("workspace: an empty path was given")
    p = Path(typed).expanduser()
    try:
        st = p.stat()
    except FileNotFoundError:
        raise WorkspaceError(f"workspace {typed}: no such directory") from None
    except NotADirectoryError:
        raise WorkspaceError(f"workspace {typed}: a component of the path is not a directory") from None
    except PermissionError:
        raise WorkspaceError(f"workspace {typed}: permission denied (cannot reach the directory)") from None
    except OSError as e:
        raise WorkspaceError(f"workspace {typed}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise WorkspaceError(f"workspace {typed}: not a directory")
    resolved = p.resolve()
    try:
        _rt.check_host_path(str(resolved))
    except ValueError as e:
        raise WorkspaceError(f"workspace {typed}: {e}") from None
    return resolved


def writable_by(path: Path, uid: int, gid: int) -> bool:
    """Whether uid:gid (with no supplementary groups) may create files in directory ``path``,
    by its owner and mode bits (POSIX ACLs are not consulted)."""
    st = path.stat()
    if st.st_uid == uid:
        need = stat.S_IWUSR | stat.S_IXUSR
    elif st.st_gid == gid:
        need = stat.S_IWGRP | stat.S_IXGRP
    else:
        need = stat.S_IWOTH | stat.S_IXOTH
    return st.st_mode & need == need


_ERRNO_BY_TEXT: dict[str, int] = {os.strerror(n): n for n in (
    errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ELOOP, errno.ENOSPC,
    errno.EROFS, errno.EFBIG, errno.ENAMETOOLONG, errno.EEXIST, errno.EDQUOT)}
_ERRNO_BY_TEXT["Directory nonexistent"] = errno.ENOENT  # dash: "cannot create x: Directory nonexistent"


def _file_error(op: str, path: str, r: Result) -> OSError:
    text = r.stderr.decode("utf-8", "replace").strip() or (r.error or f"exit status {r.exit_code}")
    for words, num in _ERRNO_BY_TEXT.items():
        if words in text:
            return OSError(num, f"{op}: {os.strerror(num)} (in the sandbox)", path)
    return OSError(errno.EIO, f"{op}: {text[:300]}", path)


# ------------------------------------------------------------------ sandbox

_runtimes: dict[str, _rt.Runtime] = {}
_runtimes_lock = threading.Lock()


def _runtime(owner_kind: str) -> _rt.Runtime:
    with _runtimes_lock:
        rt = _runtimes.get(owner_kind)
        if rt is None:
            try:
                rt = _rt.Runtime(owner_kind=owner_kind)
            except SandboxError as e:
                raise EngineUnavailable(str(e)) from None
            _runtimes[owner_kind] = rt
        return rt


def _typed(e: SandboxError) -> SandboxError:
    """The runtime's create errors, as the API's exception types."""
    msg = str(e)
    if isinstance(e, (PolicyError, EngineUnavailable, ImageMissing, WorkspaceError, SandboxStopped)):
        return e
    if "is not built" in msg:
        return ImageMissing(msg)
    if "cannot reach the Docker engine" in msg or "DOCKER_HOST" in msg:
        return EngineUnavailable(msg + "; run `sandbox doctor`")
    return e


class Sandbox:
    """A running sandbox. Make one with :func:`open` (a context manager) or :meth:`create`;
    :meth:`close` (or leaving the ``with`` block, also on an exception) destroys it.
    Thread-safe: several ``exec`` calls may run at once."""

    def __init__(self, inner: _rt.Sandbox, *, workspace: Path | None = None):
        self._sb = inner
        self._closed = False
        self.workspace = workspace
        self.warnings: list[str] = []

    # -------------------------------------------------------------- lifecycle

    @classmethod
    def create(cls, profile: str | os.PathLike[str] | _policy.Policy | _cache.CompiledPolicy = "default", *,
               workspace: str | os.PathLike[str] | None = None, session_id: str | None = None,
               timeout: float | None = None, env: Mapping[str, str] | None = None) -> Sandbox:
        """Start a sandbox of ``profile`` (a name, a YAML path or a Policy) and wait until it is ready.

        ``workspace``: a host directory mounted at the policy's workspace path (else the policy's
        in-memory or disk workspace). ``timeout``: the default per-command time limit in seconds
        (the policy's ``timeouts.call_s``). ``env``: extra environment for every command."""
        return _create(profile, workspace=workspace, session_id=session_id, timeout=timeout, env=env)

    def close(self, *, wait: bool = True) -> None:
        """Destroy the sandbox (idempotent); returns once every process of it is gone. ``wait=False``
        (for a process about to exit): where the engine's kill is needed (gVisor), send it without
        waiting for the answer; the sandbox's stdin closes as well, so its agent ends it too."""
        self._closed = True
        self._sb.destroy(wait=wait)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self.alive else "stopped")
        return f"<sandbox.Sandbox {self.id[:12]} session={self.session_id} profile={self.profile} {state}>"

    # -------------------------------------------------------------- facts

    @property
    def id(self) -> str:
        """The container id."""
        return self._sb.id

    @property
    def session_id(self) -> str:
        return self._sb.session_id

    @property
    def policy(self) -> _policy.Policy:
        return self._sb.policy

    @property
    def profile(self) -> str:
        return self._sb.compiled.name

    @property
    def uid(self) -> int:
        """The uid commands run as (allocated per sandbox when the policy says ``auto``)."""
        uid = getattr(self._sb, "uid", None)
        return int(uid if uid is not None else self._sb.compiled.uid)

    @property
    def gid(self) -> int:
        gid = getattr(self._sb, "gid", None)
        return int(gid if gid is not None else self._sb.compiled.gid)

    @property
    def alive(self) -> bool:
        return not self._closed and self._sb.alive

    # -------------------------------------------------------------- commands

    def _check_open(self) -> None:
        if self._closed:
            raise SandboxStopped(f"sandbox {self.id[:12]} is closed")
        if getattr(self._sb, "expired", False):
            raise SandboxStopped(f"sandbox {self.id[:12]} reached its session time limit and was destroyed")
        if not self._sb.alive:
            raise SandboxStopped(f"sandbox {self.id[:12]} has stopped")

    def exec(self, argv: Argv, *, stdin: Stdin = None, env: Mapping[str, str] | None = None,
             cwd: str | None = None, timeout: float | None = None, check: bool = False,
             on_output: OutputCallback | None = None, max_output: int | None = None) -> Result:
        """Run a command; wait for it; return its :class:`Result`.

        ``argv``: a list of arguments (no shell), or a string run by ``/bin/sh -c``.
        ``stdin``: bytes, str, or a binary file object (streamed). Without it the command's
        stdin is /dev/null. ``env``: extra variables, validated like a policy's ``env:``.
        ``timeout``: seconds, validated like ``timeouts.call_s`` (default: the policy's).
        ``on_output(fd, data)``: receive output as it arrives instead of in the Result.
        ``check``: raise :class:`LimitExceeded` / :class:`CommandFailed` instead of returning
        a failed Result. Raises :class:`SandboxStopped` when the sandbox is gone."""
        args = _argv(argv)
        self._check_open()
        extra_env: dict[str, str] | None = None
        call_timeout: float | None = None
        if env or timeout is not None:
            checked = with_overrides(self._sb.policy, env=env, timeout=timeout, source="exec()")
            extra_env = {k: checked.env[k] for k in (env or {})}
            call_timeout = checked.timeouts.call_s if timeout is not None else None
        raw = self._sb.exec(args, timeout=call_timeout, env=extra_env, cwd=cwd, stdin=_stdin(stdin),
                            max_output=max_output, on_output=on_output)
        res = Result._from(raw, args)
        if res.limit is None and res.error and not self._sb.alive:
            raise SandboxStopped(f"sandbox {self.id[:12]} stopped during the command: {res.error}")
        return res.check() if check else res

    def read_file(self, path: str, *, max_bytes: int = DEFAULT_READ_MAX) -> bytes:
        """The bytes of ``path`` in the sandbox (relative paths: from the workspace). Raises
        ``FileNotFoundError``/``PermissionError``/``IsADirectoryError``/``OSError`` as ``open()`` would,
        and :class:`SandboxError` when the file is larger than ``max_bytes``."""
        res = self.exec(["cat", "--", path], max_output=max_bytes)
        if res.limit == "output":
            raise SandboxError(f"read_file: {path} is larger than max_bytes={max_bytes}")
        if res.limit:
            res.check()
        if res.exit_code != 0:
            raise _file_error("read_file", path, res)
        return res.stdout

    def write_file(self, path: str, data: bytes | str | BinaryIO) -> None:
        """Create or replace ``path`` in the sandbox with ``data`` (bytes, str as UTF-8, or a
        binary file object), as the sandbox's user. Parent directories must exist."""
        res = self.exec(["/bin/sh", "-c", 'exec cat > "$1"', "sh", path], stdin=data)
        if res.limit:
            res.check()
        if res.exit_code != 0:
            raise _file_error("write_file", path, res)


def _create(profile: str | os.PathLike[str] | _policy.Policy | _cache.CompiledPolicy = "default", *,
            workspace: str | os.PathLike[str] | None = None, session_id: str | None = None,
            timeout: float | None = None, env: Mapping[str, str] | None = None,
            owner_kind: str = "api", env_source: str = "env", timeout_source: str = "timeout") -> Sandbox:
    policy: _policy.Policy | _cache.CompiledPolicy
    if isinstance(profile, _cache.CompiledPolicy) and not env and timeout is None:
        policy = profile
    elif isinstance(profile, (str, os.PathLike)) and not env and timeout is None:
        policy = load_compiled(profile)  # the cached fast path: same validation, same facts
    else:
        if isinstance(profile, _cache.CompiledPolicy):
            profile = profile.policy()
        policy = load_profile(profile)
        if env:
            policy = with_overrides(policy, env=env, source=env_source)
        if timeout is not None:
            policy = with_overrides(policy, timeout=timeout, source=timeout_source)
    ws = workspace_dir(workspace) if workspace is not None else None
    rt = _runtime(owner_kind)
    try:
        inner = rt.create(policy, session_id=session_id, workspace=ws)
    except SandboxError as e:
        raise _typed(e) from None
    except ValueError as e:  # a workspace path the runtime refused
        raise WorkspaceError(f"workspace {os.fspath(workspace or '')}: {e}") from None
    try:
        sb = Sandbox(inner, workspace=ws)
        if ws is not None and workspace is not None:
            _check_writable(sb, ws, os.fspath(workspace))
    except BaseException:
        inner.destroy()
        raise
    return sb


def _check_writable(sb: Sandbox, ws: Path, typed: str) -> None:
    try:
        if writable_by(ws, sb.uid, sb.gid):
            return
        st = ws.stat()
    except OSError:
        return
    sb.warnings.append(
        f"workspace {typed} (owner {st.st_uid}:{st.st_gid}, mode {stat.S_IMODE(st.st_mode):o}) is not writable by "
        f"the sandbox's uid {sb.uid}:{sb.gid}: writes to {sb._sb.compiled.workspace_path} will fail ("
        + ("the uid is allocated per sandbox: let others write (chmod o+wx), or pin user.uid/gid in a profile "
           "and give that uid access)" if sb._sb.compiled.uid == "auto" else "give that uid write access)"))


def open(profile: str | os.PathLike[str] | _policy.Policy | _cache.CompiledPolicy = "default", *,  # noqa: A001
         workspace: str | os.PathLike[str] | None = None, session_id: str | None = None,
         timeout: float | None = None, env: Mapping[str, str] | None = None) -> Sandbox:
    """Start a sandbox; use it as a context manager so it is destroyed when the block ends::

        with sandbox.open(profile="default", workspace="./project") as sb:
            print(sb.exec("ls -la").text)

    Same arguments as :meth:`Sandbox.create`."""
    return _create(profile, workspace=workspace, session_id=session_id, timeout=timeout, env=env)
