"""Run an audit: a fresh sandbox of a policy, or any container already on the host.

Inside rows come from the probe (python3, or the sh subset), outside rows from
`docker inspect` and the host's cgroup files, engine rows from `docker info`.
The probe's output is untrusted (it comes from inside the container); it is
parsed with a size cap and judged by :mod:`sandbox.audit.checks`.
"""

from __future__ import annotations

import json
import socket
import threading
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from sandbox.audit import checks as chk
from sandbox.audit.catalog import INSIDE_IDS, skipped
from sandbox.audit.egress import prepare as egress_prepare
from sandbox.audit.hostfacts import package_version, runtime_version
from sandbox.audit.model import AuditReport, CheckResult
from sandbox.audit.outside import evaluate_engine, evaluate_outside
from sandbox.audit.shell_probe import SH_PROBE, SH_UNAVAILABLE
from sandbox.audit.shell_probe import parse as parse_sh
from sandbox.audit.syscalls import numbers, sample_table

PROBE_SOURCE: str = Path(__file__).with_name("probe_script.py").read_text()
MARKER = "SANDBOX-AUDIT-PROBE-JSON:"
MAX_PROBE_OUTPUT = 4 << 20
PROBE_TIMEOUT_S = 180.0
ALL_PROBES = ("identity", "caps", "nnp", "seccomp", "syscalls", "rootfs", "walk", "devices", "kernel_files", "sockets",
              "fds", "exe", "release_agent", "keyring", "ptrace", "userns", "pidns", "limits", "network", "env",
              "agent", "host_facts")
SIGNALS_NOT_OWNED = ("not sent: signals to PID 1 could stop a container this audit did not start "
                     "(a profile audit sends them to its own sandbox)")


class AuditError(RuntimeError):
    """The audit itself could not run (engine unreachable, sandbox refused, container missing)."""


def probe_config(probes: tuple[str, ...] | list[str], scratch: list[str] | None = None,
                 fork_cap: int = 512, masked: list[str] | None = None,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``masked``: the container's MaskedPaths, each checked from inside to be unreadable or empty.
    ``extra``: more sections (e.g. ``egress``: the salt and paths of the egress scan)."""
    return {"probes": list(probes), "syscalls": sample_table(), "nr": numbers(), "scratch": scratch or ["/tmp"],
            "fork_cap": fork_cap, "masked": [str(m) for m in masked or []], **(extra or {})}


def probe_argv(config: dict[str, Any], python: str = "python3", isolated: bool = True) -> list[str]:
    # -c rather than a script on stdin: the same argv works through the sandbox agent and docker exec.
    flags = ["-I", "-S"] if isolated else []
    return [python, *flags, "-c", PROBE_SOURCE, json.dumps(config, separators=(",", ":"))]


def parse_probe_output(out: bytes | str | None) -> dict[str, Any] | None:
    if not out:
        return None
    text = out.decode("utf-8", "replace") if isinstance(out, bytes) else out
    i = text.rfind(MARKER)
    if i < 0:
        return None
    line = text[i + len(MARKER):].split("\n", 1)[0]
    if len(line) > MAX_PROBE_OUTPUT:
        return None
    try:
        data = json.loads(line)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _engine(client: Any) -> tuple[dict[str, Any], list[CheckResult]]:
    info = client.info()
    try:
        bridge = client.networks.get("bridge").attrs.get("Options") or {}
    except Exception:  # noqa: BLE001 - no default bridge is fine
        bridge = None
    return info, evaluate_engine(info, bridge)


def _image_digests(client: Any, image_id: str) -> list[str]:
    try:
        return list(client.api.inspect_image(image_id).get("RepoDigests") or [])
    except Exception:  # noqa: BLE001
        return []


def container_ids(attrs: dict[str, Any]) -> tuple[int | None, int | None]:
    """(uid, gid) from Config.User as the host configured it; None where not numeric."""
    user = str((attrs.get("Config") or {}).get("User") or "")
    u, _, g = user.partition(":")
    uid = int(u) if u.isdigit() else (0 if u in ("", "root") else None)
    gid = int(g) if g.isdigit() else (uid if not g and uid == 0 else None)
    return uid, gid


def _header(attrs: dict[str, Any], info: dict[str, Any], client: Any, probe: dict[str, Any] | None) -> dict[str, Any]:
    from sandbox.audit.catalog import CIS_BENCHMARK

    hc, cfg = attrs.get("HostConfig") or {}, attrs.get("Config") or {}
    runtime = hc.get("Runtime") or info.get("DefaultRuntime")
    kernel = str(info.get("KernelVersion"))
    seen = str(((probe or {}).get("_meta") or {}).get("uname") or "")
    if seen and seen != kernel:
        kernel += f" (the container sees {seen[:40]}{': gVisor' if runtime == 'runsc' else ''})"
    image_id = str(attrs.get("Image") or "")
    return {"container": str(attrs.get("Id", ""))[:12], "image": cfg.get("Image"), "image_id": image_id,
            "image_digests": _image_digests(client, image_id), "runtime": runtime,
            "runtime_version": runtime_version(info, runtime), "kernel": kernel,
            "engine": f"Docker {info.get('ServerVersion')}, containerd {(info.get('ContainerdCommit') or {}).get('ID')}",
            "host": socket.gethostname(), "package_version": package_version(), "cis_benchmark": CIS_BENCHMARK}


def policy_header(policy: Any) -> dict[str, Any]:
    return {"policy": policy.name, "policy_hash": policy.digest(), "weakenings": weakening_lines(policy)}


def weakening_lines(policy: Any) -> list[str]:
    fn = getattr(policy, "weakenings", None)
    if not callable(fn):
        return []
    out = []
    for w in fn():
        wid, allows, reason = getattr(w, "id", str(w)), getattr(w, "allows", ""), getattr(w, "reason", "")
        out.append(f"{wid}: {allows}" + (f" (declared: {reason})" if reason else " (NOT declared)"))
    return out


# ---------------------------------------------------------------- rows only a runner can make

def weakenings_row(policy: Any) -> CheckResult:
    from sandbox.audit.catalog import result

    if policy is None:
        return result("outside.declared_weakenings", "info",
                      "no policy known for this container (not a managed sandbox, or its profile does not load "
                      "here with the digest on its label): weakenings cannot be listed")
    lines = weakening_lines(policy)
    if not lines:
        return result("outside.declared_weakenings", "pass", f"policy {policy.name} declares none: it is the "
                      "shipped baseline or stricter")
    return result("outside.declared_weakenings", "warn", f"policy {policy.name} weakens the shipped baseline: "
                  + "; ".join(lines))


GVISOR_EXEC = ("under runsc (gVisor), processes that enter through `docker exec` run without the OCI seccomp "
               "filter: only the container's own process tree is filtered")


def exec_seccomp_row(runtime: str, *, audited_by_exec: bool, exec_ids: list[Any] | None = None) -> CheckResult:
    from sandbox.audit.catalog import result

    if runtime != "runsc":
        return result("outside.exec_seccomp", "pass",
                      f"{runtime}: a process entering through `docker exec` gets the container's seccomp filter")
    live = f"; {len(exec_ids)} exec session(s) open in it now" if exec_ids else ""
    if audited_by_exec:
        return result("outside.exec_seccomp", "warn", GVISOR_EXEC + "; this audit's own inside probe entered that "
                      "way, so its seccomp rows describe an exec'd process, not the workload" + live
                      + ". `sandbox` never enters a sandbox that way; do not `docker exec` into one")
    return result("outside.exec_seccomp", "info", GVISOR_EXEC + ". `sandbox` never enters a sandbox that way "
                  "(its agent starts every command inside the filtered tree); the probe here ran through the agent"
                  + live)


def _running_ids(client: Any, exclude: set[str]) -> list[tuple[str, int | None, int | None]]:
    out = []
    for c in client.api.containers(quiet=True):
        cid = str(c.get("Id"))
        if cid in exclude:
            continue
        try:
            a = client.api.inspect_container(cid)
        except Exception:  # noqa: BLE001 - gone meanwhile
            continue
        uid, gid = container_ids(a)
        out.append((str(a.get("Name", "")).lstrip("/") or cid[:12], uid, gid))
    return out


def uid_row(client: Any, attrs: dict[str, Any], *, pinned: tuple[int, int] | None = None,
            peer: tuple[int | None, int | None] | str | None = None) -> CheckResult:
    """Outside, from the engine: this container's uid/gid against every other running container's.

    ``peer``: what a second sandbox of the same policy, started while this one lived, got
    (its (uid, gid), or the runtime's refusal as text), the test that the allocator holds."""
    from sandbox.audit.catalog import result
    from sandbox.spec import LABEL_GID, LABEL_UID

    uid, gid = container_ids(attrs)
    labels = (attrs.get("Config") or {}).get("Labels") or {}
    obs = f"User={(attrs.get('Config') or {}).get('User')!r}"
    if uid is None or gid is None:
        return result("outside.uid_unique", "fail", obs + ": not a numeric uid:gid, so the host cannot tell "
                      "which per-uid budget it spends")
    if uid == 0 or gid == 0:
        return result("outside.uid_unique", "fail", obs + ": root, shared with the host and every root container")
    bad = []
    lu, lg = labels.get(LABEL_UID), labels.get(LABEL_GID)
    if lu is not None and (lu != str(uid) or lg != str(gid)):
        bad.append(f"label says {lu}:{lg}, Config.User {uid}:{gid}")
    if pinned is not None and (uid, gid) != pinned:
        bad.append(f"the policy pins {pinned[0]}:{pinned[1]}")
    others = _running_ids(client, {str(attrs.get("Id"))})
    shared = [f"{n} ({u}:{g})" for n, u, g in others if u == uid or g == gid]
    if shared:
        bad.append(f"shared with {len(shared)} other running container(s): " + ", ".join(shared[:5]))
    obs += f"; {len(others)} other running containers hold other ids"
    if isinstance(peer, tuple):
        obs += f"; a second sandbox of this policy got {peer[0]}:{peer[1]}"
        if peer == (uid, gid) or peer[0] == uid or peer[1] == gid:
            bad.append(f"a second sandbox of the same policy got the same ids {peer[0]}:{peer[1]}")
    elif isinstance(peer, str):
        obs += f"; a second sandbox of this policy was refused: {peer[:160]}"
    if bad:
        return result("outside.uid_unique", "fail", "; ".join(bad) + f" ({obs})")
    return result("outside.uid_unique", "pass", obs)


# ---------------------------------------------------------------- a shipped policy

def _spec_body(policy: Any, session_id: str, attrs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The policy's compiled spec, for the ids the runtime leased this container (Config.User)."""
    from sandbox import spec as specmod

    binds = specmod.Binds(workspace_dir="/audit-placeholder" if policy.workspace.backing == "disk" else None,
                          egress_dir="/audit-placeholder" if policy.egress.enabled else None)
    uid, gid = container_ids(attrs or {})
    ids_cls = getattr(specmod, "Ids", None)
    if ids_cls is not None and uid and gid:
        return specmod.compile_spec(policy, session_id, binds, ids=ids_cls(uid, gid)).body
    return specmod.compile_spec(policy, session_id, binds).body


def run_in_sandbox(sb: Any, probes: tuple[str, ...] | list[str], timeout: float = PROBE_TIMEOUT_S,
                   masked: list[str] | None = None,
                   extra: dict[str, Any] | None = None) -> tuple[dict[str, Any] | None, Any]:
    scratch = [sb.policy.workspace.path] + [t.path for t in sb.policy.tmpfs]
    res = sb.exec(probe_argv(probe_config(probes, scratch, masked=masked, extra=extra)), timeout=timeout,
                  max_output=MAX_PROBE_OUTPUT)
    return parse_probe_output(res.stdout), res


def _egress_extra(exp: Any, writable: Any) -> dict[str, Any]:
    from sandbox.audit.egress import probe_section

    return {} if exp is None else {"egress": probe_section(exp, sorted(writable or []))}


def _egress_in_sandbox(sb: Any, exp: Any, writable: Any) -> dict[str, Any]:
    """The egress scan alone (its own output budget): digests, trust store, SNI tries."""
    data, res = run_in_sandbox(sb, ["egress"], timeout=120, extra=_egress_extra(exp, writable))
    section = (data or {}).get("egress")
    if exp is not None:
        exp.load_records()  # after the probe: the proxy wrote its SNI decisions when the tunnels closed
    if isinstance(section, dict):
        return section
    return {"probe_error": f"the egress probe gave no result ({res.error or f'exit {res.exit_code}'})"[:200]}


def audit_egress(sb: Any, client: Any) -> list[CheckResult]:
    """Only the three egress rows, for a sandbox that already runs (its policy known)."""
    attrs = client.api.inspect_container(sb.id)
    exp = chk.Expectations.from_policy(sb.policy)
    exp = replace(exp, egress=egress_prepare(sb.policy, attrs, sb.session_id))
    probe = {"egress": _egress_in_sandbox(sb, exp.egress, exp.writable)}
    return chk.evaluate_inside(probe, exp, only=("inside.egress_secrets", "inside.egress_trust_store",
                                                 "inside.egress_sni"))


def _signals_in_sandbox(sb: Any) -> dict[str, Any]:
    """SIGSTOP/SIGTERM/SIGKILL to the agent (PID 1), alone: if it dies, the sandbox ends with it."""
    try:
        data, res = run_in_sandbox(sb, ["signals"], timeout=30)
    except Exception as e:  # noqa: BLE001 - the sandbox went away under the test: that is the finding
        return {"ended": f"the sandbox ended after signals to PID 1 (the agent): {type(e).__name__}: {str(e)[:120]}"}
    sig = (data or {}).get("signals")
    if isinstance(sig, dict) and sb.alive:
        return sig
    if isinstance(sig, dict):
        return {"ended": "the probe saw PID 1 survive, yet the sandbox ended right after"}
    why = (res.error or f"exit {res.exit_code}")[:120]
    return {"ended": f"no answer after signals to PID 1 (the agent): it was stopped or killed ({why})"}


FORGE_EXIT = 7


def _forge_in_sandbox(sb: Any) -> dict[str, Any]:
    """Write forged result frames through /proc/1/fd/1; the host's verdict on what it then reported."""
    from sandbox.audit.probe_script import FORGED_MARK

    cfg = probe_config(["forge"])
    cfg["exit_code"] = FORGE_EXIT
    try:
        res = sb.exec(probe_argv(cfg), timeout=30)
    except Exception as e:  # noqa: BLE001 - the host refusing the channel may surface as an error
        return {"host": "refused", "detail": f"{type(e).__name__}: {str(e)[:160]}"}
    data = parse_probe_output(res.stdout) or {}
    raw = data.get("forge")
    forge: dict[str, Any] = raw if isinstance(raw, dict) else {}
    forged = FORGED_MARK.encode() in (res.stdout or b"") or (res.exit_code == 0 and not res.error)
    if forged:
        return {**forge, "host": "ACCEPTED", "detail": f"the host reported exit {res.exit_code}"
                + (" and the forged output" if FORGED_MARK.encode() in (res.stdout or b"") else "")}
    if res.error:
        return {**forge, "host": "refused", "detail": f"the host ended the sandbox: {res.error[:160]}"}
    return {**forge, "host": "real result", "detail": f"the host reported the command's real exit {res.exit_code}"}


def _peer(rt: Any, policy: Any, session_id: str
          ) -> tuple[tuple[int | None, int | None] | str, dict[str, Any] | None, dict[str, Any] | None]:
    """Start a second sandbox of the same policy while the audited one lives: which ids does it get?
    The attacks that may end a sandbox (forged result frames, signals to the agent) run in that
    one, so a sandbox they end costs no other row. Returns (ids or refusal, signals, forge)."""
    try:
        peer = rt.create(policy, session_id=f"{session_id}_peer")
    except Exception as e:  # noqa: BLE001 - a pinned uid in use is refused: the answer, not an error
        return f"{type(e).__name__}: {e}", None, None
    try:
        ids = container_ids(rt.client.api.inspect_container(peer.id))
        forge = _forge_in_sandbox(peer)
        signals = None
        if peer.alive:
            signals = _signals_in_sandbox(peer)
            signals["where"] = "in a second sandbox of this policy, started for the purpose"
        return ids, signals, forge
    finally:
        peer.destroy()


def _fork_in_sandbox(sb: Any) -> dict[str, Any]:
    """The bounded fork test, alone and last: under gVisor reaching a limit can end the sandbox.
    The host's cgroup counters (not the sandbox's word) then say which limit stopped it."""
    before = sb.counters.snapshot()
    peak = dict(before)
    done = threading.Event()

    def watch() -> None:  # the cgroup disappears with the container: sample while it lives
        while not done.wait(0.05):
            for k, v in sb.counters.snapshot().items():
                if v is not None:
                    peak[k] = v if peak.get(k) is None else max(peak[k] or 0, v)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        data, res = run_in_sandbox(sb, ["fork"], timeout=60)
    finally:
        done.set()
        t.join(timeout=2)
    fork = (data or {}).get("fork")
    if isinstance(fork, dict):
        return fork
    hit = [name for key, name in (("pids_max", "pids"), ("oom_kill", "memory"))
           if before.get(key) is not None and (peak.get(key) or 0) > (before.get(key) or 0)]
    lim = f"pids.max {sb.policy.limits.pids}, RLIMIT_NPROC {sb.policy.rlimits.nproc}"
    why = (res.error or f"exit {res.exit_code}")[:80]
    if hit:
        return {"host_status": "warn", "host_verdict":
                f"contained, not gracefully: the host {' and '.join(hit)} cgroup limit stopped the forks ({lim}) "
                f"and the sandbox ended ({why}); under gVisor each sandbox process costs several host tasks, "
                "so the host backstop is reached before RLIMIT_NPROC refuses a fork"}
    return {"host_status": "fail", "host_verdict": f"the fork test gave no answer and no host limit was seen hit ({lim}): {why}"}


def audit_policy(policy: Any, runtime: Any = None, *, fork_test: bool = True,
                 session_id: str | None = None) -> AuditReport:
    """Start a fresh sandbox of ``policy``, probe it inside and out, tear it down."""
    from sandbox.runtime import Runtime, SandboxError

    rt = runtime or Runtime(owner_kind="audit")
    session_id = session_id or f"audit_{uuid.uuid4().hex[:10]}"
    report = AuditReport(target=f"profile {policy.name}")
    try:
        sb = rt.create(policy, session_id=session_id)
    except SandboxError as e:
        raise AuditError(f"could not start a sandbox of {policy.name}: {e}") from None
    try:
        attrs = rt.client.api.inspect_container(sb.id)
        info, engine_rows = _engine(rt.client)
        # While the sandbox lives: the host-side cgroup files go with it.
        outside = evaluate_outside(attrs, info, policy=policy, spec_body=_spec_body(policy, session_id, attrs))
        pinned = (policy.user.uid, policy.user.gid) if isinstance(policy.user.uid, int) else None
        peer_ids, signals, forge = _peer(rt, policy, session_id)
        outside.append(uid_row(rt.client, attrs, pinned=pinned, peer=peer_ids))
        outside.append(weakenings_row(policy))
        outside.append(exec_seccomp_row(policy.runtime, audited_by_exec=False))
        masked = [str(m) for m in (attrs.get("HostConfig") or {}).get("MaskedPaths") or []]
        probe, res = run_in_sandbox(sb, ALL_PROBES, masked=masked)
        if probe is None:
            report.notes.append(f"probe gave no result (exit {res.exit_code}, {res.error or 'no marker'}): "
                                "every inside check fails")
            probe = {}
        egress_exp = egress_prepare(policy, attrs, session_id)
        if probe and sb.alive:
            probe["egress"] = _egress_in_sandbox(sb, egress_exp, chk.Expectations.from_policy(policy).writable)
        if fork_test and sb.alive:
            probe["fork"] = _fork_in_sandbox(sb)
        if signals is None and sb.alive:  # no second sandbox (a pinned uid): the audited one, last
            signals = _signals_in_sandbox(sb)
        if signals is not None and probe:
            probe["signals"] = signals
        if forge is not None and isinstance(probe.get("agent"), dict):
            probe["agent"]["forge"] = forge
    finally:
        sb.destroy()
    exp = replace(chk.Expectations.from_policy(policy).with_ids(*container_ids(attrs)), egress=egress_exp)
    inside = chk.evaluate_inside(probe, exp, missing_reason="the probe did not report it")
    if not fork_test:
        inside = [skipped(r.id, "fork test disabled") if r.id == "inside.fork_bounded" else r for r in inside]
    report.header = _header(attrs, info, rt.client, probe)
    report.header.update(policy_header(policy))
    report.header["probe"] = "python3, through the sandbox's agent"
    report.checks = _no_silent_pass(inside, probe) + outside + engine_rows
    return report


def _no_silent_pass(rows: list[CheckResult], probe: dict[str, Any]) -> list[CheckResult]:
    """With no probe output at all, inside rows fail rather than skip: the audit asked and got nothing."""
    if probe:
        return rows
    from sandbox.audit.catalog import result

    return [result(r.id, "fail", "no probe output") if r.status == "skip" else r for r in rows]


# ---------------------------------------------------------------- any container

def _exec(client: Any, cid: str, argv: list[str]) -> tuple[int | None, bytes, bytes]:
    res = client.api.exec_create(cid, argv, stdout=True, stderr=True)
    out = client.api.exec_start(res["Id"], demux=True)
    code = client.api.exec_inspect(res["Id"]).get("ExitCode")
    so, se = out if isinstance(out, tuple) else (out, b"")
    return code, so or b"", se or b""


def _policy_from_labels(labels: dict[str, str]) -> Any:
    """A sandbox this project made: use its policy's exact expectations if the label's hash matches."""
    from sandbox import spec as specmod
    from sandbox.policy import PolicyError, load_policy

    name, digest = labels.get(specmod.LABEL_POLICY), labels.get(specmod.LABEL_DIGEST)
    if not name or not digest:
        return None
    try:
        pol = load_policy(name)
    except (PolicyError, OSError):
        return None
    return pol if pol.digest() == digest else None


def audit_container(client: Any, container_id: str, *, probe: bool = False, force_shell: bool = False,
                    fork_test: bool = True) -> AuditReport:
    """Audit a container that already runs. Inside probes only with ``probe=True``: they execute code in it."""
    import docker.errors

    try:
        attrs = client.api.inspect_container(container_id)
    except docker.errors.NotFound:
        raise AuditError(f"no such container: {container_id}") from None
    info, engine_rows = _engine(client)
    hc, cfg = attrs.get("HostConfig") or {}, attrs.get("Config") or {}
    labels = cfg.get("Labels") or {}
    policy = _policy_from_labels(labels)
    runtime = str(hc.get("Runtime") or info.get("DefaultRuntime") or "runc")
    exp = chk.Expectations.from_policy(policy) if policy is not None else chk.Expectations(runtime=runtime)
    if policy is not None:
        exp = exp.with_ids(*container_ids(attrs))
        exp = replace(exp, egress=egress_prepare(policy, attrs, labels.get("org.sandbox.session")))
    else:
        exp = replace(exp, no_egress_reason="no policy known for this container (not a managed sandbox, or its "
                      "profile does not load here with the digest on its label)")
    report = AuditReport(target=f"container {attrs.get('Name', '').lstrip('/') or container_id[:12]}")
    running = bool((attrs.get("State") or {}).get("Running"))
    data: dict[str, Any] | None = None
    unavailable: dict[str, str] = {}
    how = "none"
    if not probe:
        reason = "inside probes not requested (--probe runs code in the container)"
        inside = [skipped(i, reason) for i in INSIDE_IDS]
        report.scope = "configuration"
        report.notes.append("configuration only: the container's settings were inspected from outside; nothing "
                            f"ran inside it, so {len(INSIDE_IDS)} inside checks did not run (--probe runs them)")
    elif not running:
        inside = [skipped(i, "the container is not running") for i in INSIDE_IDS]
    else:
        masked = [str(m) for m in hc.get("MaskedPaths") or []]
        data, how, unavailable = _probe_container(client, container_id, runtime, force_shell, fork_test, masked)
        if data is not None and how == "python3":
            data["egress"] = _egress_in_container(client, container_id, exp)
        unavailable.setdefault("inside.agent_signals", SIGNALS_NOT_OWNED)
        if data is None:
            inside = [skipped(i, how) for i in INSIDE_IDS]
            how = "none"
        else:
            inside = chk.evaluate_inside(data, exp, unavailable=unavailable)
    outside = evaluate_outside(attrs, info, policy=policy,
                               spec_body=_spec_body(policy, labels.get("org.sandbox.session", "x"), attrs)
                               if policy else None)
    pinned = (policy.user.uid, policy.user.gid) if policy is not None and isinstance(policy.user.uid, int) else None
    outside.append(uid_row(client, attrs, pinned=pinned))
    outside.append(weakenings_row(policy))
    outside.append(exec_seccomp_row(runtime, audited_by_exec=probe and running,
                                    exec_ids=list(attrs.get("ExecIDs") or [])))
    report.header = _header(attrs, info, client, data)
    report.header["probe"] = how
    if policy is not None:
        report.header.update(policy_header(policy))
    elif labels.get("org.sandbox.policy-digest"):
        report.header.update({"policy": labels.get("org.sandbox.policy"),
                              "policy_hash": labels["org.sandbox.policy-digest"] + " (label only; not loadable here)"})
    if unavailable:
        report.notes.append(f"{len(unavailable)} inside checks could not run: {how}")
    report.checks = inside + outside + engine_rows
    return report


def _egress_in_container(client: Any, cid: str, exp: Any) -> dict[str, Any]:
    _, out, err = _exec(client, cid, probe_argv(probe_config(["egress"], extra=_egress_extra(exp.egress, exp.writable)),
                                                isolated=False))
    if exp.egress is not None:
        exp.egress.load_records()
    section = (parse_probe_output(out) or {}).get("egress")
    if isinstance(section, dict):
        return section
    return {"probe_error": f"the egress probe gave no result: {err.decode('utf-8', 'replace')[-160:]}"}


def _probe_container(client: Any, cid: str, runtime: str, force_shell: bool, fork_test: bool,
                     masked: list[str] | None = None) -> tuple[dict[str, Any] | None, str, dict[str, str]]:
    unavailable: dict[str, str] = {}
    if not force_shell:
        code, out, _ = _exec(client, cid, ["python3", "-c", "import sys; print(sys.version_info >= (3, 6))"])
        if code == 0 and out.strip() == b"True":
            probes = list(ALL_PROBES)
            if fork_test and runtime != "runsc":
                probes.append("fork")
            elif runtime == "runsc":
                unavailable["inside.fork_bounded"] = "not run under gVisor: reaching the limit can end the sandbox"
            else:
                unavailable["inside.fork_bounded"] = "fork test disabled"
            # Not isolated (-I): a foreign image's python may be older than 3.4.
            _, out, err = _exec(client, cid, probe_argv(probe_config(probes, masked=masked), isolated=False))
            data = parse_probe_output(out)
            if data is not None:
                return data, "python3", unavailable
            return None, f"the python3 probe gave no result: {err.decode('utf-8', 'replace')[-200:]}", unavailable
    code, out, err = _exec(client, cid, ["sh", "-c", SH_PROBE])
    if code is None or b"done|ok|ok" not in out:
        return None, "neither python3 nor a usable sh in the container", unavailable
    data = parse_sh(out.decode("utf-8", "replace"))
    unavailable.update(SH_UNAVAILABLE)
    if "walk" not in data:
        unavailable["inside.setid_files"] = "no find(1) in the container"
    return data, "sh subset (no python3 in the container)" if not force_shell else "sh subset (forced)", unavailable
