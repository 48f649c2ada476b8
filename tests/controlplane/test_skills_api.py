"""The skills the embedded control plane is given: served to workers through the SDK's Skills API
calls, listed in a session's agent.skills, closed to credentials that have no business reading them."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from sandbox.controlplane import ControlPlane, ControlPlaneError, LocalAdmin, LocalAdminError

from .helpers import env_client, http


def _archive(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("pdf-tools/SKILL.md", "# pdf tools\n")
    return path


def test_a_session_lists_its_skills_and_the_sdk_downloads_them(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "pdf-tools.zip")
    with ControlPlane(tmp_path / "cp", skills=[archive]) as cp, \
            LocalAdmin(cp.base_url, cp.admin_key, http_client=http()) as admin:
        skill_id = cp.skill_ids[str(archive)]
        sid = admin.create_session(cp.environment_id, skills=[skill_id])
        assert admin.session(sid)["agent"]["skills"] == [{"type": "custom", "skill_id": skill_id, "version": "latest"}]
        client = env_client(cp)
        version = client.beta.skills.versions.retrieve("latest", skill_id=skill_id)
        assert version.name == "pdf-tools" and version.skill_id == skill_id
        data = client.beta.skills.versions.download(version.id, skill_id=skill_id).read()
        assert data == archive.read_bytes()
        with pytest.raises(LocalAdminError, match="unknown skill"):
            admin.create_session(cp.environment_id, skills=["skill_nope"])
        # No credential, or a wrong one: 401. An unknown skill: 404.
        r = http().get(f"{cp.base_url}/v1/skills/{skill_id}/versions/latest", headers={"anthropic-version": "x"})
        assert r.status_code == 401
        r = http().get(f"{cp.base_url}/v1/skills/skill_nope/versions/latest",
                       headers={"anthropic-version": "x", "authorization": f"Bearer {cp.environment_key}"})
        assert r.status_code == 404
    # Served again after a restart (kept in the state dir).
    with ControlPlane(tmp_path / "cp") as cp:
        assert env_client(cp).beta.skills.versions.retrieve("latest", skill_id=skill_id).name == "pdf-tools"


def test_an_unreadable_skill_archive_stops_the_start_with_its_path(tmp_path: Path) -> None:
    with pytest.raises(ControlPlaneError, match="missing.zip"):
        ControlPlane(tmp_path / "cp", skills=[tmp_path / "missing.zip"]).start()
