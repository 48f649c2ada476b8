"""Compiled policies, cached between processes: the fast path of a cold ``sandbox exec``.

Loading a profile means YAML, the pydantic model, libseccomp and the seccomp compiler:
about three quarters of a cold ``sandbox exec`` before anything is started. What the
runtime needs from a validated policy is plain data (:func:`sandbox.spec.policy_facts`:
the settings of the create body, the OCI seccomp profile, the digest), so that is what
is kept, in ``<state dir>/policies/``, one JSON file per profile as named.

A cached entry is only used when it provably describes what loading the profile now
would give:

- **Keyed by every file it was built from.** The fingerprint hashes the contents of every
  file the ``extends:`` chain read, of every ``.yaml`` in every directory of the profile
  search path and its ``seccomp/`` subdirectory (a new file there can change which
  profile or allowlist a name resolves to, the shipped baseline allowlist included), of
  the code that validates and compiles a policy (standing for the package version). It is
  recomputed on every use (a few small files: well under a millisecond); any difference
  and the profile is loaded and validated again from scratch.
- **Authenticated.** Each entry carries an HMAC-SHA256 under a host-side key
  (``policies/.key``, 32 random bytes, mode 0600, made on first use). An entry whose MAC
  does not verify (edited, truncated, copied from elsewhere) is not used, is reported in
  the log and replaced. Files and the directory must belong to this user and not be
  writable by group or others, or the cache is not used at all.
- **Same result.** A miss loads the profile with :func:`sandbox.policy.load_policy`
  (every check, naming file and key on error) and compiles it with
  :func:`sandbox.spec.policy_facts`, exactly as without a cache; the runtime makes the
  create body from the facts with the same function either way.

Host state that validation reads outside the profile files (the target of a symlink in a
``read_only_mounts`` source) is checked again by the runtime when it creates a sandbox.
Only the standard library is imported here; the policy model is imported on a miss.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandbox import lazylog, paths

if TYPE_CHECKING:
    from sandbox.policy import Policy

log = lazylog.get(__name__)  # logging is imported when something is logged

CACHE_VERSION = 1
MAX_ENTRY = 4 << 20
# The code whose behaviour a cached entry stands for: the loader, the model, the seccomp
# compiler, the spec's facts, the layout (search path) and this module.
_CODE_FILES = ("__init__.py", "policy.py", "policy_base.py", "seccomp.py", "spec.py", "paths.py", "policycache.py", "errors.py",
               "egress/rules.py", "egress/hosts.py")
_YAML_SUFFIXES = (".yaml", ".yml")

_lock = threading.Lock()
_memo: dict[str, tuple[str, CompiledPolicy]] = {}
_code_digest: str | None = None


class CacheUnusable(Exception):
    """The cache directory cannot be trusted (owner or mode); profiles are loaded directly."""


class CompiledPolicy:
    """A validated policy reduced to what the runtime needs (:func:`sandbox.spec.policy_facts`).

    ``policy()`` gives the full :class:`~sandbox.policy.Policy` (loaded on first use when the
    facts came from the cache; refused if the profile changed since)."""

    def __init__(self, facts: dict[str, Any], source: str | None = None, cached: bool = False,
                 sources: tuple[str, ...] = ()):
        self.facts = facts
        self.source = source      # the profile file it was loaded from (None: built from a Policy object)
        self.cached = cached      # served from the cache (for tests and benchmarks)
        self.sources = sources    # every file it was built from (cache fingerprint)
        self._policy: list[Any] = []

    def __repr__(self) -> str:
        return f"CompiledPolicy(name={self.name!r}, digest={self.digest!r}, source={self.source!r}, cached={self.cached})"

    @classmethod
    def from_policy(cls, policy: Policy) -> CompiledPolicy:
        from sandbox.spec import policy_facts

        cp = cls(policy_facts(policy), source=None)
        cp._policy.append(policy)
        return cp

    # the fields the runtime reads
    @property
    def name(self) -> str:
        return str(self.facts["name"])

    @property
    def digest(self) -> str:
        return str(self.facts["digest"])

    @property
    def runtime(self) -> str:
        return str(self.facts["runtime"])

    @property
    def image(self) -> str:
        return str(self.facts["image"])

    @property
    def call_s(self) -> float:
        return float(self.facts["timeouts"]["call_s"])

    @property
    def session_s(self) -> float:
        return float(self.facts["timeouts"]["session_s"])

    @property
    def output_max(self) -> int:
        return int(self.facts["output"]["max_bytes"])

    @property
    def egress(self) -> bool:
        return bool(self.facts["egress"])

    @property
    def uid(self) -> int | str:
        return self.facts["user"]["uid"]  # type: ignore[no-any-return]

    @property
    def gid(self) -> int | str:
        return self.facts["user"]["gid"]  # type: ignore[no-any-return]

    @property
    def workspace_path(self) -> str:
        return str(self.facts["workspace"]["path"])

    @property
    def workspace_backing(self) -> str:
        return str(self.facts["workspace"]["backing"])

    @property
    def workspace_size_mb(self) -> int:
        return int(self.facts["workspace"]["size_mb"])

    def policy(self) -> Policy:
        """The full policy model. From the cache: loaded again from its file, and refused
        (:class:`~sandbox.errors.PolicyError`) if its digest is no longer the one this sandbox got."""
        if self._policy:
            return self._policy[0]  # type: ignore[no-any-return]
        from sandbox.errors import PolicyError
        from sandbox.policy import load_policy

        assert self.source is not None
        p = load_policy(self.source)
        if p.digest() != self.digest:
            raise PolicyError([(self.source, "-", "the profile changed since this sandbox was created "
                                                  f"(digest {self.digest[:19]}, now {p.digest()[:19]})")])
        self._policy.append(p)
        return p


# ---------------------------------------------------------------- fingerprint

def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_digest(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return _sha(f.read())
    except FileNotFoundError:
        return "absent"
    except OSError as e:
        return f"unreadable:{e.errno}"


def _dir_listing(d: Path) -> list[Any]:
    try:
        names = sorted(n for n in os.listdir(d) if n.endswith(_YAML_SUFFIXES))
    except FileNotFoundError:
        return [str(d), "absent"]
    except OSError as e:
        return [str(d), f"unreadable:{e.errno}"]
    return [str(d), [[n, _file_digest(os.path.join(d, n))] for n in names]]


def code_digest() -> str:
    """Version and source of the code that validates and compiles a policy."""
    global _code_digest
    if _code_digest is None:
        # The code's own text stands for the package version (importlib.metadata alone costs
        # ~16 ms): an upgrade that changes any of these files changes every fingerprint.
        h = hashlib.sha256(f"{CACHE_VERSION}\0{paths.PACKAGE_DIR}\0{os.uname().machine}\0".encode())
        for rel in _CODE_FILES:
            h.update(rel.encode() + b"\0" + _file_digest(str(paths.PACKAGE_DIR / rel)).encode() + b"\0")
        _code_digest = h.hexdigest()
    return _code_digest


def fingerprint(sources: list[str]) -> str:
    """The hash a cached entry must match: code, every YAML file on the search path (profiles
    and seccomp allowlists), and every file the profile was built from."""
    doc: list[Any] = [code_digest()]
    for d in paths.profile_dirs():
        doc.append(_dir_listing(d))
        doc.append(_dir_listing(d / "seccomp"))
    doc.append([[s, _file_digest(s)] for s in sorted(set(sources))])
    return _sha(json.dumps(doc, separators=(",", ":")).encode())


def _lookup_key(profile: str) -> str:
    """Which entry a profile argument maps to: a path names its file; a name is looked up on
    the search path (which depends on the environment and the current directory)."""
    is_path = profile.endswith(_YAML_SUFFIXES) or "/" in profile
    what = os.path.realpath(profile) if is_path else profile
    dirs = [str(d) for d in paths.profile_dirs()]
    return _sha(json.dumps([CACHE_VERSION, "path" if is_path else "name", what, dirs]).encode())[:40]


# ---------------------------------------------------------------- storage

def cache_dir() -> Path:
    return paths.state_dir() / "policies"


def _check_private(path: Path, st: os.stat_result) -> None:
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise CacheUnusable(f"{path} is not private to this user (owner {st.st_uid}, mode {st.st_mode & 0o7777:o})")


def _open_dir(create: bool) -> Path:
    d = cache_dir()
    if create:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = os.lstat(d)
    if not os.path.isdir(d) or os.path.islink(d):
        raise CacheUnusable(f"{d} is not a directory")
    _check_private(d, st)
    return d


def _key(d: Path, create: bool) -> bytes:
    kp = d / ".key"
    try:
        fd = os.open(kp, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        if not create:
            raise
        key = secrets.token_bytes(32)
        tmp = d / f".key.{secrets.token_hex(6)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, key)
        finally:
            os.close(fd)
        try:
            os.link(tmp, kp)  # first writer wins; a concurrent process then reads the winner's key
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        fd = os.open(kp, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        _check_private(kp, st)
        if st.st_mode & 0o077:
            raise CacheUnusable(f"{kp} is readable by others (mode {st.st_mode & 0o7777:o})")
        key = os.read(fd, 64)
    finally:
        os.close(fd)
    if len(key) != 32:
        raise CacheUnusable(f"{kp} is not a cache key")
    return key


def _mac(key: bytes, entry: dict[str, Any]) -> str:
    return hmac.new(key, json.dumps(entry, sort_keys=True, separators=(",", ":")).encode(), hashlib.sha256).hexdigest()


def _read_entry(path: Path, key: bytes) -> dict[str, Any] | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        _check_private(path, st)
        if st.st_size > MAX_ENTRY:
            log.warning("policy cache: %s is oversized; ignored", path)
            return None
        raw = b""
        while len(raw) < st.st_size + 1:
            chunk = os.read(fd, st.st_size + 1 - len(raw))
            if not chunk:
                break
            raw += chunk
    finally:
        os.close(fd)
    try:
        doc = json.loads(raw)
        entry, got = doc["entry"], doc["mac"]
        if not isinstance(entry, dict) or not isinstance(got, str):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        log.warning("policy cache: %s is not a cache entry (corrupted or edited); rebuilt", path)
        return None
    if not hmac.compare_digest(got, _mac(key, entry)):
        log.warning("policy cache: %s failed authentication (edited, or made under another key); rebuilt", path)
        return None
    return entry


def _write_entry(path: Path, key: bytes, entry: dict[str, Any]) -> None:
    data = json.dumps({"mac": _mac(key, entry), "entry": entry}, separators=(",", ":")).encode()
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


# ---------------------------------------------------------------- loading

def _build(profile: str) -> tuple[CompiledPolicy, list[str]]:
    """Load and validate the profile the ordinary way, recording every file the chain read."""
    from sandbox import policy as pol
    from sandbox import seccomp as sc

    read: list[str] = []
    real_read = pol._read_yaml

    def recording(path: Path) -> dict[str, Any]:
        read.append(str(Path(path).resolve()))
        return real_read(path)

    with _lock:  # the hook is module-wide: one recording load at a time
        pol._read_yaml = recording
        try:
            policy = pol.load_policy(profile)
        finally:
            pol._read_yaml = real_read
    if not read:
        # The loader no longer reads through the hook: the chain's files are unknown, so an entry
        # could not be invalidated by editing them. Serve this load, cache nothing.
        raise CacheUnusable("the profile loader's file reads could not be recorded")
    read.append(str(sc.find_allowlist(policy.seccomp.profile)))
    read.append(str(sc.BASELINE_ALLOWLIST.resolve()))
    cp = CompiledPolicy.from_policy(policy)
    cp.source = read[0]
    return cp, read


def _uncached(profile: str) -> CompiledPolicy:
    from sandbox.policy import load_policy, resolve_profile

    cp = CompiledPolicy.from_policy(load_policy(profile))
    cp.source = str(resolve_profile(profile))
    return cp


def load(profile: str) -> CompiledPolicy:
    """The compiled policy of a profile name or path: from the cache when every file it was
    built from is unchanged, else loaded, validated and compiled (and cached). Raises
    :class:`~sandbox.errors.PolicyError` for an invalid profile, as ``load_policy`` does."""
    name = _lookup_key(profile)
    memo = _memo.get(name)
    if memo is not None and fingerprint(list(memo[1].sources)) == memo[0]:
        return memo[1]
    try:
        d = _open_dir(create=True)
        key = _key(d, create=True)
    except (OSError, CacheUnusable) as e:
        log.warning("policy cache unusable (%s); loading %s without it", e, profile)
        return _uncached(profile)
    path = d / f"{name}.json"
    try:
        entry = _read_entry(path, key)
    except (OSError, CacheUnusable) as e:
        log.warning("policy cache: %s not used (%s); rebuilt", path, e)
        entry = None
    if entry is not None and entry.get("v") == CACHE_VERSION and isinstance(entry.get("sources"), list):
        fp = fingerprint(entry["sources"])
        if hmac.compare_digest(str(entry.get("fingerprint")), fp):
            cp = CompiledPolicy(dict(entry["facts"]), source=entry["source"], cached=True,
                                sources=tuple(entry["sources"]))
            _memo[name] = (fp, cp)
            return cp
    try:
        cp, sources = _build(profile)
    except CacheUnusable as e:
        log.warning("policy cache: %s; %s loaded without it", e, profile)
        return _uncached(profile)
    fp = fingerprint(sources)
    try:
        _write_entry(path, key, {"v": CACHE_VERSION, "fingerprint": fp, "sources": sources, "source": cp.source,
                                 "profile": profile, "facts": cp.facts})
    except OSError as e:
        log.warning("policy cache: cannot write %s: %s", path, e)
    cp.sources = tuple(sources)
    _memo[name] = (fp, cp)
    return cp


def clear_memo() -> None:
    """Forget the in-process memo (tests; the on-disk entries are checked on every use anyway)."""
    _memo.clear()
