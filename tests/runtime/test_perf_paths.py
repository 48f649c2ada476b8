"""The fast paths are the real paths: the compiled-policy cache never serves a stale, weaker or
forged policy, and what it serves makes the same create body as a freshly loaded profile.
(The benchmarks are in bench/bench_runtime.py; nothing here measures time.)"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sandbox import policycache, spec
from sandbox.errors import PolicyError
from sandbox.paths import SHIPPED_PROFILES_DIR
from sandbox.policy import load_policy
from sandbox.runtime import Sandbox

SECCOMP_DEFAULT = SHIPPED_PROFILES_DIR / "seccomp" / "default.yaml"


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private state dir and a user profile dir: parent.yaml <- child.yaml, and a seccomp list of its own."""
    state, profiles = tmp_path / "state", tmp_path / "profiles"
    (profiles / "seccomp").mkdir(parents=True)
    monkeypatch.setenv("SANDBOX_STATE_DIR", str(state))
    monkeypatch.setenv("SANDBOX_PROFILES", str(profiles))
    monkeypatch.chdir(tmp_path)  # ./profiles is on the search path too: the same dir here
    (profiles / "seccomp" / "mylist.yaml").write_text(SECCOMP_DEFAULT.read_text())
    (profiles / "parent.yaml").write_text("extends: default\nlimits: {memory_mb: 512, cpus: 1.0, pids: 100}\n"
                                          "seccomp: {profile: mylist}\n")
    (profiles / "child.yaml").write_text("extends: parent\nenv: {A: '1'}\n")
    policycache.clear_memo()
    yield profiles
    policycache.clear_memo()


def _fresh(profile: str) -> dict:
    return spec.policy_facts(load_policy(profile))


def _entry_file() -> Path:
    files = list(policycache.cache_dir().glob("*.json"))
    assert len(files) == 1, files
    return files[0]


def test_cached_policy_makes_the_same_create_body_as_a_fresh_load(env: Path) -> None:
    first = policycache.load("child")
    policycache.clear_memo()
    second = policycache.load("child")
    assert not first.cached and second.cached
    fresh = load_policy("child")
    assert second.digest == fresh.digest()
    assert second.facts == spec.policy_facts(fresh)
    ids = spec.Ids(2_000_123, 2_000_123)
    assert (spec.body_from_facts(second.facts, "s1", owner="o", ids=ids).body
            == spec.compile_spec(fresh, "s1", owner="o", ids=ids).body)
    assert second.policy().digest() == fresh.digest()


def test_editing_the_parent_profile_invalidates_the_cached_child(env: Path) -> None:
    assert policycache.load("child").facts["limits"]["pids"] == 100
    policycache.clear_memo()  # the on-disk entry is what is checked
    (env / "parent.yaml").write_text((env / "parent.yaml").read_text().replace("pids: 100", "pids: 64"))
    cp = policycache.load("child")
    assert not cp.cached and cp.facts["limits"]["pids"] == 64
    assert cp.facts == _fresh("child")


def test_editing_the_profile_itself_invalidates_even_within_one_process(env: Path) -> None:
    assert policycache.load("child").facts["env"] == {"A": "1"}
    (env / "child.yaml").write_text("extends: parent\nenv: {A: '2'}\n")
    assert policycache.load("child").facts["env"] == {"A": "2"}  # the in-process memo re-checks too


def test_editing_the_seccomp_list_invalidates_and_changes_the_digest(env: Path) -> None:
    before = policycache.load("child")
    assert "getpid" in before.facts["seccomp_profile"]["syscalls"][0]["names"]
    policycache.clear_memo()
    data = yaml.safe_load((env / "seccomp" / "mylist.yaml").read_text())
    data["allow"] = [[n for n in group if n != "getpid"] if isinstance(group, list) else group
                     for group in data["allow"]]
    (env / "seccomp" / "mylist.yaml").write_text(yaml.safe_dump(data))
    after = policycache.load("child")
    assert not after.cached
    assert "getpid" not in after.facts["seccomp_profile"]["syscalls"][0]["names"]
    assert after.digest != before.digest and after.digest == load_policy("child").digest()


def test_a_weakened_seccomp_list_is_refused_not_served_from_the_cache(env: Path) -> None:
    policycache.load("child")
    policycache.clear_memo()
    text = (env / "seccomp" / "mylist.yaml").read_text()
    (env / "seccomp" / "mylist.yaml").write_text(text.replace("allow:\n", "allow:\n  - [ptrace]\n", 1))
    with pytest.raises(PolicyError, match="ptrace"):
        policycache.load("child")


def test_a_profile_that_newly_shadows_a_name_on_the_search_path_invalidates(env: Path, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    monkeypatch.setenv("SANDBOX_PROFILES", f"{earlier}{os.pathsep}{env}")
    assert policycache.load("child").facts["env"] == {"A": "1"}
    policycache.clear_memo()
    # a child.yaml earlier on the search path now wins the name
    (earlier / "child.yaml").write_text("extends: default\nlimits: {memory_mb: 512, cpus: 1.0, pids: 32}\n")
    cp = policycache.load("child")
    assert not cp.cached and cp.facts["limits"]["pids"] == 32 and cp.facts["env"] == {}


def test_a_tampered_cache_entry_is_detected_and_not_trusted(env: Path, caplog: pytest.LogCaptureFixture) -> None:
    policycache.load("child")
    policycache.clear_memo()
    path = _entry_file()
    doc = json.loads(path.read_text())
    doc["entry"]["facts"]["limits"]["pids"] = 1_000_000  # a weaker limit, MAC left as it was
    doc["entry"]["facts"]["seccomp_profile"]["defaultAction"] = "SCMP_ACT_ALLOW"
    path.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING, logger="sandbox.policycache"):
        cp = policycache.load("child")
    assert "failed authentication" in caplog.text
    assert not cp.cached
    assert cp.facts["limits"]["pids"] == 100 and cp.facts["seccomp_profile"]["defaultAction"] == "SCMP_ACT_ERRNO"
    policycache.clear_memo()
    assert policycache.load("child").cached  # rewritten, authentic again


def test_an_entry_made_under_another_key_is_not_trusted(env: Path) -> None:
    policycache.load("child")
    policycache.clear_memo()
    key = policycache.cache_dir() / ".key"
    key.write_bytes(os.urandom(32))  # e.g. an entry copied from another host or user
    assert not policycache.load("child").cached


def test_a_cache_writable_by_others_is_not_used(env: Path) -> None:
    policycache.load("child")
    policycache.clear_memo()
    os.chmod(_entry_file(), 0o666)
    assert not policycache.load("child").cached
    policycache.clear_memo()
    os.chmod(policycache.cache_dir(), 0o777)
    cp = policycache.load("child")  # the directory itself is not private: no cache at all
    assert not cp.cached and cp.facts == _fresh("child")


def test_an_invalid_profile_raises_the_same_error_with_a_cache(env: Path) -> None:
    (env / "bad.yaml").write_text("extends: default\nlimits: {pids: 1}\n")
    with pytest.raises(PolicyError) as e:
        policycache.load("bad")
    assert any(k == "limits.pids" and f.endswith("bad.yaml") for f, k, _ in e.value.problems)


def test_the_cached_path_imports_no_policy_model(env: Path) -> None:
    code = ("import sys\nfrom sandbox import api\n"
            "cp = api.load_compiled('child')\n"
            "print(cp.cached, 'pydantic' in sys.modules, 'yaml' in sys.modules, 'pyseccomp' in sys.modules)\n")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
            .stdout.split() for _ in range(2)]
    assert runs[0][0] == "False" and runs[0][1] == "True"  # a miss validates with the model
    assert runs[1] == ["True", "False", "False", "False"]   # a hit needs none of it


@pytest.mark.docker
def test_a_sandbox_from_the_cached_policy_carries_the_fresh_digest_and_limits(docker_client, runtime, env: Path) -> None:
    policycache.load("child")
    policycache.clear_memo()
    cp = policycache.load("child")
    assert cp.cached
    sb = runtime.create(cp)
    try:
        info = docker_client.api.inspect_container(sb.id)
        assert info["Config"]["Labels"]["org.sandbox.policy-digest"] == load_policy("child").digest()
        assert info["HostConfig"]["PidsLimit"] == 100
        assert sb.exec(["sh", "-c", "echo $A"]).stdout == b"1\n"
        assert sb.policy.digest() == cp.digest  # the full model, loaded on demand
    finally:
        sb.destroy()


@pytest.mark.docker
def test_the_policy_model_is_refused_once_the_profile_changed_under_a_running_sandbox(runtime, env: Path) -> None:
    policycache.load("child")
    policycache.clear_memo()
    cp = policycache.load("child")
    sb = runtime.create(cp)
    try:
        (env / "child.yaml").write_text("extends: parent\nenv: {A: '3'}\n")
        with pytest.raises(PolicyError, match="changed since this sandbox was created"):
            _ = sb.policy
    finally:
        sb.destroy()


@pytest.mark.docker
def test_exec_cli_teardown_without_waiting_leaves_no_container(docker_client, env: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "sandbox", "exec", "--json", "--", "sh", "-c", "sleep 30 & echo up"],
                       capture_output=True, text=True, timeout=120, env=os.environ)
    doc = json.loads(r.stdout)
    assert doc["stdout"] == "up\n", r.stderr
    deadline = time.monotonic() + 20
    while docker_client.api.containers(all=True, filters={"id": doc["sandbox"]}):
        assert time.monotonic() < deadline, "the sandbox outlived `sandbox exec`"
        time.sleep(0.1)


@pytest.mark.docker
def test_the_agent_modules_load_from_bytecode_in_the_image_that_matches_their_source(make_sandbox) -> None:
    """The root filesystem is read-only: without shipped .pyc files every agent start compiles from source."""
    sb = make_sandbox()
    res = sb.exec(["python3", "-I", "-S", "-v", "-c",
                   "import sys; sys.path.insert(0, '/opt/sandbox-agent'); import tools, reaper, forwarder"])
    err = res.stderr.decode()
    for mod in ("tools", "reaper", "forwarder"):
        assert f"code object from '/opt/sandbox-agent/__pycache__/{mod}." in err, err[-2000:]
        assert re.search(rf"__pycache__/{mod}\.[\w-]+\.pyc matches /opt/sandbox-agent/{mod}\.py", err), err[-2000:]


def _procs_of_uid(uid: int) -> list[int]:
    """Live processes of the uid. A zombie is left out: it runs nothing and holds nothing but its pid
    slot, and the sandbox's PID 1 is one from its exit (what the pidfd reports) until the engine's shim
    reaps it, which on a loaded host can come after destroy() returned (seen in CI)."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                fields = dict(line.split(":", 1) for line in (p / "status").read_text().splitlines() if ":" in line)
                if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith("Z"):
                    out.append(int(p.name))
            except (OSError, ValueError, KeyError):
                pass
    return out


@pytest.mark.docker
@pytest.mark.parametrize("wait", [True, False], ids=["destroy", "destroy-nowait"])
def test_destroy_through_the_agent_still_ends_every_process_of_the_sandbox(runtime, docker_client, wait: bool) -> None:
    """destroy() ends a private sandbox through its agent (stdin EOF; PID 1's exit kills the rest),
    with the engine's kill as the fallback: a detached background process must not survive it."""
    sb = runtime.create(load_policy("default"))
    uid = sb.uid
    try:
        r = sb.exec(["sh", "-c", "setsid sleep 300 >/dev/null 2>&1 < /dev/null & echo started"])
        assert r.stdout == b"started\n"
        assert len(_procs_of_uid(uid)) >= 1
    finally:
        sb.destroy(wait=wait)
    deadline = time.monotonic() + 20
    while _procs_of_uid(uid) or docker_client.api.containers(all=True, filters={"id": sb.id}):
        assert time.monotonic() < deadline, f"processes of uid {uid} or the container outlived destroy()"
        time.sleep(0.05)


@pytest.mark.parametrize("args, plan", [
    (["exec", "--", "ls", "-l"], ("default", False, ["ls", "-l"])),
    (["exec", "ls", "-l"], ("default", False, ["ls", "-l"])),
    (["exec", "-p", "worker", "--json", "grep", "-h", "x"], ("worker", True, ["grep", "-h", "x"])),
    (["exec", "--profile=gvisor", "--", "--json"], ("gvisor", False, ["--json"])),
    (["exec", "-e", "A=1", "--", "env"], None),          # any other option: the click command line
    (["exec", "-w", "/tmp", "ls"], None),
    (["exec", "--help"], None),
    (["exec", "-p", "--json", "ls"], None),               # an option value that looks like an option
    (["exec"], None),
    (["exec", "--"], None),
    (["ps"], None),
    (["--json", "exec", "ls"], None),
])
def test_the_click_free_front_door_takes_only_the_plainest_exec(args: list[str], plan: object) -> None:
    from sandbox.execcmd import _plain_exec

    assert _plain_exec(args) == plan


def test_a_bad_profile_fails_the_same_through_the_front_door_and_through_click(env: Path) -> None:
    def run(*extra: str) -> tuple[int, dict, str]:
        r = subprocess.run([sys.executable, "-m", "sandbox", "exec", "--json", "-p", "nope", *extra, "--", "true"],
                           capture_output=True, text=True, timeout=60, env=os.environ)
        return r.returncode, json.loads(r.stdout), r.stderr

    fast, slow = run(), run("-e", "A=1")  # -e: parsed by click
    assert fast[0] == slow[0] == 2
    assert fast[1] == slow[1] and fast[1]["error"]["kind"] == "policy"
    assert fast[2] == slow[2]


@pytest.mark.docker
@pytest.mark.parametrize("path", ["agent", "agent-eof", "engine-kill"])
def test_destroy_ends_the_sandbox_by_either_path(runtime, docker_client, monkeypatch: pytest.MonkeyPatch,
                                                 path: str) -> None:
    """Through the agent (SIGKILL on PID 1's pidfd, or stdin EOF where the host may not signal it;
    the pidfd as proof) the engine's kill is never needed; without a usable pidfd the kill does it.
    Either way nothing of the sandbox is left."""
    import signal

    from sandbox import runtime as runtime_mod

    sb = runtime.create(load_policy("default"))
    uid = sb.uid
    sb.exec(["sh", "-c", "setsid sleep 300 >/dev/null 2>&1 < /dev/null &"])
    if path.startswith("agent"):
        def no_kill(cid: str) -> None:
            raise AssertionError("the engine's kill was used although the agent path was available")
        monkeypatch.setattr(runtime.engine, "kill", no_kill)
        if path == "agent-eof":
            def refused(fd: int, sig: int) -> None:
                raise PermissionError(1, "Operation not permitted")  # a host process of another uid
            monkeypatch.setattr(runtime_mod.signal, "pidfd_send_signal", refused)
            assert runtime_mod.signal is signal
        elif os.geteuid() == 0:  # root may signal any sandbox: the signal alone ends it
            def no_eof() -> None:
                raise AssertionError("stdin's EOF was used although the signal could be sent")
            monkeypatch.setattr(sb.channel, "close_stdin", no_eof)
    else:
        sb.agent_pid = (sb.agent_pid[0], sb.agent_pid[1] + 1)  # as if the pid had been reused
    sb.destroy()
    monkeypatch.undo()
    if path.startswith("agent"):
        assert not _procs_of_uid(uid), "destroy() returned before every process of the sandbox was gone"
    deadline = time.monotonic() + 20
    while _procs_of_uid(uid) or docker_client.api.containers(all=True, filters={"id": sb.id}):
        assert time.monotonic() < deadline, f"processes of uid {uid} or the container outlived destroy()"
        time.sleep(0.05)


def test_a_process_holding_over_a_thousand_descriptors_still_ends_a_sandbox_through_its_agent(
        runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker with hundreds of sandboxes holds their channels and pidfds: the pidfd it waits on is then
    numbered 1024 or more, which select(2) refuses (destroy fell back to the engine's kill, 50-90 ms)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    held = []
    try:
        while not held or held[-1] < 1030:
            held.append(os.open("/dev/null", os.O_RDONLY))
        sb = runtime.create(load_policy("default"))
        uid = sb.uid

        def no_kill(cid: str) -> None:
            raise AssertionError("the engine's kill was used although the agent path was available")
        monkeypatch.setattr(runtime.engine, "kill", no_kill)
        sb.destroy()
        monkeypatch.undo()
        assert not _procs_of_uid(uid)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_when_the_loader_reads_are_not_recorded_nothing_is_cached(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the policy loader stopped reading through the hook, the chain's files would be unknown:
    then the profile is loaded every time and no entry is written."""
    from sandbox import policy as pol

    real_load, direct_read = pol.load_policy, pol._read_yaml

    def load_reading_around_the_hook(name: str):  # as if the loader read its files another way
        hooked = pol._read_yaml
        pol._read_yaml = direct_read
        try:
            return real_load(name)
        finally:
            pol._read_yaml = hooked

    monkeypatch.setattr(pol, "load_policy", load_reading_around_the_hook)
    cp = policycache.load("child")
    assert not cp.cached and cp.facts == _fresh("child")
    assert not list(policycache.cache_dir().glob("*.json"))


@pytest.mark.docker
def test_an_idle_agent_maps_no_openssl_and_loads_tools_and_subprocess_only_when_used(make_sandbox, runtime) -> None:
    """Idle memory per sandbox (issue 11): the agent's MAC is CPython's own SHA-256 (hashlib would map
    OpenSSL into every sandbox's PID 1) and the tool ops and `subprocess` load on first use; the
    channel still authenticates (the host side uses `hmac`) and the first tool op still works."""
    sb = make_sandbox()
    pid = runtime.engine.inspect(sb.id)["State"]["Pid"]

    def maps() -> str:
        return Path(f"/proc/{pid}/maps").read_text()

    assert "libcrypto" not in maps() and "_hashlib" not in maps()
    assert "_lzma" not in maps()  # tools.py imports shutil, which loads _lzma: not yet
    assert sb.exec(["sh", "-c", "echo hi"]).stdout == b"hi\n"
    assert "_lzma" not in maps()
    assert sb.call("write", file_path="t.txt", content="x") == {"text": "wrote 1 bytes to t.txt"}
    assert "_lzma" in maps()  # the tool ops loaded on first use (so the marker above means something)
    assert "libcrypto" not in maps()


def _assert_no_zombie_soon(sb: Sandbox) -> None:
    """Within 5 s no process of the sandbox is a zombie (its orphans were reaped)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        zombies = sb.exec(["sh", "-c", "grep -l '^State:.*Z' /proc/[0-9]*/status 2>/dev/null | wc -l"]).stdout
        if zombies.strip() == b"0":
            return
        time.sleep(0.2)
    raise AssertionError(f"an orphan was left a zombie ({zombies.strip().decode()} zombies)")


def _agent_wakeups(pid: int) -> int:
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        for line in status.read_text().splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


@pytest.mark.docker
def test_an_agent_whose_shell_sits_idle_does_not_wake_up_and_still_reaps_orphans(make_sandbox, runtime) -> None:
    """A session's sandbox between calls keeps its persistent bash (a child of the agent): the reaper
    polled 20 times a second while any child existed (3.7 ms of CPU a second per idle sandbox). It now
    sleeps in the kernel until a child exits; orphans are still reaped and every command's own exit
    status still reaches its caller."""
    from sandbox.worker.tools import op_request

    sb = make_sandbox()
    pid = runtime.engine.inspect(sb.id)["State"]["Pid"]
    op_args, timeout = op_request("bash", {"command": "true"})
    sb.call("bash", timeout=timeout, **op_args)  # the persistent shell now lives
    assert b"bash" in sb.exec(["sh", "-c", "ps -eo ppid,args | grep '^ *1 ' "]).stdout
    time.sleep(0.5)
    before = _agent_wakeups(pid)
    time.sleep(2.0)
    assert _agent_wakeups(pid) - before <= 6, "an agent with an idle child keeps waking up"
    # orphans left by the persistent shell and by a one-off command are reaped, exit codes still arrive
    op_args, timeout = op_request("bash", {"command": "(sleep 0.2 &) ; for i in 1 2 3; do (sleep 0.1 &); done; true"})
    sb.call("bash", timeout=timeout, **op_args)
    assert sb.exec(["sh", "-c", "(sleep 0.3 &) ; exit 3"]).exit_code == 3
    _assert_no_zombie_soon(sb)
    op_args, timeout = op_request("bash", {"command": "echo still"})
    assert "still" in str(sb.call("bash", timeout=timeout, **op_args))


@pytest.mark.docker
def test_an_idle_agent_does_not_wake_up_and_still_reaps_orphans_when_work_comes(make_sandbox, runtime) -> None:
    """Hundreds of idle sandboxes per host: an idle agent sleeps (its reaper polled 20 times a second
    before), and an orphan a later command leaves is still reaped (no zombie holds the pids limit)."""
    sb = make_sandbox()
    pid = runtime.engine.inspect(sb.id)["State"]["Pid"]

    time.sleep(0.5)
    before = _agent_wakeups(pid)
    time.sleep(2.0)
    assert _agent_wakeups(pid) - before <= 4, "the idle agent keeps waking up"
    # an orphan: the child exits at once, its grandchild (reparented to PID 1) a moment later
    assert sb.exec(["sh", "-c", "(sleep 0.3 &) ; true"]).exit_code == 0
    _assert_no_zombie_soon(sb)


@pytest.mark.docker
def test_a_command_starts_as_popen_started_it_though_the_agent_uses_no_popen(make_sandbox) -> None:
    """The agent starts commands with the fork_exec call Popen makes (agent/reaper.py spawn_command),
    without importing `subprocess`, and waits for them on a pidfd: the same start for the command (no
    signal left ignored or blocked by the agent's Python, its own session), the same errors (127 for a
    missing command or directory, 126 for a file it cannot execute), exit codes, signals and timeouts."""
    sb = make_sandbox()
    r = sb.exec(["sh", "-c", "grep -E '^Sig(Ign|Blk)' /proc/self/status"])
    masks = dict(line.split(":") for line in r.stdout.decode().splitlines())
    # Python ignores SIGPIPE and SIGXFSZ; Popen's restore_signals gives the command their defaults
    assert set(masks) == {"SigIgn", "SigBlk"} and all(int(v, 16) == 0 for v in masks.values()), masks
    missing = sb.exec(["no-such-command-here"])
    assert (missing.exit_code, missing.error) == (127, "no-such-command-here: No such file or directory"), missing
    assert sb.exec(["/no/such/dir/cmd"]).exit_code == 127
    assert sb.exec(["true"], cwd="/no/such/dir").exit_code == 127
    denied = sb.exec(["/etc/passwd"])
    assert (denied.exit_code, denied.error) == (126, "/etc/passwd: Permission denied"), denied
    killed = sb.exec(["sh", "-c", "kill -TERM $$"])
    assert (killed.exit_code, killed.signal) == (143, 15), killed
    assert sb.exec(["sh", "-c", "cd /tmp && pwd; exit 7"], cwd="/tmp").exit_code == 7
    assert sb.exec(["sh", "-c", "echo $A"], env={"A": "b=c"}).stdout == b"b=c\n"
    slow = sb.exec(["sleep", "30"], timeout=1)
    assert slow.limit == "timeout", slow


@pytest.mark.docker
def test_the_agent_pid_found_in_the_sandbox_cgroup_is_the_one_the_engine_reports(runtime, monkeypatch) -> None:
    """create() takes the agent's pid from the cgroup it made for the container (no engine round trip);
    it must be the container's init as the engine knows it, and without that cgroup the engine is asked."""
    from sandbox import runtime as runtime_mod

    asked: list[str] = []
    inspect = runtime.engine.inspect
    monkeypatch.setattr(runtime.engine, "inspect", lambda cid: asked.append(cid) or inspect(cid))
    sb = runtime.create(load_policy("default"))
    try:
        assert sb.agent_pid is not None and sb.agent_pid[0] == inspect(sb.id)["State"]["Pid"]
        if Path("/sys/fs/cgroup/docker" if runtime_mod._CGROUP_V2 else "/sys/fs/cgroup/cpu/docker").is_dir():
            assert asked == [], "the engine was asked for a pid the cgroup gave"
    finally:
        sb.destroy()
    monkeypatch.setattr(runtime_mod, "_only_init", lambda d: None)
    sb = runtime.create(load_policy("default"))
    try:
        assert sb.agent_pid is not None and sb.agent_pid[0] == inspect(sb.id)["State"]["Pid"]
        assert sb.exec(["true"]).exit_code == 0
    finally:
        sb.destroy()
