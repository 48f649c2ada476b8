"""Who is calling: resolve request headers to a principal, and what each may do.

Principals:
- `Admin`: the local admin key (stands in for the organisation API key). Accepted
  in `x-api-key` or as a Bearer token, because the SDK (2.x) sends `api_key` as
  `Authorization: Bearer`.
- `EnvironmentKey`: one environment's key, Bearer only (the real service takes
  it as `auth_token`, never as `x-api-key`).
- `SessionsToken`: minted per work-item delivery, Bearer only; good for that
  item's lifecycle calls and that one session's calls.

Which principal each endpoint accepts is decided in `api.py` (see its table).
A missing or unknown credential is 401; a valid credential of the wrong kind
for an endpoint is 403; a valid credential pointed at a resource outside its
scope gets 404, so it cannot probe which ids exist.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from . import keys
from .environments import Environments
from .errors import unauthorized
from .work import WorkQueue


@dataclass(frozen=True)
class Admin:
    kind = "admin key"


@dataclass(frozen=True)
class EnvironmentKey:
    environment_id: str
    kind = "environment key"


@dataclass(frozen=True)
class SessionsToken:
    work_id: str
    session_id: str
    environment_id: str
    generation: int
    current: bool  # False once the item was delivered again (this holder lost the lease)
    work_state: str
    kind = "sessions token"


Principal = Admin | EnvironmentKey | SessionsToken


class Authenticator:
    def __init__(self, admin_key: str, environments: Environments, work: WorkQueue) -> None:
        self._admin_key = admin_key
        self._environments = environments
        self._work = work

    def __repr__(self) -> str:
        return f"Authenticator(admin={keys.fingerprint(self._admin_key)})"

    def authenticate(self, headers: Mapping[str, str]) -> Principal:
        api_key = (headers.get("x-api-key") or "").strip()
        bearer = ""
        authz = (headers.get("authorization") or "").strip()
        if authz:
            scheme, _, value = authz.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise unauthorized("Authorization header must be 'Bearer <token>'")
            bearer = value.strip()
        if api_key and bearer and not keys.same_key(api_key, bearer):
            raise unauthorized("conflicting credentials in x-api-key and Authorization")
        credential = bearer or api_key
        if not credential:
            raise unauthorized("missing credentials: send x-api-key or Authorization: Bearer")
        via_bearer = bool(bearer)

        if credential.startswith(keys.ADMIN_KEY_PREFIX):
            if keys.same_key(credential, self._admin_key):
                return Admin()
        elif credential.startswith(keys.ENV_KEY_PREFIX):
            env_id = self._environments.by_key(credential)
            if env_id is not None:
                if not via_bearer:
                    raise unauthorized("environment keys are sent as Authorization: Bearer, not x-api-key")
                return EnvironmentKey(env_id)
        elif credential.startswith(keys.SESSIONS_TOKEN_PREFIX):
            grant = self._work.token_grant(credential)
            if grant is not None:
                if not via_bearer:
                    raise unauthorized("sessions tokens are sent as Authorization: Bearer, not x-api-key")
                return SessionsToken(
                    work_id=grant.work_id,
                    session_id=grant.session_id,
                    environment_id=grant.environment_id,
                    generation=grant.generation,
                    current=grant.current,
                    work_state=grant.state,
                )
        raise unauthorized("invalid credentials")
