"""JSON for the agent's channel on CPython's C codec, without the `json` package (stdlib only).

`import json` costs the agent 10-12 ms of every sandbox start (json.decoder compiles its
regular expressions through `re`, in pure Python) and about 0.1 MiB; the channel needs only
the C scanner and encoder that `json` itself uses. Same output as
``json.dumps(obj, separators=(",", ":"))`` and the same values as ``json.loads`` for what
the channel carries; NaN and the infinities are refused on input (the host never sends
them). Where `_json` is missing, the `json` package is used.
"""

from __future__ import annotations

try:
    import _json
except ImportError:  # pragma: no cover - not CPython
    _json = None  # type: ignore[assignment]


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid here")


def _not_serializable(o: object) -> object:
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


class _Context:  # the attributes the C scanner reads from a json.JSONDecoder
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(_no_constant)


_WS = " \t\n\r"

if _json is not None:
    _scan = _json.make_scanner(_Context())
    _encode = _json.make_encoder(None, _not_serializable, _json.encode_basestring_ascii, None,
                                 ":", ",", False, False, True)

    def loads(data: bytes | str) -> object:
        s = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        start = len(s) - len(s.lstrip(_WS))
        try:
            obj, end = _scan(s, start)
        except StopIteration:
            raise ValueError("not JSON") from None
        if s[end:].strip(_WS):
            raise ValueError("extra data after the JSON value")
        return obj

    def dumps(obj: object) -> str:
        if isinstance(obj, str):
            return _json.encode_basestring_ascii(obj)
        return "".join(_encode(obj, 0))
else:  # pragma: no cover
    import json

    def loads(data: bytes | str) -> object:
        return json.loads(data)

    def dumps(obj: object) -> str:
        return json.dumps(obj, separators=(",", ":"))
