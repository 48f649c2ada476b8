"""Leases: optimistic heartbeats, reclaim of un-acked items, lapsed leases, double stop."""

from __future__ import annotations

import time

import anthropic
import pytest

from sandbox.controlplane import ControlPlane, LocalAdmin

from .helpers import ManualClock, admin_client, env_client, http, sessions_token


def _claimed(cp: ControlPlane, worker: str = "w1", **poll: int) -> anthropic.types.beta.environments.BetaSelfHostedWork:
    item = env_client(cp).beta.environments.work.poll(cp.environment_id, anthropic_worker_id=worker, **poll)  # type: ignore[arg-type]
    assert item is not None
    return item


def test_heartbeat_412_on_wrong_expected_value(cp: ControlPlane, admin: LocalAdmin) -> None:
    admin.create_session(cp.environment_id)
    item = _claimed(cp)
    work = env_client(cp).beta.environments.work
    work.ack(item.id, environment_id=cp.environment_id)
    hb = work.heartbeat(item.id, environment_id=cp.environment_id, expected_last_heartbeat="NO_HEARTBEAT", desired_ttl_seconds=60)
    with pytest.raises(anthropic.PreconditionFailedError) as e:
        work.heartbeat(item.id, environment_id=cp.environment_id, expected_last_heartbeat="2020-01-01T00:00:00.000000Z")
    err = e.value
    assert err.status_code == 412
    assert err.error_code == "heartbeat_precondition_failed"
    body = err.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    state = body["error"]["details"]["current_state"]
    assert state == {
        "state": "active",
        "last_heartbeat": hb.last_heartbeat,
        "lease_updated_at": hb.last_heartbeat,
        "lease_extended": False,
        "ttl_seconds": 60,
    }
    # NO_HEARTBEAT once a heartbeat exists is also a mismatch (someone already claimed it)
    with pytest.raises(anthropic.PreconditionFailedError):
        work.heartbeat(item.id, environment_id=cp.environment_id, expected_last_heartbeat="NO_HEARTBEAT")
    # the correct echo still works: a refused beat changed nothing
    assert work.heartbeat(item.id, environment_id=cp.environment_id, expected_last_heartbeat=hb.last_heartbeat).lease_extended


def test_unacked_item_is_reclaimed_after_reclaim_older_than_ms(cp: ControlPlane, admin: LocalAdmin) -> None:
    admin.create_session(cp.environment_id)
    first = _claimed(cp, "worker-a")
    work = env_client(cp).beta.environments.work
    # Not yet old enough under the default (5000 ms): nobody else gets it.
    assert work.poll(cp.environment_id, anthropic_worker_id="worker-b") is None
    time.sleep(0.06)
    second = work.poll(cp.environment_id, reclaim_older_than_ms=50, anthropic_worker_id="worker-b")
    assert second is not None and second.id == first.id
    assert sessions_token(second.secret) != sessions_token(first.secret)  # fresh credential per delivery
    # The first holder lost it: its token's ack is refused, its beat is a 412, its session access is gone.
    stale = env_client(cp, sessions_token(first.secret))
    with pytest.raises(anthropic.ConflictError):
        stale.beta.environments.work.ack(first.id, environment_id=cp.environment_id)
    with pytest.raises(anthropic.PreconditionFailedError):
        stale.beta.environments.work.heartbeat(first.id, environment_id=cp.environment_id, expected_last_heartbeat="NO_HEARTBEAT")
    with pytest.raises(anthropic.AuthenticationError):
        stale.beta.sessions.retrieve(first.data.id)
    fresh = env_client(cp, sessions_token(second.secret))
    assert fresh.beta.environments.work.ack(second.id, environment_id=cp.environment_id).state == "starting"
    # acked items leave the queue: no amount of reclaim brings them back
    time.sleep(0.02)
    assert work.poll(cp.environment_id, reclaim_older_than_ms=0) is None


def test_lapsed_lease_is_claimable_by_another_worker(cp_clocked: ControlPlane, clock: ManualClock) -> None:
    cp = cp_clocked
    with LocalAdmin(cp.base_url, cp.admin_key, http_client=http()) as admin:
        admin.create_session(cp.environment_id)
    a = _claimed(cp, "worker-a")
    a_client = env_client(cp, sessions_token(a.secret)).beta.environments.work
    a_client.ack(a.id, environment_id=cp.environment_id)
    hb = a_client.heartbeat(a.id, environment_id=cp.environment_id, expected_last_heartbeat="NO_HEARTBEAT", desired_ttl_seconds=10)
    assert hb.ttl_seconds == 10
    work = env_client(cp).beta.environments.work
    clock.advance(9)
    assert work.poll(cp.environment_id, reclaim_older_than_ms=0, anthropic_worker_id="worker-b") is None  # lease still held
    clock.advance(2)  # 11 s without a heartbeat > 10 s TTL
    stats = work.stats(cp.environment_id)
    assert stats.depth == 1  # back in the queue
    b = work.poll(cp.environment_id, anthropic_worker_id="worker-b")
    assert b is not None and b.id == a.id and b.state == "queued" and b.acknowledged_at is None
    b_client = env_client(cp, sessions_token(b.secret)).beta.environments.work
    b_client.ack(b.id, environment_id=cp.environment_id)
    assert b_client.heartbeat(b.id, environment_id=cp.environment_id, expected_last_heartbeat="NO_HEARTBEAT").state == "active"
    # Worker A wakes up: its beat is refused with 412 (the SDK then releases without stopping) ...
    with pytest.raises(anthropic.PreconditionFailedError):
        a_client.heartbeat(a.id, environment_id=cp.environment_id, expected_last_heartbeat=hb.last_heartbeat)
    # ... and it cannot stop B's item either.
    with pytest.raises(anthropic.ConflictError):
        a_client.stop(a.id, environment_id=cp.environment_id, force=True)
    assert admin_client(cp).beta.environments.work.retrieve(a.id, environment_id=cp.environment_id).state == "active"


def test_stopping_item_whose_worker_vanished_ends_stopped(cp_clocked: ControlPlane, clock: ManualClock) -> None:
    cp = cp_clocked
    with LocalAdmin(cp.base_url, cp.admin_key, http_client=http()) as admin:
        admin.create_session(cp.environment_id)
    item = _claimed(cp)
    work = env_client(cp).beta.environments.work
    work.ack(item.id, environment_id=cp.environment_id)
    work.heartbeat(item.id, environment_id=cp.environment_id, expected_last_heartbeat="NO_HEARTBEAT", desired_ttl_seconds=10)
    assert admin_client(cp).beta.environments.work.stop(item.id, environment_id=cp.environment_id).state == "stopping"
    clock.advance(11)
    assert admin_client(cp).beta.environments.work.retrieve(item.id, environment_id=cp.environment_id).state == "stopped"


def test_stop_twice_is_409(cp: ControlPlane, admin: LocalAdmin) -> None:
    admin.create_session(cp.environment_id)
    item = _claimed(cp)
    work = env_client(cp).beta.environments.work
    work.ack(item.id, environment_id=cp.environment_id)
    assert work.stop(item.id, environment_id=cp.environment_id, force=True).state == "stopped"
    with pytest.raises(anthropic.ConflictError) as e:
        work.stop(item.id, environment_id=cp.environment_id, force=True)
    assert e.value.body["error"]["type"] == "conflict_error"  # type: ignore[index]


def test_concurrent_pollers_never_share_an_item(cp: ControlPlane, admin: LocalAdmin) -> None:
    import concurrent.futures as cf

    n = 12
    for _ in range(n):
        admin.create_session(cp.environment_id)

    def poll(i: int) -> str | None:
        item = env_client(cp).beta.environments.work.poll(cp.environment_id, block_ms=300, anthropic_worker_id=f"w{i}")
        return None if item is None else item.id

    with cf.ThreadPoolExecutor(16) as pool:
        got = [x for x in pool.map(poll, range(16)) if x]
    assert len(got) == n and len(set(got)) == n


def test_a_call_into_a_session_whose_lease_lapsed_requeues_its_item_not_a_second_one(
        cp_clocked: ControlPlane, clock: ManualClock) -> None:
    """Two items for one session would put two workers (two sandboxes, two journals) on it at once."""
    cp = cp_clocked
    with LocalAdmin(cp.base_url, cp.admin_key, http_client=http()) as admin:
        sid = admin.create_session(cp.environment_id)
        a = _claimed(cp, "worker-a")
        a_client = env_client(cp, sessions_token(a.secret)).beta.environments.work
        a_client.ack(a.id, environment_id=cp.environment_id)
        a_client.heartbeat(a.id, environment_id=cp.environment_id, expected_last_heartbeat="NO_HEARTBEAT",
                           desired_ttl_seconds=10)
        clock.advance(11)  # worker A is gone: its lease lapsed, nothing has expired it yet
        admin.send_tool_use(sid, "bash", {"command": "true"})
    items = env_client(cp).beta.environments.work.list(cp.environment_id)
    assert [w.id for w in items.data if w.data.id == sid] == [a.id]
    b = _claimed(cp, "worker-b")
    assert b.id == a.id and b.state == "queued"
    assert env_client(cp).beta.environments.work.poll(cp.environment_id, anthropic_worker_id="worker-c") is None
