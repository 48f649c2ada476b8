"""Skills the embedded control plane serves: archives given to it, as the Skills API delivers them.

`ControlPlane(state_dir, skills=[path, ...])` (or `sandbox control-plane --skill PATH`) registers
each archive (zip or tar.*) under `<state_dir>/skills/` (0600 files, an index), and a session
created with `skills=[skill_id, ...]` lists them in `agent.skills`. The worker's SDK then fetches
`GET /v1/skills/{id}/versions/{version}` (`latest` resolves to the newest version) and
`GET /v1/skills/{id}/versions/{version}/content`, and extracts the archive itself.

The archives are served as given: checking them is the worker's job (a hostile archive is
exactly what the worker's tests feed through here). The name is the file name up to its first
dot, reduced to a kebab-case slug.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

from .clock import rfc3339
from .errors import bad_request, not_found

MAX_ARCHIVE_BYTES = 256 << 20
_SLUG = re.compile(r"[^a-z0-9-]+")


class SkillError(Exception):
    pass


def skill_name(path: Path) -> str:
    base = path.name.split(".", 1)[0].lower()
    slug = _SLUG.sub("-", base).strip("-")[:64]
    if not slug:
        raise SkillError(f"{path}: cannot make a skill name from this file name")
    return slug


class Skills:
    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / "skills"
        self._lock = threading.Lock()

    def _index(self) -> dict[str, Any]:
        try:
            data = json.loads((self.dir / "index.json").read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def add(self, path: Path, *, name: str | None = None) -> str:
        """Register an archive file; returns its skill id (the same archive twice: the same id)."""
        path = Path(path)
        try:
            size = path.stat().st_size
        except OSError as e:
            raise SkillError(f"{path}: cannot read the skill archive ({e.strerror})") from None
        if size > MAX_ARCHIVE_BYTES:
            raise SkillError(f"{path}: {size} bytes, over the {MAX_ARCHIVE_BYTES}-byte limit of a skill archive")
        data = path.read_bytes()
        name = name or skill_name(path)
        digest = hashlib.sha256(data).hexdigest()
        skill_id = "skill_" + hashlib.sha256(name.encode()).hexdigest()[:24]
        version = "skillver_" + digest[:24]
        with self._lock:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            index = self._index()
            entry = index.setdefault(skill_id, {"name": name, "versions": []})
            if not any(v["id"] == version for v in entry["versions"]):
                archive = self.dir / f"{version}.archive"
                fd = os.open(archive, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                entry["versions"].append({"id": version, "created_at": time.time(), "sha256": digest})
            tmp = self.dir / ".index.json.tmp"
            tmp.write_text(json.dumps(index))
            os.replace(tmp, self.dir / "index.json")
        return skill_id

    def exists(self, skill_id: str) -> bool:
        return skill_id in self._index()

    def _version(self, skill_id: str, version: str) -> tuple[dict[str, Any], dict[str, Any]]:
        entry = self._index().get(skill_id)
        if entry is None or not entry.get("versions"):
            raise not_found(f"skill {skill_id!r} not found")
        versions = entry["versions"]
        if version == "latest":
            return entry, versions[-1]
        for v in versions:
            if v["id"] == version:
                return entry, v
        raise not_found(f"version {version!r} of skill {skill_id!r} not found")

    def retrieve(self, skill_id: str, version: str) -> dict[str, Any]:
        entry, v = self._version(skill_id, version)
        return {"type": "skill_version", "id": v["id"], "skill_id": skill_id, "name": entry["name"],
                "description": f"local skill {entry['name']}", "created_at": rfc3339(v["created_at"])}

    def content(self, skill_id: str, version: str) -> bytes:
        _, v = self._version(skill_id, version)
        try:
            return (self.dir / f"{v['id']}.archive").read_bytes()
        except OSError:
            raise not_found(f"the archive of {skill_id!r} is missing") from None

    def agent_refs(self, skill_ids: object) -> list[dict[str, str]]:
        """`agent.skills` entries for a session; unknown ids are a 400."""
        if skill_ids is None:
            return []
        if not isinstance(skill_ids, list) or not all(isinstance(s, str) for s in skill_ids) or len(skill_ids) > 64:
            raise bad_request("skills: expected a list of at most 64 skill ids")
        for s in skill_ids:
            if not self.exists(s):
                raise bad_request(f"skills: unknown skill {s[:64]!r}")
        return [{"type": "custom", "skill_id": s, "version": "latest"} for s in skill_ids]
