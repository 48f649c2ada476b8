"""Fixtures for egress tests (helpers live in egress_helpers.py)."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.egress.acl import Decision
from sandbox.egress.proxy import EgressProxy
from tests.egress.egress_helpers import ALLOWED_ADDR, NAMES, OTHER_ADDR, THIRD_ADDR, Harness, Target
from tests.egress.tls_helpers import up_ca, upstream  # noqa: F401  (fixtures, registered by import)


@pytest.fixture
def targets() -> Iterator[dict[str, Target]]:
    ts = {"allowed": Target(ALLOWED_ADDR).start(), "other": Target(OTHER_ADDR).start(), "third": Target(THIRD_ADDR).start()}
    yield ts
    for t in ts.values():
        t.close()




@pytest.fixture
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    h = Harness(tmp_path, NAMES)
    original = EgressProxy._connect

    async def guarded(self: EgressProxy, decision: Decision, port: int, timeout: float) -> tuple[socket.socket, str]:
        addrs = decision.addrs or ((decision.addr,) if decision.addr else ())
        h.connect_attempts.append(tuple(addrs))
        for a in addrs:
            # Safety net: a bug must fail the test, never send a packet off this machine.
            assert ipaddress.ip_address(a).is_loopback, f"proxy tried to connect to non-loopback {a}"
        return await original(self, decision, port, timeout)

    monkeypatch.setattr(EgressProxy, "_connect", guarded)
    yield h
    h.close()


