"""Auth: who may call what, key files, and keys never leaking into logs or reprs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import anthropic
import httpx2 as httpx  # what anthropic ships; httpx is not a dependency
import pytest

from sandbox.controlplane import ControlPlane, ControlPlaneError, LocalAdmin
from sandbox.controlplane.keys import fingerprint

from .helpers import admin_client, env_client, http, sessions_token

HEADERS = {"anthropic-version": "2023-06-01", "anthropic-beta": "managed-agents-2026-04-01"}


def _get(cp: ControlPlane, path: str, **headers: str) -> httpx.Response:
    return http().get(cp.base_url + path, headers={**HEADERS, **headers}, timeout=5)


def test_missing_and_wrong_keys_are_401(cp: ControlPlane) -> None:
    path = f"/v1/environments/{cp.environment_id}/work/stats?beta=true"
    for headers in (
        {},
        {"Authorization": "Bearer sk-ant-oat01-wrong-wrong-wrong-wrong"},
        {"Authorization": "Bearer sk-ant-admin-local-wrongwrongwrongwrong"},
        {"Authorization": "Bearer sk-ant-req-wrongwrongwrongwrong"},
        {"Authorization": "Bearer " + cp.environment_key + "x"},
        {"Authorization": "Basic " + cp.environment_key},
        {"x-api-key": "not-a-key"},
    ):
        r = _get(cp, path, **headers)
        assert r.status_code == 401, headers
        assert r.json()["type"] == "error" and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.AuthenticationError):
        env_client(cp, "sk-ant-oat01-wrong-wrong-wrong-wrong").beta.environments.work.poll(cp.environment_id)


def test_environment_key_is_bearer_only(cp: ControlPlane) -> None:
    path = f"/v1/environments/{cp.environment_id}/work/stats"
    assert _get(cp, path, Authorization=f"Bearer {cp.environment_key}").status_code == 200
    assert _get(cp, path, **{"x-api-key": cp.environment_key}).status_code == 401


def test_conflicting_credentials_are_refused(cp: ControlPlane) -> None:
    r = _get(cp, f"/v1/environments/{cp.environment_id}/work/stats", Authorization=f"Bearer {cp.environment_key}", **{"x-api-key": cp.admin_key})
    assert r.status_code == 401


def test_admin_key_is_not_an_environment_key(cp: ControlPlane, admin: LocalAdmin) -> None:
    admin.create_session(cp.environment_id)
    admin_as_worker = env_client(cp, cp.admin_key).beta.environments.work
    with pytest.raises(anthropic.PermissionDeniedError):
        admin_as_worker.poll(cp.environment_id)
    with pytest.raises(anthropic.PermissionDeniedError):
        admin_as_worker.list(cp.environment_id)
    # ... but it is the operator's key where the real API wants the organisation key
    assert admin_client(cp).beta.environments.work.stats(cp.environment_id).depth == 1


def test_environment_key_is_not_an_admin_key(cp: ControlPlane, admin: LocalAdmin) -> None:
    sid = admin.create_session(cp.environment_id)
    item = env_client(cp).beta.environments.work.poll(cp.environment_id)
    assert item is not None
    worker = env_client(cp)
    with pytest.raises(anthropic.PermissionDeniedError):
        worker.beta.environments.work.retrieve(item.id, environment_id=cp.environment_id)
    with pytest.raises(anthropic.PermissionDeniedError):
        worker.beta.environments.work.update(item.id, environment_id=cp.environment_id, metadata={"a": "b"})
    with pytest.raises(anthropic.PermissionDeniedError):
        worker.beta.environments.create(name="x", config={"type": "self_hosted"})
    # the worker's key cannot play the model
    r = http().post(
        f"{cp.base_url}/local/v1/sessions/{sid}/events",
        json={"events": [{"type": "agent.tool_use", "name": "bash", "input": {}}]},
        headers={"Authorization": f"Bearer {cp.environment_key}"},
    )
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    r = http().post(f"{cp.base_url}/v1/sessions", json={"environment_id": cp.environment_id}, headers={**HEADERS, "Authorization": f"Bearer {cp.environment_key}"})
    assert r.status_code == 403


def test_sessions_token_is_scoped_to_its_session_and_item(cp: ControlPlane, admin: LocalAdmin) -> None:
    sid_a = admin.create_session(cp.environment_id)
    sid_b = admin.create_session(cp.environment_id)
    work = env_client(cp).beta.environments.work
    item_a = work.poll(cp.environment_id)
    item_b = work.poll(cp.environment_id)
    assert item_a and item_b and item_a.data.id == sid_a and item_b.data.id == sid_b
    tok_a = env_client(cp, sessions_token(item_a.secret))
    assert tok_a.beta.sessions.retrieve(sid_a).id == sid_a
    assert list(tok_a.beta.sessions.events.list(sid_a)) == []
    with pytest.raises(anthropic.NotFoundError):
        tok_a.beta.sessions.retrieve(sid_b)
    with pytest.raises(anthropic.NotFoundError):
        list(tok_a.beta.sessions.events.list(sid_b))
    with pytest.raises(anthropic.NotFoundError):
        tok_a.beta.sessions.events.send(sid_b, events=[{"type": "user.message", "content": [{"type": "text", "text": "x"}]}])
    with pytest.raises(anthropic.NotFoundError):
        tok_a.beta.environments.work.heartbeat(item_b.id, environment_id=cp.environment_id, expected_last_heartbeat="NO_HEARTBEAT")
    with pytest.raises(anthropic.NotFoundError):
        tok_a.beta.environments.work.stop(item_b.id, environment_id=cp.environment_id)
    with pytest.raises(anthropic.PermissionDeniedError):
        tok_a.beta.environments.work.poll(cp.environment_id)  # a token cannot claim more work
    # own item: ack, heartbeat, stop all fine; after stop the token no longer opens the session
    assert tok_a.beta.environments.work.ack(item_a.id, environment_id=cp.environment_id).state == "starting"
    tok_a.beta.environments.work.stop(item_a.id, environment_id=cp.environment_id, force=True)
    with pytest.raises(anthropic.AuthenticationError):
        tok_a.beta.sessions.retrieve(sid_a)


def test_environment_key_cannot_reach_another_environments_sessions(cp: ControlPlane) -> None:
    other = admin_client(cp).beta.environments.create(name="other", config={"type": "self_hosted"})
    with LocalAdmin(cp.base_url, cp.admin_key, http_client=http()) as admin:
        sid = admin.create_session(other.id)
    with pytest.raises(anthropic.NotFoundError):
        env_client(cp).beta.sessions.retrieve(sid)
    with pytest.raises(anthropic.NotFoundError):
        env_client(cp).beta.environments.work.stats(other.id)


def test_key_files_are_0600_with_expected_prefixes(cp: ControlPlane) -> None:
    for path, prefix in ((cp.admin_key_path, "sk-ant-admin-local-"), (cp.environment_key_path(), "sk-ant-oat01-")):
        assert path.stat().st_mode & 0o777 == 0o600
        assert path.read_text().strip().startswith(prefix)
    assert cp.state_dir.stat().st_mode & 0o077 == 0
    assert (cp.state_dir / "controlplane.db").stat().st_mode & 0o077 == 0


def test_keys_persist_across_restarts(tmp_path: Path) -> None:
    with ControlPlane(tmp_path / "s") as first:
        env_id, env_key, admin_key = first.environment_id, first.environment_key, first.admin_key
    with ControlPlane(tmp_path / "s") as second:
        assert (second.environment_id, second.environment_key, second.admin_key) == (env_id, env_key, admin_key)


@pytest.mark.parametrize("name", ["admin.key", "environment.key"])
def test_refuses_key_file_readable_by_others(tmp_path: Path, name: str) -> None:
    with ControlPlane(tmp_path / "s"):
        pass
    os.chmod(tmp_path / "s" / name, 0o640)
    with pytest.raises(ControlPlaneError, match="group/other"):
        ControlPlane(tmp_path / "s").start()
    os.chmod(tmp_path / "s" / name, 0o600)
    with ControlPlane(tmp_path / "s"):
        pass


def test_one_control_plane_per_state_dir(cp: ControlPlane) -> None:
    with pytest.raises(ControlPlaneError, match="another control plane"):
        ControlPlane(cp.state_dir).start()


def test_keys_never_appear_in_logs_or_reprs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with ControlPlane(tmp_path / "s") as cp, LocalAdmin(cp.base_url, cp.admin_key, http_client=http()) as admin:
        secrets = [cp.environment_key, cp.admin_key]
        sid = admin.create_session(cp.environment_id)
        item = env_client(cp).beta.environments.work.poll(cp.environment_id)
        assert item is not None
        token = sessions_token(item.secret)
        secrets.append(token)
        env_client(cp, token).beta.sessions.retrieve(sid)
        # Failed attempts, and a client that puts a key where it does not belong (the URL).
        for bad in (cp.environment_key + "x", cp.admin_key, token):
            http().get(f"{cp.base_url}/v1/environments/{cp.environment_id}/work/poll", headers={**HEADERS, "Authorization": f"Bearer {bad}x"})
        http().get(f"{cp.base_url}/v1/sessions/{cp.environment_key}", headers=HEADERS)
        http().get(f"{cp.base_url}/nope?k={cp.admin_key}")
        reprs = " ".join(repr(x) for x in (cp, admin))
    # The server's records only: the test's own HTTP client logs the URLs it was told to use.
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("sandbox.controlplane"))
    assert "GET /v1/sessions/" in text  # the access log is there ...
    assert fingerprint(cp.environment_key) in text  # ... and names keys only by fingerprint
    for secret in secrets:
        assert secret not in text
        assert secret not in reprs
