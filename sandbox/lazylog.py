"""A module logger that imports :mod:`logging` on first use.

``logging`` costs ~7 ms at import; the cold ``sandbox exec`` path logs nothing unless
something goes wrong, so its modules hold one of these instead of a Logger. Everything
else (handlers, levels, pytest's caplog) sees the ordinary ``logging.getLogger(name)``.
"""

from __future__ import annotations

from typing import Any


class LazyLogger:
    def __init__(self, name: str):
        self._name = name
        self._logger: Any = None

    def __getattr__(self, attr: str) -> Any:
        if self._logger is None:
            import logging

            self._logger = logging.getLogger(self._name)
        return getattr(self._logger, attr)


def get(name: str) -> Any:
    return LazyLogger(name)
