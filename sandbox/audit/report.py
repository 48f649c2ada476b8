"""Render an :class:`AuditReport`: a rich table for people, JSON and JUnit XML for programs,
and Markdown and HTML documents a security team can review and sign.

Observed values can come from inside an audited container (untrusted text), so they
are shown as plain text (never interpreted as rich markup), written to XML escaped,
escaped for Markdown (no raw HTML, no table-breaking pipes) and HTML-escaped in the
HTML report, which is one self-contained file with no script.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
import sys
import xml.etree.ElementTree as ET
from typing import Any, TextIO

from sandbox.audit.model import SEVERITY_ORDER, AuditReport

FORMATS = ("text", "md", "html", "json", "junit")

_STYLE = {"pass": "green", "fail": "bold red", "warn": "yellow", "info": "cyan", "skip": "dim"}
_WHERE_ORDER = {"inside": 0, "outside": 1, "engine": 2}
HEADER_KEYS = ("policy", "policy_hash", "weakenings", "image", "image_id", "image_digests", "runtime", "runtime_version",
               "kernel", "engine", "container", "probe", "host", "package_version", "cis_benchmark")
# What a signed report must name, in the order it names it: (header key, label).
DOCUMENT_FACTS = (("image", "Image reference"), ("image_id", "Image digest (content id)"),
                  ("image_digests", "Image repository digests"), ("policy", "Policy"),
                  ("policy_hash", "Policy digest"), ("weakenings", "Declared weakenings"),
                  ("runtime", "OCI runtime"), ("runtime_version", "Runtime version"), ("engine", "Docker engine"),
                  ("kernel", "Kernel"), ("host", "Host"), ("container", "Container"), ("probe", "Inside probe"),
                  ("package_version", "sandbox package version"), ("cis_benchmark", "CIS ids refer to"))


def _value(v: Any) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, list):
        return ", ".join(str(x) for x in v)
    return str(v)


def document_facts(report: AuditReport) -> list[tuple[str, str]]:
    """(label, value) pairs for the report header; a fact the audit could not learn says so."""
    out = [("Audited", report.target), ("Date (UTC)", report.started_at),
           ("Scope", "configuration only: nothing was probed inside" if report.scope == "configuration"
            else "inside probe and outside inspection")]
    for key, label in DOCUMENT_FACTS:
        v = report.header.get(key)
        if key == "weakenings":
            out.append((label, _value(v) or "none declared") if v is not None else (label, "unknown (no policy)"))
        elif key == "image_digests":
            out.append((label, _value(v) or "none (a locally built image has no registry digest; "
                                            "the content id above identifies it)"))
        else:
            out.append((label, _value(v) or "not known"))
    return out


def report_digest(report: AuditReport) -> str:
    """SHA-256 of the report's canonical JSON: ties a signed document to its JSON twin."""
    blob = json.dumps(report.to_dict(), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def render_table(report: AuditReport, console: Any = None, *, failures_only: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    if console is None:
        # Not a terminal: never cut or wrap to 80 columns (a saved report keeps every column).
        console = Console() if sys.stdout.isatty() else Console(width=100_000, soft_wrap=True, highlight=False)
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


# ---------------------------------------------------------------- documents to sign

_SORT = {"fail": 0, "warn": 1, "skip": 2, "info": 3, "pass": 4}
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~])")


def md_escape(text: Any) -> str:
    """Untrusted text as inert Markdown: no HTML, no links or emphasis, no broken table cells."""
    t = str(text).replace("\r", " ").replace("\n", " ")
    t = t.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_SPECIAL.sub(r"\\\1", t)


def _ordered(report: AuditReport) -> list[Any]:
    return sorted(report.checks, key=lambda c: (_WHERE_ORDER.get(c.where, 9), c.id))


def to_markdown(report: AuditReport) -> str:
    n = report.counts()
    lines = [f"# Sandbox isolation audit: {md_escape(report.target)}", "",
             f"**Result: {md_escape(report.summary())}**", "", "## What was audited", "", "| | |", "|---|---|"]
    lines += [f"| {md_escape(k)} | {md_escape(v)} |" for k, v in document_facts(report)]
    lines += ["", "Results: " + ", ".join(f"{n[s]} {s}" for s in ("pass", "fail", "warn", "info", "skip")) + ".",
              "`pass`/`fail` are verdicts; `warn` and `info` describe the host or an accepted difference and never "
              "fail the audit; `skip` means the check could not run here (the row says why).", ""]
    if report.notes:
        lines += ["## Notes", ""] + [f"- {md_escape(x)}" for x in report.notes] + [""]
    fails = [c for c in report.checks if c.failed]
    if fails:
        lines += ["## Failures", ""]
        lines += [f"- `{c.id}` ({c.severity}): {md_escape(c.title)}: {md_escape(c.observed)}"
                  for c in sorted(fails, key=lambda c: (SEVERITY_ORDER[c.severity], c.id))]
        lines.append("")
    lines += ["## Checks", "", "| Check | CIS | Severity | Result | Expected | Evidence |", "|---|---|---|---|---|---|"]
    for c in _ordered(report):
        # ids come from the catalog (no backtick): a code span keeps them greppable in the raw file
        lines.append(f"| `{c.id}`<br>{md_escape(c.title)} | {md_escape(c.cis or '')} | "
                     f"{md_escape(c.severity)} | **{c.status.upper()}** | {md_escape(c.expected)} | "
                     f"{md_escape(c.observed)} |")
    lines += ["", "## Sign-off", "", f"Report digest (SHA-256 of the JSON report): `{report_digest(report)}`", "",
              "| Reviewed by | Role | Date | Signature |", "|---|---|---|---|", "| | | | |", ""]
    return "\n".join(lines)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#111;max-width:110em}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:.3em .5em;vertical-align:top;
text-align:left}th{background:#eee}.pass{color:#065f08}.fail{color:#b00020;font-weight:bold}.warn{color:#8a5a00}
.info{color:#05567a}.skip{color:#666}code,.ev{font-family:ui-monospace,monospace;font-size:.9em;white-space:pre-wrap;
word-break:break-all}.verdict{font-size:1.2em;font-weight:bold}.sig td{height:2.5em;min-width:12em}"""


def to_html(report: AuditReport) -> str:
    e = html.escape
    rows = "\n".join(f"<tr><th>{e(k)}</th><td class=\"ev\">{e(v)}</td></tr>" for k, v in document_facts(report))
    checks = "\n".join(
        f"<tr class=\"{e(c.status)}\"><td><b>{e(c.id)}</b><br>{e(c.title)}</td><td>{e(c.cis or '')}</td>"
        f"<td>{e(c.severity)}</td><td class=\"{e(c.status)}\">{e(c.status.upper())}</td><td>{e(c.expected)}</td>"
        f"<td class=\"ev\">{e(c.observed)}</td></tr>" for c in _ordered(report))
    notes = "".join(f"<li>{e(x)}</li>" for x in report.notes)
    fails = [c for c in report.checks if c.failed]
    fail_list = "".join(f"<li><b>{e(c.id)}</b> ({e(c.severity)}): {e(c.title)}: <span class=\"ev\">{e(c.observed)}"
                        "</span></li>" for c in sorted(fails, key=lambda c: (SEVERITY_ORDER[c.severity], c.id)))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>Sandbox isolation audit: {e(report.target)}</title><style>{_CSS}</style></head>
<body>
<h1>Sandbox isolation audit: {e(report.target)}</h1>
<p class="verdict {'pass' if report.ok else 'fail'}">{e(report.summary())}</p>
<h2>What was audited</h2>
<table>{rows}</table>
<p><code>pass</code>/<code>fail</code> are verdicts; <code>warn</code> and <code>info</code> describe the host or an
accepted difference and never fail the audit; <code>skip</code> means the check could not run here (the row says why).</p>
{f'<h2>Notes</h2><ul>{notes}</ul>' if notes else ''}
{f'<h2>Failures</h2><ul>{fail_list}</ul>' if fails else ''}
<h2>Checks</h2>
<table><thead><tr><th>Check</th><th>CIS</th><th>Severity</th><th>Result</th><th>Expected</th><th>Evidence</th></tr>
</thead><tbody>
{checks}
</tbody></table>
<h2>Sign-off</h2>
<p>Report digest (SHA-256 of the JSON report): <code>{e(report_digest(report))}</code></p>
<table class="sig"><tr><th>Reviewed by</th><th>Role</th><th>Date</th><th>Signature</th></tr>
<tr><td></td><td></td><td></td><td></td></tr></table>
</body></html>
"""


def render(report: AuditReport, fmt: str) -> str:
    """The report as a document in ``fmt`` (every format but the terminal table)."""
    if fmt == "json":
        return to_json(report) + "\n"
    if fmt == "junit":
        return to_junit(report) + "\n"
    if fmt == "md":
        return to_markdown(report)
    if fmt == "html":
        return to_html(report)
    if fmt == "text":
        from io import StringIO

        from rich.console import Console

        buf = StringIO()
        render_table(report, Console(file=buf, width=100_000, soft_wrap=True, color_system=None, highlight=False))
        return buf.getvalue()
    raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
