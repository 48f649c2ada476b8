"""Self-hosted environments and their keys.

The key file is the source of truth for an environment key: the database only
holds its hash. Replacing the file (and restarting) rotates the key; deleting
it makes the next start mint a new one. The default environment's key lives at
`<state>/environment.key`; environments created later over the admin API get
`<state>/environments/<env_id>.key`. Their keys are never returned over HTTP.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

from . import keys
from .clock import Clock, new_id, rfc3339
from .db import Database
from .endpoint import ENV_KEY_FILE
from .errors import bad_request, not_found
from .work import validate_metadata_patch

log = logging.getLogger("sandbox.controlplane")

DEFAULT_ENV_META = "default_environment_id"
MAX_NAME_LEN = 256


def environment_json(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "type": "environment",
        "id": row["id"],
        "name": row["name"],
        "description": row["description"],
        "metadata": json.loads(row["metadata"]),
        "config": {"type": "self_hosted"},
        "scope": "organization",
        "archived_at": None,
        "created_at": rfc3339(row["created_at"]),
        "updated_at": rfc3339(row["updated_at"]),
    }


class Environments:
    def __init__(self, db: Database, clock: Clock, state_dir: Path) -> None:
        self._db = db
        self._clock = clock
        self._state_dir = state_dir

    def key_path(self, environment_id: str) -> Path:
        if environment_id == self._db.get_meta(DEFAULT_ENV_META):
            return self._state_dir / ENV_KEY_FILE
        return self._state_dir / "environments" / f"{environment_id}.key"

    def _insert(self, name: str, description: str | None, metadata: dict[str, str], key_hash: str) -> str:
        env_id = new_id("env")
        now = self._clock()
        with self._db.tx() as c:
            c.execute(
                "INSERT INTO environments(id, name, description, metadata, key_hash, created_at, updated_at)"
                " VALUES(?, ?, ?, ?, ?, ?, ?)",
                (env_id, name, description, json.dumps(metadata), key_hash, now, now),
            )
        return env_id

    def ensure_default(self) -> tuple[str, str]:
        """Return (environment id, key) of the default environment, creating either as needed."""
        path = self._state_dir / ENV_KEY_FILE
        key, created = keys.load_or_create_key(path, keys.ENV_KEY_PREFIX, keys.new_environment_key)
        env_id = self._db.get_meta(DEFAULT_ENV_META)
        with self._db.tx() as c:
            row = None if env_id is None else c.execute("SELECT * FROM environments WHERE id=?", (env_id,)).fetchone()
            if row is None:
                env_id = self._insert("default", "Default local self-hosted environment", {}, keys.hash_key(key))
                c.execute(
                    "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                    (DEFAULT_ENV_META, env_id),
                )
            elif row["key_hash"] != keys.hash_key(key):
                c.execute("UPDATE environments SET key_hash=?, updated_at=? WHERE id=?", (keys.hash_key(key), self._clock(), env_id))
                log.warning("environment %s: key %s (%s)", env_id, "generated" if created else "rotated from key file", keys.fingerprint(key))
        assert env_id is not None
        return env_id, key

    def create(self, name: str, *, description: str | None = None, metadata: dict[str, str] | None = None) -> dict[str, Any]:
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_LEN:
            raise bad_request(f"name: expected a string of 1-{MAX_NAME_LEN} characters")
        if description is not None and not isinstance(description, str):
            raise bad_request("description: expected a string")
        clean_meta = {k: v for k, v in validate_metadata_patch(metadata or {}).items() if v is not None}
        key = keys.new_environment_key()
        env_id = self._insert(name, description, clean_meta, keys.hash_key(key))
        keys.write_key_file(self._state_dir / "environments" / f"{env_id}.key", key)
        log.info("created environment %s (key %s)", env_id, keys.fingerprint(key))
        return self.retrieve(env_id)

    def retrieve(self, environment_id: str) -> dict[str, Any]:
        with self._db.tx() as c:
            row = c.execute("SELECT * FROM environments WHERE id=?", (environment_id,)).fetchone()
        if row is None:
            raise not_found(f"environment {environment_id!r} not found")
        return environment_json(row)

    def list(self) -> list[dict[str, Any]]:
        with self._db.tx() as c:
            rows = c.execute("SELECT * FROM environments ORDER BY created_at").fetchall()
        return [environment_json(r) for r in rows]

    def by_key(self, key: str) -> str | None:
        with self._db.read() as c:
            row = c.execute("SELECT id FROM environments WHERE key_hash=?", (keys.hash_key(key),)).fetchone()
        return None if row is None else str(row["id"])
