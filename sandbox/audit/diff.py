"""Compare two saved audits (the JSON `sandbox audit --json` writes): what changed, and what got worse.

Worse means: a check's result fell (pass/info -> warn -> skip -> fail), a check that
passed is gone (coverage lost), or a new check fails. A changed policy, image or
runtime is reported as a change of what was audited; its effect shows in the rows.
The files are read as data only (they may come from elsewhere): any shape problem is
a :class:`DiffError`, never a crash, and no value is interpreted.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Result order, best first. info and pass are both "nothing wrong"; skip (not checked) is
# worse than a warning; fail is worst.
RANK = {"pass": 0, "info": 0, "warn": 1, "skip": 2, "fail": 3}
HEADER_FIELDS = ("policy", "policy_hash", "weakenings", "image", "image_id", "image_digests", "runtime",
                 "runtime_version", "kernel", "engine", "package_version", "cis_benchmark", "probe")
MAX_REPORT_BYTES = 32 << 20


class DiffError(ValueError):
    """A file is missing, unreadable or not an audit report."""


@dataclass
class Change:
    id: str
    title: str
    old: str | None          # result before (None: check absent)
    new: str | None
    severity: str
    old_observed: str = ""
    new_observed: str = ""
    worse: bool = False


@dataclass
class AuditDiff:
    old_target: str
    new_target: str
    old_ok: bool
    new_ok: bool
    header: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    added: list[Change] = field(default_factory=list)
    removed: list[Change] = field(default_factory=list)
    changed: list[Change] = field(default_factory=list)       # result changed
    evidence: list[Change] = field(default_factory=list)      # same result, different evidence

    @property
    def worse(self) -> bool:
        return (self.old_ok and not self.new_ok) or any(c.worse for c in self.added + self.removed + self.changed)

    @property
    def same(self) -> bool:
        return not (self.header or self.added or self.removed or self.changed or self.evidence)

    def to_dict(self) -> dict[str, Any]:
        return {"worse": self.worse, "same": self.same,
                "old": {"target": self.old_target, "ok": self.old_ok},
                "new": {"target": self.new_target, "ok": self.new_ok},
                "header": {k: {"old": a, "new": b} for k, (a, b) in self.header.items()},
                "added": [asdict(c) for c in self.added], "removed": [asdict(c) for c in self.removed],
                "changed": [asdict(c) for c in self.changed], "evidence_changed": [asdict(c) for c in self.evidence]}


def load_report(path: str) -> dict[str, Any]:
    p = Path(path)
    try:
        if p.stat().st_size > MAX_REPORT_BYTES:
            raise DiffError(f"{path}: larger than {MAX_REPORT_BYTES >> 20} MiB; not an audit report")
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise DiffError(f"{path}: no such file") from None
    except OSError as e:
        raise DiffError(f"{path}: cannot read: {e.strerror}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise DiffError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("checks"), list):
        raise DiffError(f"{path}: not an audit report (no \"checks\" list; save one with `sandbox audit --json`)")
    for i, c in enumerate(data["checks"]):
        if not isinstance(c, dict) or not isinstance(c.get("id"), str) or c.get("status") not in RANK:
            raise DiffError(f"{path}: checks[{i}] is not a check row (needs an id and a status)")
    return data


def _checks(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["id"]: c for c in report["checks"]}


def diff_reports(old: dict[str, Any], new: dict[str, Any]) -> AuditDiff:
    a, b = _checks(old), _checks(new)
    d = AuditDiff(old_target=str(old.get("target", "?")), new_target=str(new.get("target", "?")),
                  old_ok=not any(c["status"] == "fail" for c in a.values()),
                  new_ok=not any(c["status"] == "fail" for c in b.values()))
    ha, hb = old.get("header") or {}, new.get("header") or {}
    for k in HEADER_FIELDS:
        if ha.get(k) != hb.get(k):
            d.header[k] = (ha.get(k), hb.get(k))

    def change(i: str, x: dict[str, Any] | None, y: dict[str, Any] | None) -> Change:
        ref = y or x or {}
        return Change(id=i, title=str(ref.get("title", "")), old=x["status"] if x else None,
                      new=y["status"] if y else None, severity=str(ref.get("severity", "")),
                      old_observed=str((x or {}).get("observed", "")), new_observed=str((y or {}).get("observed", "")))

    for i in sorted(set(a) | set(b)):
        x, y = a.get(i), b.get(i)
        c = change(i, x, y)
        if x is None and y is not None:
            c.worse = y["status"] == "fail"
            d.added.append(c)
        elif y is None and x is not None:
            c.worse = x["status"] in ("pass", "info", "warn")  # a check that held is no longer made
            d.removed.append(c)
        elif x is not None and y is not None:
            if x["status"] != y["status"]:
                c.worse = RANK[y["status"]] > RANK[x["status"]]
                d.changed.append(c)
            elif x.get("observed") != y.get("observed"):
                d.evidence.append(c)
    return d


def _short(v: Any, n: int = 90) -> str:
    s = ", ".join(map(str, v)) if isinstance(v, list) else ("-" if v is None else str(v))
    s = s.replace("\n", " ")
    return s if len(s) <= n else s[: n - 3] + "..."


def render_diff(d: AuditDiff, old_name: str, new_name: str, *, show_all: bool = False) -> str:
    """Plain text (no markup: every value comes from the files), one line per change."""
    out = [f"audit diff: {old_name} ({d.old_target}, {'PASSED' if d.old_ok else 'FAILED'}) -> "
           f"{new_name} ({d.new_target}, {'PASSED' if d.new_ok else 'FAILED'})"]
    if d.same:
        out.append("no change: same checks, results, evidence and digests")
        return "\n".join(out) + "\n"
    if d.header:
        out.append("")
        out.append("what was audited:")
        for k, (a, b) in d.header.items():
            out.append(f"  {k}: {_short(a)} -> {_short(b)}")

    def section(title: str, rows: list[Change], evidence: bool = False) -> None:
        if not rows:
            return
        out.append("")
        out.append(f"{title} ({len(rows)}):")
        for c in rows:
            mark = "WORSE " if c.worse else "      "
            out.append(f"  {mark}{c.id} [{c.severity}] {c.old or '-'} -> {c.new or '-'}: {_short(c.title, 60)}")
            if evidence or c.worse:
                if c.old is not None:
                    out.append(f"          was: {_short(c.old_observed, 160)}")
                if c.new is not None:
                    out.append(f"          now: {_short(c.new_observed, 160)}")

    section("results changed", d.changed, evidence=True)
    section("checks added", d.added)
    section("checks removed", d.removed)
    if show_all:
        section("evidence changed, same result", d.evidence, evidence=True)
    elif d.evidence:
        out.append("")
        out.append(f"{len(d.evidence)} rows changed evidence but not result (--all lists them)")
    out.append("")
    out.append("verdict: WORSE" if d.worse else "verdict: nothing got worse")
    return "\n".join(out) + "\n"
