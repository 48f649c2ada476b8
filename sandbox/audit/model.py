"""What an audit produces: one row per check, and the report that carries them.

Statuses: ``pass`` and ``fail`` are verdicts; ``warn`` and ``info`` describe the
engine or a known, accepted difference and never fail the audit; ``skip``
says a check could not run here and why (e.g. no python3 in a foreign
container), so an absent row is never mistaken for a passed one.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Status = Literal["pass", "fail", "warn", "info", "skip"]
Severity = Literal["critical", "high", "medium", "low", "info"]
Where = Literal["inside", "outside", "engine"]

STATUSES: tuple[Status, ...] = ("pass", "fail", "warn", "info", "skip")
SEVERITY_ORDER: dict[str, int] = {"critical": 0, "high": 1, "medium": 2, "low": 3, "info": 4}


@dataclass(frozen=True)
class CheckResult:
    id: str                 # stable, dotted: "inside.caps", "outside.privileged"
    title: str
    status: Status
    expected: str
    observed: str
    severity: Severity
    where: Where
    cis: str | None = None  # CIS Docker Benchmark section 5 id, where one exists

    @property
    def failed(self) -> bool:
        return self.status == "fail"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AuditReport:
    target: str                                  # "profile default" | "container 1a2b3c"
    header: dict[str, Any] = field(default_factory=dict)
    checks: list[CheckResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # "full": inside and outside; "configuration": nothing ran inside (`--container` without --probe)
    scope: str = "full"
    started_at: str = field(default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))

    @property
    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if c.failed]

    @property
    def ok(self) -> bool:
        return not self.failures

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {s: 0 for s in STATUSES}
        for c in self.checks:
            out[c.status] += 1
        return out

    def summary(self) -> str:
        n = self.counts()
        verdict = "PASSED" if self.ok else "FAILED"
        if self.scope == "configuration":
            verdict += (" (CONFIGURATION ONLY: nothing was probed inside the container; "
                        f"{n['skip']} checks not run, --probe runs them)")
        worst = ""
        if self.failures:
            sev = min(self.failures, key=lambda c: SEVERITY_ORDER[c.severity]).severity
            worst = f"; worst failure: {sev}"
        return (f"{verdict}: {len(self.checks)} checks, {n['pass']} passed, {n['fail']} failed, "
                f"{n['warn']} warnings, {n['info']} info, {n['skip']} could not run{worst}")

    def by_id(self) -> dict[str, CheckResult]:
        return {c.id: c for c in self.checks}

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "started_at": self.started_at, "scope": self.scope, "header": self.header,
                "ok": self.ok, "summary": self.summary(), "counts": self.counts(), "notes": self.notes,
                "checks": [c.to_dict() for c in self.checks]}


def report_from_dict(doc: dict[str, Any]) -> AuditReport:
    """An :class:`AuditReport` back from its JSON (``to_dict``), e.g. to render a saved audit."""
    fields = ("id", "title", "status", "expected", "observed", "severity", "where", "cis")
    checks = [CheckResult(**{k: c.get(k) for k in fields}) for c in doc.get("checks") or []]
    return AuditReport(target=str(doc.get("target", "")), header=dict(doc.get("header") or {}), checks=checks,
                       notes=list(doc.get("notes") or []), scope=str(doc.get("scope") or "full"),
                       started_at=str(doc.get("started_at", "")))
