"""Conformance: the official SDK's generated Work API client against the local server."""

from __future__ import annotations

import base64
import json
import time

import anthropic
import pytest

from sandbox.controlplane import ControlPlane, LocalAdmin

from .helpers import admin_client, env_client, sessions_token


def _new_item(cp: ControlPlane, admin: LocalAdmin, worker_id: str = "w1") -> tuple[str, anthropic.types.beta.environments.BetaSelfHostedWork]:
    sid = admin.create_session(cp.environment_id)
    item = env_client(cp).beta.environments.work.poll(cp.environment_id, block_ms=999, anthropic_worker_id=worker_id)
    assert item is not None
    return sid, item


def test_empty_poll_is_json_null_and_blocks_about_block_ms(cp: ControlPlane) -> None:
    work = env_client(cp).beta.environments.work
    t0 = time.monotonic()
    assert work.poll(cp.environment_id, block_ms=200) is None
    assert 0.15 < time.monotonic() - t0 < 2.0
    assert work.poll(cp.environment_id) is None  # non-blocking form


def test_long_poll_wakes_when_work_arrives(cp: ControlPlane, admin: LocalAdmin) -> None:
    import threading

    work = env_client(cp).beta.environments.work
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(work.poll(cp.environment_id, block_ms=999)))
    t.start()
    time.sleep(0.1)
    sid = admin.create_session(cp.environment_id)
    t.join(5)
    assert got and got[0] is not None and got[0].data.id == sid  # type: ignore[attr-defined]


def test_poll_item_shape_and_secret(cp: ControlPlane, admin: LocalAdmin) -> None:
    sid, item = _new_item(cp, admin)
    assert item.type == "work" and item.id.startswith("work_")
    assert item.environment_id == cp.environment_id
    assert item.data.type == "session" and item.data.id == sid
    assert item.state == "queued" and item.metadata == {}
    assert item.created_at.endswith("Z")
    # base64url, unpadded, JSON {sessions_token, api_base_url}
    assert item.secret and "=" not in item.secret
    payload = json.loads(base64.urlsafe_b64decode(item.secret + "=" * (-len(item.secret) % 4)))
    assert payload["api_base_url"] == cp.base_url
    assert payload["sessions_token"].startswith("sk-ant-req-")
    assert sessions_token(item.secret) == payload["sessions_token"]
    # secret appears only on the poll that delivers the item
    assert admin_client(cp).beta.environments.work.retrieve(item.id, environment_id=cp.environment_id).secret is None
    listed = list(env_client(cp).beta.environments.work.list(cp.environment_id))
    assert [w.secret for w in listed] == [None]


def test_ack_heartbeat_stop_lifecycle(cp: ControlPlane, admin: LocalAdmin) -> None:
    _, item = _new_item(cp, admin)
    work = env_client(cp).beta.environments.work
    acked = work.ack(item.id, environment_id=cp.environment_id)
    assert acked.state == "starting" and acked.acknowledged_at
    assert work.ack(item.id, environment_id=cp.environment_id).state == "starting"  # retry-safe
    hb = work.heartbeat(item.id, environment_id=cp.environment_id, expected_last_heartbeat="NO_HEARTBEAT")
    assert hb.type == "work_heartbeat" and hb.lease_extended and hb.state == "active" and hb.ttl_seconds > 0
    hb2 = work.heartbeat(item.id, environment_id=cp.environment_id, expected_last_heartbeat=hb.last_heartbeat)
    assert hb2.last_heartbeat != hb.last_heartbeat
    # graceful stop -> stopping; the worker sees it on its next beat, then force-stops
    assert work.stop(item.id, environment_id=cp.environment_id).state == "stopping"
    hb3 = work.heartbeat(item.id, environment_id=cp.environment_id, expected_last_heartbeat=hb2.last_heartbeat)
    assert hb3.state == "stopping"
    stopped = work.stop(item.id, environment_id=cp.environment_id, force=True)
    assert stopped.state == "stopped" and stopped.stopped_at and stopped.stop_requested_at
    with pytest.raises(anthropic.ConflictError):
        work.stop(item.id, environment_id=cp.environment_id, force=True)
    with pytest.raises(anthropic.ConflictError):
        work.ack(item.id, environment_id=cp.environment_id)
    final = work.heartbeat(item.id, environment_id=cp.environment_id, expected_last_heartbeat="whatever")
    assert final.state == "stopped" and not final.lease_extended


@pytest.mark.parametrize(("desired", "expected"), [(1, 10), (10, 10), (45, 45), (600, 600), (100000, 600)])
def test_heartbeat_ttl_is_clamped(cp: ControlPlane, admin: LocalAdmin, desired: int, expected: int) -> None:
    _, item = _new_item(cp, admin)
    hb = env_client(cp).beta.environments.work.heartbeat(
        item.id, environment_id=cp.environment_id, desired_ttl_seconds=desired, expected_last_heartbeat="NO_HEARTBEAT"
    )
    assert hb.ttl_seconds == expected


def test_first_heartbeat_claims_an_unacked_item(cp: ControlPlane, admin: LocalAdmin) -> None:
    # Workers that never ack (Go HandleItem, the GKE dispatcher) claim with NO_HEARTBEAT.
    _, item = _new_item(cp, admin)
    token = sessions_token(item.secret)
    hb = env_client(cp, token).beta.environments.work.heartbeat(
        item.id, environment_id=cp.environment_id, expected_last_heartbeat="NO_HEARTBEAT"
    )
    assert hb.state == "active"
    got = admin_client(cp).beta.environments.work.retrieve(item.id, environment_id=cp.environment_id)
    assert got.state == "active" and got.acknowledged_at and got.started_at and got.latest_heartbeat_at


def test_stop_of_queued_item_is_immediate(cp: ControlPlane, admin: LocalAdmin) -> None:
    _, item = _new_item(cp, admin)
    assert env_client(cp).beta.environments.work.stop(item.id, environment_id=cp.environment_id).state == "stopped"


def test_retrieve_and_update_merge_patch(cp: ControlPlane, admin: LocalAdmin) -> None:
    _, item = _new_item(cp, admin)
    work = admin_client(cp).beta.environments.work
    assert work.retrieve(item.id, environment_id=cp.environment_id).id == item.id
    assert work.update(item.id, environment_id=cp.environment_id, metadata={"a": "1", "b": "2"}).metadata == {"a": "1", "b": "2"}
    assert work.update(item.id, environment_id=cp.environment_id, metadata={"a": None, "c": "3"}).metadata == {"b": "2", "c": "3"}
    with pytest.raises(anthropic.BadRequestError):
        work.update(item.id, environment_id=cp.environment_id, metadata={"x": 5})  # type: ignore[dict-item]
    with pytest.raises(anthropic.NotFoundError):
        work.retrieve("work_nope", environment_id=cp.environment_id)


def test_list_pages_with_cursor(cp: ControlPlane, admin: LocalAdmin) -> None:
    ids = {admin.create_session(cp.environment_id) for _ in range(5)}
    work = env_client(cp).beta.environments.work
    first = work.list(cp.environment_id, limit=2)
    assert len(first.data) == 2 and first.next_page
    everything = list(work.list(cp.environment_id, limit=2))  # auto-paginates via `page`
    assert {w.data.id for w in everything} == ids
    assert len(everything) == 5


def test_stats(cp: ControlPlane, admin: LocalAdmin) -> None:
    env = env_client(cp).beta.environments.work
    empty = env.stats(cp.environment_id)
    assert (empty.type, empty.depth, empty.pending, empty.oldest_queued_at) == ("work_queue_stats", 0, 0, None)
    admin.create_session(cp.environment_id)
    admin.create_session(cp.environment_id)
    env.poll(cp.environment_id, anthropic_worker_id="worker-a")
    env.poll(cp.environment_id, anthropic_worker_id="worker-b")
    admin.create_session(cp.environment_id)
    stats = admin_client(cp).beta.environments.work.stats(cp.environment_id)  # admin may read stats too
    assert stats.depth == 1 and stats.pending == 2 and stats.oldest_queued_at
    assert stats.workers_polling == 2


@pytest.mark.parametrize("block_ms", [0, 1000, -1])
def test_poll_rejects_block_ms_out_of_range(cp: ControlPlane, block_ms: int) -> None:
    with pytest.raises(anthropic.BadRequestError) as e:
        env_client(cp).beta.environments.work.poll(cp.environment_id, block_ms=block_ms)
    assert e.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]


def test_environment_admin_api_and_second_environment(cp: ControlPlane) -> None:
    client = admin_client(cp)
    env = client.beta.environments.create(name="second", config={"type": "self_hosted"})
    assert env.config.type == "self_hosted" and env.id != cp.environment_id
    key_path = cp.environment_key_path(env.id)
    assert key_path.stat().st_mode & 0o777 == 0o600
    key = key_path.read_text().strip()
    # its key polls its own queue, and only its own
    assert env_client(cp, key).beta.environments.work.poll(env.id) is None
    with pytest.raises(anthropic.NotFoundError):
        env_client(cp, key).beta.environments.work.poll(cp.environment_id)
    assert client.beta.environments.retrieve(env.id).name == "second"
