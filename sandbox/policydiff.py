"""`sandbox policy diff A B`: what one policy allows that the other does not, both directions.

Compared on the resolved policies (``extends:`` merged) and on the seccomp filter each
actually loads (allowlist file resolved, argument checks, default action, runtime
adjustments), so a change in an allowlist file shows even when the profiles read alike.

Each difference is one :class:`Delta` with the side that allows more (``"a"``/``"b"``),
or ``None`` where neither is simply more (another image, another pinned uid, another
environment value).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sandbox.policy import Policy


@dataclass(frozen=True)
class Delta:
    area: str
    setting: str
    a: Any
    b: Any
    more: str | None  # "a" | "b" | None
    why: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _num(area: str, setting: str, a: float | int | None, b: float | int | None, none_is_unlimited: bool = False,
         unit: str = "") -> list[Delta]:
    if a == b:
        return []
    if none_is_unlimited and (a is None or b is None):
        more = "a" if a is None else "b"
    else:
        more = "a" if (a or 0) > (b or 0) else "b"
    def show(v: float | int | None) -> str:
        if v is None:
            return "unlimited" if none_is_unlimited else "-"
        return (f"{v:g}" if isinstance(v, float) else str(v)) + unit

    return [Delta(area, setting, show(a), show(b), more, "higher" if not none_is_unlimited or (a and b) else "")]


def _sets(area: str, a: set[Any], b: set[Any], what: str) -> list[Delta]:
    out = [Delta(area, what, str(x), None, "a") for x in sorted(a - b, key=str)]
    out += [Delta(area, what, None, str(x), "b") for x in sorted(b - a, key=str)]
    return out


def _syscalls(pa: Policy, pb: Policy) -> list[Delta]:
    from sandbox import seccomp as sc

    fa = sc.for_runtime(sc.compile_filter(pa.seccomp), pa.runtime)
    fb = sc.for_runtime(sc.compile_filter(pb.seccomp), pb.runtime)
    out: list[Delta] = []
    rank = {"log": 2, "errno": 0, "kill_process": 0}
    if fa.default_action != fb.default_action:
        ra, rb = rank.get(fa.default_action, 1), rank.get(fb.default_action, 1)
        out.append(Delta("syscalls", "default action (calls not listed)", fa.default_action, fb.default_action,
                         None if ra == rb else ("a" if ra > rb else "b"),
                         "log lets every unlisted call through" if "log" in (fa.default_action, fb.default_action)
                         else "both refuse unlisted calls"))
    ua, ub = set(fa.allow), set(fb.allow)
    ca, cb = dict(fa.conditional), dict(fb.conditional)
    for name in sorted(ua | ub | set(ca) | set(cb)):
        sa = "allowed" if name in ua else ("allowed with argument checks" if name in ca else "refused")
        sb = "allowed" if name in ub else ("allowed with argument checks" if name in cb else "refused")
        if sa == sb:
            if sa.endswith("checks") and ca[name] != cb[name]:
                out.append(Delta("syscalls", name, "argument checks (a)", "argument checks (b)", None,
                                 "allowed in both with different argument checks"))
            continue
        order = {"refused": 0, "allowed with argument checks": 1, "allowed": 2}
        out.append(Delta("syscalls", name, sa, sb, "a" if order[sa] > order[sb] else "b",
                         "dangerous" if name in getattr(sc, "DANGEROUS", {}) else ""))
    ea, eb = dict(fa.errno), dict(fb.errno)
    for name in sorted(set(ea) | set(eb)):
        if ea.get(name) != eb.get(name) and name not in ua | ub:
            out.append(Delta("syscalls", f"{name} (answered with errno)", ea.get(name), eb.get(name), None))
    return out


def _mounts(pa: Policy, pb: Policy) -> list[Delta]:
    out: list[Delta] = []
    wa, wb = pa.workspace, pb.workspace
    if wa.path != wb.path:
        out.append(Delta("mounts", "workspace path", wa.path, wb.path, None))
    if wa.backing != wb.backing:
        out.append(Delta("mounts", "workspace backing", wa.backing, wb.backing, None,
                         "tmpfs counts against memory; disk is a size-capped ext4 image on the host"))
    out += _num("mounts", "workspace size", wa.size_mb, wb.size_mb, unit=" MiB")
    ta, tb = {t.path: t for t in pa.tmpfs}, {t.path: t for t in pb.tmpfs}
    for path in sorted(set(ta) | set(tb)):
        x, y = ta.get(path), tb.get(path)
        if x is None or y is None:
            out.append(Delta("mounts", f"tmpfs {path}", f"{x.size_mb} MiB" if x else None,
                             f"{y.size_mb} MiB" if y else None, "a" if x else "b", "writable in memory"))
            continue
        out += _num("mounts", f"tmpfs {path} size", x.size_mb, y.size_mb, unit=" MiB")
        if x.exec != y.exec:
            out.append(Delta("mounts", f"tmpfs {path} exec", x.exec, y.exec, "a" if x.exec else "b",
                             "files written there can be executed"))
    ra = {(m.source, m.target) for m in pa.read_only_mounts}
    rb = {(m.source, m.target) for m in pb.read_only_mounts}
    out += [Delta("mounts", "read-only host mount", f"{s} -> {t}", None, "a") for s, t in sorted(ra - rb)]
    out += [Delta("mounts", "read-only host mount", None, f"{s} -> {t}", "b") for s, t in sorted(rb - ra)]
    return out


def _egress(pa: Policy, pb: Policy) -> list[Delta]:
    ea, eb = pa.egress, pb.egress
    pairs_a = {f"{r.host}:{p}" for r in ea.rules for p in r.ports}
    pairs_b = {f"{r.host}:{p}" for r in eb.rules for p in r.ports}
    out = _sets("egress", pairs_a, pairs_b, "destination")
    out += _sets("egress", set(ea.allow_cidrs), set(eb.allow_cidrs), "non-public range allowed (any port)")
    out += _num("egress", "byte budget", ea.byte_budget, eb.byte_budget, none_is_unlimited=True)
    for k in ("max_connections", "idle_timeout_s", "total_timeout_s", "header_timeout_s", "connect_timeout_s",
              "max_header_bytes"):
        out += _num("egress", k, getattr(ea, k), getattr(eb, k))
    return out


def _plain(area: str, names: tuple[str, ...], a: Any, b: Any, unit: dict[str, str] | None = None) -> list[Delta]:
    out: list[Delta] = []
    for k in names:
        out += _num(area, k, getattr(a, k), getattr(b, k), unit=(unit or {}).get(k, ""))
    return out


def diff_policies(pa: Policy, pb: Policy) -> list[Delta]:
    out: list[Delta] = []
    if pa.runtime != pb.runtime:
        out.append(Delta("runtime", "OCI runtime", pa.runtime, pb.runtime, "a" if pa.runtime == "runc" else "b",
                         "runc shares the host kernel; runsc (gVisor) puts a user-space kernel in between"))
    if pa.image != pb.image:
        out.append(Delta("runtime", "image", pa.image, pb.image, None))
    if (pa.user.uid, pa.user.gid) != (pb.user.uid, pb.user.gid):
        out.append(Delta("identity", "uid:gid", f"{pa.user.uid}:{pa.user.gid}", f"{pb.user.uid}:{pb.user.gid}", None,
                         "auto: a pair no other live sandbox holds"))
    out += _syscalls(pa, pb)
    out += _mounts(pa, pb)
    out += _plain("limits", ("memory_mb", "cpus", "pids"), pa.limits, pb.limits)
    out += _plain("rlimits", ("nofile", "nproc", "fsize_mb", "cpu_s", "stack_mb"), pa.rlimits, pb.rlimits)
    out += _plain("timeouts", ("call_s", "session_s"), pa.timeouts, pb.timeouts)
    out += _num("output", "max_bytes", pa.output.max_bytes, pb.output.max_bytes)
    out += _egress(pa, pb)
    for k in sorted(set(pa.env) | set(pb.env)):
        x, y = pa.env.get(k), pb.env.get(k)
        if x != y:
            out.append(Delta("env", k, x, y, None if x is not None and y is not None else ("a" if x is not None else "b")))
    wa = {getattr(w, "id", str(w)) for w in (pa.weakenings() if hasattr(pa, "weakenings") else [])}
    wb = {getattr(w, "id", str(w)) for w in (pb.weakenings() if hasattr(pb, "weakenings") else [])}
    out += _sets("weakenings", wa, wb, "declared (unsafe:)")
    return out


def to_dict(pa: Policy, pb: Policy, deltas: list[Delta]) -> dict[str, Any]:
    return {"a": {"name": pa.name, "digest": pa.digest()}, "b": {"name": pb.name, "digest": pb.digest()},
            "same": not deltas,
            "only_a": [d.to_dict() for d in deltas if d.more == "a"],
            "only_b": [d.to_dict() for d in deltas if d.more == "b"],
            "differ": [d.to_dict() for d in deltas if d.more is None]}


def _cell(v: Any) -> str:
    return "-" if v is None else str(v)


def render(pa: Policy, pb: Policy, deltas: list[Delta], console: Any = None) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or (Console() if sys.stdout.isatty() else Console(width=100_000, soft_wrap=True, highlight=False))
    console.print(Text(f"a = {pa.name} ({pa.digest()})\nb = {pb.name} ({pb.digest()})"))
    if not deltas:
        console.print(Text("no difference: the two policies enforce the same thing"))
        return
    for who, title in (("a", f"{pa.name} (a) allows, {pb.name} (b) does not"),
                       ("b", f"{pb.name} (b) allows, {pa.name} (a) does not"),
                       (None, "different, neither simply allows more")):
        rows = [d for d in deltas if d.more == who]
        if not rows:
            continue
        t = Table(title=Text(title), title_justify="left")
        for col in ("area", "setting", "a", "b", "note"):
            t.add_column(col)
        for d in rows:
            t.add_row(Text(d.area), Text(d.setting), Text(_cell(d.a)), Text(_cell(d.b)), Text(d.why))
        console.print(t)


def run_cli(pa: Policy, pb: Policy, as_json: bool) -> int:
    """`sandbox policy diff`: print the difference; 0 when none, 1 when they differ (like diff(1))."""
    import json

    deltas = diff_policies(pa, pb)
    if as_json:
        print(json.dumps(to_dict(pa, pb, deltas), indent=2, default=str))
    else:
        render(pa, pb, deltas)
    return 1 if deltas else 0
