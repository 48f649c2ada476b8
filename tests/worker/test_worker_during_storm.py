"""The worker keeps answering a session's tool calls while 16 neighbours each run a bomb (issue 14).

A session is served by the worker through the embedded control plane; then 16 sandboxes
(created beside the worker, as other sessions' would be) each run one of the bombs of
tests/bombs.py at once, and the session's calls made *during* that storm are answered,
right, once each; a session that arrives during the storm is claimed and served. No timing is asserted: bench/bench_neighbours.py --storm measures.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from sandbox.controlplane import ControlPlane, LocalAdmin
from sandbox.worker import Worker
from tests.bombs import bombs

from .helpers import call, results

pytestmark = [pytest.mark.docker, pytest.mark.neighbours]

STORM_S = 20.0


def test_worker_answers_a_sessions_calls_during_a_storm_of_every_bomb(
        cp: ControlPlane, admin: LocalAdmin, start_worker: Callable[..., Worker], make_sandbox) -> None:
    start_worker(max_sessions=2)
    sid = admin.create_session(cp.environment_id)
    assert call(admin, sid, "write", {"file_path": "before.txt", "content": "calm\n"}, timeout=90)[:2] == \
        (False, "wrote 5 bytes to before.txt")

    kinds = (bombs(STORM_S) * 2)[:16]
    storm = [make_sandbox(k.profile) for k in kinds]
    threads = [threading.Thread(target=sb.exec, args=(k.argv,), kwargs={"timeout": STORM_S + 5}, daemon=True)
               for sb, k in zip(storm, kinds)]
    for t in threads:
        t.start()
    time.sleep(1.5)  # every bomb is under way
    answered = []
    i = 0
    while any(t.is_alive() for t in threads) and i < 4:
        err, text, _ = call(admin, sid, "bash", {"command": f"echo during-{i} >> log.txt && cat log.txt | wc -l"},
                            timeout=120)
        assert not err, text
        answered.append(int(text.strip()))
        i += 1
    # A session that arrives during the storm is claimed and served too: the bombs drive the load
    # average into the hundreds, but each is one busy sandbox to the worker's admission control.
    newcomer = admin.create_session(cp.environment_id)
    assert call(admin, newcomer, "bash", {"command": "echo newcomer"}, timeout=120)[:2] == (False, "newcomer")
    storm_still_on = any(t.is_alive() for t in threads)
    assert answered and answered[0] == 1, "no call was answered while the bombs ran"
    assert storm_still_on, "the storm ended before the newcomer was served"
    assert answered == list(range(1, len(answered) + 1))  # each call ran once, in order
    for t in threads:
        t.join(60)
    # The session's workspace is intact and every call has exactly one result.
    assert call(admin, sid, "read", {"file_path": "before.txt"}, timeout=90)[:2] == (False, "calm\n")
    ids = [ev.get("tool_use_id") for ev in results(admin, sid)]
    assert len(ids) == len(set(ids)) == len(answered) + 2
