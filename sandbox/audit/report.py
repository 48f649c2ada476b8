"""Render an :class:`AuditReport`: a rich table for people, JSON and JUnit XML for programs.

Observed values can come from inside an audited container, so they are shown as
plain text (never interpreted as rich markup) and written to XML escaped.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from typing import Any, TextIO

from sandbox.audit.model import SEVERITY_ORDER, AuditReport

_STYLE = {"pass": "green", "fail": "bold red", "warn": "yellow", "info": "cyan", "skip": "dim"}
_WHERE_ORDER = {"inside": 0, "outside": 1, "engine": 2}
HEADER_KEYS = ("policy", "policy_hash", "image", "image_id", "image_digests", "runtime", "kernel", "engine", "container",
               "probe", "host")


def render_table(report: AuditReport, console: Any = None, *, failures_only: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("audit", Text(report.target))
    for k in HEADER_KEYS:
        v = report.header.get(k)
        if v not in (None, "", []):
            head.add_row(k.replace("_", " "), Text(", ".join(v) if isinstance(v, list) else str(v)))
    head.add_row("started", Text(report.started_at))
    console.print(head)
    table = Table(show_lines=False, header_style="bold", expand=False)
    table.add_column("Check", ratio=3, min_width=22)
    table.add_column("CIS", no_wrap=True)
    table.add_column("Expected", ratio=3, min_width=14)
    table.add_column("Observed", ratio=4, min_width=18)
    table.add_column("Result", no_wrap=True)
    table.add_column("Severity", no_wrap=True)
    rows = [c for c in report.checks if not failures_only or c.failed]
    rows.sort(key=lambda c: (_WHERE_ORDER[c.where], c.status != "fail", SEVERITY_ORDER[c.severity]) if failures_only
              else (_WHERE_ORDER[c.where],))
    for c in rows:
        check = Text(c.id, style="bold")
        check.append("\n" + c.title, style="default")
        table.add_row(check, Text(c.cis or ""), Text(c.expected, style="dim"), Text(c.observed),
                      Text(c.status.upper(), style=_STYLE[c.status]), Text(c.severity))
    console.print(table)
    for n in report.notes:
        console.print(Text("note: " + n, style="yellow"))
    console.print(Text(report.summary(), style="bold green" if report.ok else "bold red"))


def to_json(report: AuditReport) -> str:
    return json.dumps(report.to_dict(), indent=2, sort_keys=False)


def write_json(report: AuditReport, out: TextIO) -> None:
    out.write(to_json(report) + "\n")


def to_junit(report: AuditReport) -> str:
    """One <testcase> per check: fail -> <failure>, skip -> <skipped>, warn/info -> passing with a note."""
    n = report.counts()
    suite = ET.Element("testsuite", {
        "name": f"sandbox-audit: {report.target}", "tests": str(len(report.checks)), "failures": str(n["fail"]),
        "errors": "0", "skipped": str(n["skip"]), "timestamp": report.started_at})
    props = ET.SubElement(suite, "properties")
    for k in HEADER_KEYS:
        v = report.header.get(k)
        if v not in (None, "", []):
            ET.SubElement(props, "property", {"name": k, "value": ", ".join(v) if isinstance(v, list) else str(v)})
    for c in report.checks:
        case = ET.SubElement(suite, "testcase", {"classname": f"sandbox.audit.{c.where}", "name": c.id})
        text = f"{c.title}\nexpected: {c.expected}\nobserved: {c.observed}\nseverity: {c.severity}" + \
            (f"\nCIS Docker Benchmark: {c.cis}" if c.cis else "")
        if c.status == "fail":
            f = ET.SubElement(case, "failure", {"message": f"{c.title}: {c.observed}"[:500], "type": c.severity})
            f.text = text
        elif c.status == "skip":
            ET.SubElement(case, "skipped", {"message": c.observed[:500]})
        else:
            out = ET.SubElement(case, "system-out")
            out.text = f"[{c.status}] " + text
    ET.indent(suite)
    return ET.tostring(suite, encoding="unicode", xml_declaration=True)
