"""The Docker backend behind the seam is the existing Runtime, unchanged: a real sandbox."""

from __future__ import annotations

import time

import pytest

from sandbox.backend import Backend, DockerBackend
from sandbox.policy import load_policy, policy_from_dict
from sandbox.runtime import SandboxError

pytestmark = pytest.mark.docker


def test_docker_backend_prepares_creates_lists_and_destroys_a_real_sandbox(runtime):
    b = DockerBackend(runtime=runtime)
    assert isinstance(b, Backend)
    pol = load_policy("default")
    assert b.prepare(pol).digest == pol.digest()
    sb = b.create(pol, session_id="sess_backend_seam")
    try:
        r = sb.exec(["sh", "-c", "id -u; echo ok"])
        assert r.exit_code == 0 and r.stdout.split()[1] == b"ok" and int(r.stdout.split()[0]) == sb.uid != 0
        assert "sess_backend_seam" in {i.session for i in b.list()}
    finally:
        b.destroy(sb)
    end = time.monotonic() + 30  # the engine removes the killed container (AutoRemove) shortly after
    while "sess_backend_seam" in {i.session for i in b.list()} and time.monotonic() < end:
        time.sleep(0.1)
    assert "sess_backend_seam" not in {i.session for i in b.list()}
    assert b.warm_pool_size(pol) == 0 and b.warm_pool_size(pol, 2) == 2


def test_docker_backend_prepare_names_a_missing_image(runtime):
    data = load_policy("default").model_dump(mode="json")
    data["image"] = "sandbox-runtime:no-such-tag"
    with pytest.raises(SandboxError, match="no-such-tag is not built"):
        DockerBackend(runtime=runtime).prepare(policy_from_dict(data))
