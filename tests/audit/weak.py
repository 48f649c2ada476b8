"""Build and run the deliberately weak container described by weak.yaml (test-only code).

The weak setup is expressed as overrides to a compiled, hardened spec, so the
test shows exactly which hardening it removes; the audit must then fail the
rows listed under ``must_fail``.
"""

from __future__ import annotations

import copy
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from sandbox.engine import Engine, engine_socket_path
from sandbox.policy import load_policy
from sandbox.spec import Binds, compile_spec

FIXTURE = Path(__file__).with_name("weak.yaml")
LABEL = "org.sandbox.audit-weak-fixture"


def load_fixture() -> dict[str, Any]:
    return yaml.safe_load(FIXTURE.read_text())


def build_body(fx: dict[str, Any], decoy_socket: str) -> dict[str, Any]:
    spec = compile_spec(load_policy(fx["base"]), "audit-weak", Binds())
    body = copy.deepcopy(spec.body)
    body.update(copy.deepcopy(fx["config"]))
    body.update({"Cmd": fx["cmd"], "Entrypoint": None, "OpenStdin": False, "AttachStdin": False,
                 "AttachStdout": False, "AttachStderr": False, "StdinOnce": False,
                 "Labels": {LABEL: "true"}})  # not a managed sandbox: gc must not claim it, nor the audit trust it
    body["HostConfig"].update(copy.deepcopy(fx["host_config"]))
    m = fx["mounts"]
    body["HostConfig"]["Mounts"] = [
        {"Type": "bind", "Source": decoy_socket, "Target": m["decoy_docker_socket"], "ReadOnly": True},
        {"Type": "bind", "Source": m["read_only_host_file"]["source"], "Target": m["read_only_host_file"]["target"],
         "ReadOnly": True},
    ]
    return body


@contextmanager
def weak_container(tmp_dir: Path) -> Iterator[str]:
    """Start the weak container; yields its id; removes it whatever happens."""
    fx = load_fixture()
    sock_path = tmp_dir / "docker.sock"
    decoy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    decoy.bind(str(sock_path))  # bound, never listening: a connect from inside is refused
    engine = Engine(engine_socket_path() or "/var/run/docker.sock")
    cid = None
    try:
        cid = engine.create(build_body(fx, str(sock_path)), name=f"audit-weak-{secrets.token_hex(3)}")
        engine.start(cid)
        import docker

        client = docker.from_env(timeout=120)
        for cmd in fx.get("setup", []):
            code, out = client.containers.get(cid).exec_run(["sh", "-c", cmd])
            assert code == 0, out
        yield cid
    finally:
        if cid:
            _force_remove(cid)
        decoy.close()
        sock_path.unlink(missing_ok=True)


def _force_remove(cid: str) -> None:
    import docker

    try:
        docker.from_env(timeout=60).containers.get(cid).remove(force=True)
    except docker.errors.NotFound:
        pass
