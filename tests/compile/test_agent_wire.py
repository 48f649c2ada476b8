"""The agent's JSON (sandbox/agent/wire.py, the C codec without the `json` package) says and reads
exactly what `json` does for what the channel carries, and refuses what it must."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import sandbox

_spec = importlib.util.spec_from_file_location("agent_wire", Path(sandbox.__file__).parent / "agent" / "wire.py")
assert _spec and _spec.loader
wire = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wire)

SAMPLES = [
    {"id": 7, "ev": "out", "fd": 1, "data": "aGVsbG8K"},
    {"id": None, "ev": "ready", "pid": 1, "uid": 2000123, "gid": 2000123},
    {"id": "r-1", "ev": "exit", "code": 0, "signal": None, "limit": None, "truncated": False, "duration": 0.0123456789},
    {"text": "naïve ☃ \u0000 \u2028 \"quoted\" \\ back\nslash\ttab", "nested": [[], {}, [1, 2.5, -3e-07, True]]},
    {"big": 2 ** 70, "neg": -1, "float": 1e300, "emoji": "😀"},
    [], "", 0, None,
]


@pytest.mark.parametrize("value", SAMPLES, ids=range(len(SAMPLES)))
def test_the_agents_json_matches_the_stdlib_both_ways(value: object) -> None:
    said = wire.dumps(value)
    assert said == json.dumps(value, separators=(",", ":"))
    assert wire.loads(said.encode()) == json.loads(said) == value
    assert wire.loads(b"  \n" + said.encode() + b"\r\n") == value


@pytest.mark.parametrize("bad", [b"", b"{", b'{"a":1} x', b'{"a":1}{"b":2}', b"NaN", b'{"a":Infinity}',
                                 b'"\x01"', b"\xff", b"[1,]", b"{'a':1}"])
def test_malformed_or_non_finite_input_is_refused(bad: bytes) -> None:
    with pytest.raises(ValueError):
        wire.loads(bad)


def test_unserialisable_values_are_refused_not_stringified() -> None:
    with pytest.raises(TypeError):
        wire.dumps({"x": object()})
    with pytest.raises(TypeError):
        wire.dumps({"x": b"bytes"})
