"""What both the policy loader and the seccomp compiler need, so neither imports the other.

:mod:`sandbox.policy` imports :mod:`sandbox.seccomp` (the digest and the weakening
check need the compiled filter), and :mod:`sandbox.seccomp` needs the error type,
the ``seccomp:`` section's model and a strict YAML reader: those live here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict

# Defined in sandbox.errors (stdlib only), so the cached fast path can catch it without pydantic.
from sandbox.errors import PolicyError

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"  # shipped as package data


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Seccomp(_Strict):
    """Which syscall allowlist to load, plus per-policy adjustments."""

    profile: str = "default"
    extra_allow: list[str] = []
    extra_deny: list[str] = []
    default_action: Literal["errno", "kill_process", "log"] = "errno"


@dataclass(frozen=True)
class Weakening:
    """One way a policy is weaker than the shipped baseline.

    ``id`` is what a profile writes under ``unsafe:`` to accept it (e.g. ``seccomp.allow.ptrace``);
    ``allows`` says in words what it lets a workload do; ``file``/``key`` say where it came from
    (``file`` is "policy" for the profile's own keys); ``reason`` is the profile's written reason,
    empty when the weakening is not declared (such a policy does not load)."""

    id: str
    allows: str
    file: str
    key: str
    reason: str = ""

    @property
    def declared(self) -> bool:
        return bool(self.reason)


# ---------------------------------------------------------------- strict YAML

_Base: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C parser is ~10x faster


class _DuplicateKey(yaml.MarkedYAMLError):
    pass


class _NoDuplicateKeys:
    """Loader mixin that refuses a mapping key given twice (at any depth).

    A reviewer reads the first value, the loader would use the last. YAML merge
    keys (``<<``) still override as YAML defines; only literal repeats are errors.
    Works with the C parser too: construction is Python code either way.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        loader: Any = self  # a yaml loader: this class is only mixed into one
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, tuple[int, int]] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = loader.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # the base constructor reports unhashable keys itself
                here = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                if key in seen:
                    first = seen[key]
                    where = (f"lines {first[0]} and {here[0]}" if first[0] != here[0]
                             else f"line {here[0]} (columns {first[1]} and {here[1]})")
                    raise _DuplicateKey(None, None, f"duplicate key {key!r} on {where}", key_node.start_mark)
                seen[key] = here
        result: dict[Any, Any] = super().construct_mapping(node, deep=deep)  # type: ignore[misc]
        return result


class StrictLoader(_NoDuplicateKeys, _Base):  # type: ignore[misc]
    """The safe loader (C-accelerated when libyaml is present) without duplicate keys."""


class PyStrictLoader(_NoDuplicateKeys, yaml.SafeLoader):
    """The same in pure Python (what :class:`StrictLoader` is without libyaml)."""



def read_yaml(path: Path, key: str = "-") -> Any:
    """Parse one YAML file strictly; errors are :class:`PolicyError` naming the file."""
    try:
        text = path.read_text()
    except OSError as e:
        raise PolicyError([(str(path), key, f"cannot read: {e.strerror}")]) from None
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as e:
        where = _key_path(text, e.problem_mark.line, e.problem_mark.column) if e.problem_mark else None
        raise PolicyError([(str(path), where or key, str(e.problem))]) from None
    except yaml.YAMLError as e:
        raise PolicyError([(str(path), key, f"not valid YAML: {e}")]) from None


def _key_path(text: str, line: int, column: int) -> str | None:
    """The dotted path ("limits.pids") of the mapping key that starts at (line, column)."""
    def walk(node: yaml.Node, path: list[str]) -> str | None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                here = path + [str(k.value)]
                if k.start_mark.line == line and k.start_mark.column == column:
                    return ".".join(here)
                found = walk(v, here)
                if found:
                    return found
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                found = walk(v, path + [str(i)])
                if found:
                    return found
        return None

    try:
        root = yaml.compose(text, Loader=_Base)  # noqa: S506 - composes nodes, constructs nothing
    except yaml.YAMLError:
        return None
    return walk(root, []) if root is not None else None


__all__ = ["PROFILES_DIR", "PolicyError", "PyStrictLoader", "Seccomp", "StrictLoader", "Weakening", "read_yaml"]
