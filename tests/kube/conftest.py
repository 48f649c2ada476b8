"""Fixtures shared with the worker's tests: a real control plane on loopback, its admin client,
the worker's log capture (one definition, in tests/worker/conftest.py)."""

from tests.egress.tls_helpers import up_ca, upstream  # noqa: F401  (fixtures, registered by import)
from tests.worker.conftest import admin, cp, worker_logs  # noqa: F401  (fixtures, registered by import)
