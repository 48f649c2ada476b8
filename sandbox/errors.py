"""Error types that cheap code paths raise or catch without importing the policy model.

Only the standard library is imported here (the fast ``sandbox exec`` path imports this
module, never pydantic, unless a profile has to be validated).
"""

from __future__ import annotations


class PolicyError(ValueError):
    """A profile is invalid. ``problems`` lists (file, key, reason) triples."""

    def __init__(self, problems: list[tuple[str, str, str]]):
        self.problems = problems
        lines = [f"{f}: {k}: {r}" for f, k, r in problems]
        super().__init__("invalid policy:\n  " + "\n  ".join(lines))
