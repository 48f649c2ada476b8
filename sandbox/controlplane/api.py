"""Routing and request semantics: the HTTP API, independent of the socket layer.

Paths are the real service's (the SDK appends `?beta=true`, which is accepted
and ignored). Auth per endpoint, mirroring the SDK's docstrings where they say
(retrieve/update "accept a Claude API key ... reject the environment key and
the work item's secret"; list "accepts the environment key ... rejects a
Claude API key"), and the worker's observed calls otherwise:

| endpoint                                   | env key | sessions token        | admin key |
|--------------------------------------------|---------|-----------------------|-----------|
| GET  /v1/environments/{e}/work/poll        | yes     | no                    | no        |
| POST /v1/environments/{e}/work/{w}/ack     | yes     | own item              | no        |
| POST /v1/environments/{e}/work/{w}/heartbeat| yes    | own item              | no        |
| POST /v1/environments/{e}/work/{w}/stop    | yes     | own item              | yes       |
| GET  /v1/environments/{e}/work/{w}         | no      | no                    | yes       |
| POST /v1/environments/{e}/work/{w}         | no      | no                    | yes       |
| GET  /v1/environments/{e}/work             | yes     | no                    | no        |
| GET  /v1/environments/{e}/work/stats       | yes     | no                    | yes       |
| GET  /v1/sessions/{s}[/events[/stream]]    | yes     | own session           | yes       |
| POST /v1/sessions/{s}/events               | yes     | own session           | yes       |
| POST /v1/sessions, /v1/environments, GET /v1/environments[/{e}] | no | no | yes |
| /local/v1/... (model stand-in, not in the real API)  | no | no           | yes       |

An environment key only reaches its own environment and that environment's
sessions; a sessions token only its own work item and session, and only while
its delivery is current and the item not stopped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .auth import Admin, Authenticator, EnvironmentKey, Principal, SessionsToken
from .clock import parse_rfc3339_us
from .db import Database
from .environments import Environments
from .errors import ApiError, bad_request, forbidden, not_found, unauthorized
from .events import events_array
from .sessions import MAX_LIST_LIMIT, Sessions
from .skills import Skills
from .sse import SessionEventStream
from .work import WorkQueue, validate_metadata_patch

MANAGED_AGENTS_BETA = "managed-agents-2026-04-01"
MAX_WORK_LIST_LIMIT = 100
DEFAULT_LIST_LIMIT = 20
MAX_RECLAIM_MS = 24 * 3600 * 1000
MAX_WORKER_ID_LEN = 256
MAX_HEARTBEAT_ECHO_LEN = 128
_ID = r"[A-Za-z0-9_\-]{1,128}"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Mapping[str, str]  # keys lower-cased
    body: bytes = b""


@dataclass
class JsonResponse:
    status: int
    body: Any


@dataclass
class StreamResponse:
    stream: SessionEventStream


@dataclass
class BytesResponse:
    status: int
    body: bytes
    content_type: str = "application/octet-stream"


Response = JsonResponse | StreamResponse | BytesResponse
Handler = Callable[[Request, Principal | None, dict[str, str]], Response]


@dataclass
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler
    authenticated: bool = True
    beta: bool = True  # requires anthropic-beta: managed-agents-2026-04-01


# ------------------------------------------------------------------ parsing


def parse_json_object(body: bytes, *, required: bool) -> dict[str, Any]:
    if not body.strip():
        if required:
            raise bad_request("request body is required")
        return {}
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad_request("request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise bad_request("request body must be a JSON object")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise bad_request(f"{name}: given more than once")
    return values[0]


def int_param(query: dict[str, list[str]], name: str, *, lo: int, hi: int, default: int | None) -> int | None:
    raw = _one(query, name)
    if raw is None or raw == "":
        return default
    try:
        if len(raw) > 20:
            raise ValueError
        value = int(raw)
    except ValueError:
        raise bad_request(f"{name}: expected an integer") from None
    if not lo <= value <= hi:
        raise bad_request(f"{name}: must be between {lo} and {hi}, got {value}")
    return value


def _time_bound(query: dict[str, list[str]], lower: bool) -> tuple[int, bool] | None:
    ops = ("gt", "gte") if lower else ("lt", "lte")
    found: tuple[int, bool] | None = None
    for op in ops:
        raw = _one(query, f"created_at[{op}]")
        if raw is None:
            continue
        if found is not None:
            raise bad_request(f"created_at: give only one of {ops[0]}/{ops[1]}")
        try:
            found = (parse_rfc3339_us(raw), op.endswith("e"))
        except ValueError:
            raise bad_request(f"created_at[{op}]: expected an RFC 3339 timestamp") from None
    return found


# -------------------------------------------------------------------- API


class Api:
    def __init__(
        self,
        *,
        db: Database,
        work: WorkQueue,
        sessions: Sessions,
        environments: Environments,
        auth: Authenticator,
        base_url: str,
        sse_ping_interval: float,
        skills: Skills | None = None,
    ) -> None:
        self._skills = skills
        self._db = db
        self._work = work
        self._sessions = sessions
        self._environments = environments
        self._auth = auth
        self.base_url = base_url
        self._ping = sse_ping_interval
        env, work_item, sess = "(?P<env>" + _ID + ")", "(?P<work>" + _ID + ")", "(?P<sid>" + _ID + ")"
        skill, ver = "(?P<skill>" + _ID + ")", "(?P<ver>" + _ID + ")"
        routes: list[tuple[str, str, Handler, bool, bool]] = [
            ("GET", f"/v1/environments/{env}/work/poll", self.poll, True, True),
            ("GET", f"/v1/environments/{env}/work/stats", self.stats, True, True),
            ("POST", f"/v1/environments/{env}/work/{work_item}/ack", self.ack, True, True),
            ("POST", f"/v1/environments/{env}/work/{work_item}/heartbeat", self.heartbeat, True, True),
            ("POST", f"/v1/environments/{env}/work/{work_item}/stop", self.stop, True, True),
            ("GET", f"/v1/environments/{env}/work/{work_item}", self.retrieve_work, True, True),
            ("POST", f"/v1/environments/{env}/work/{work_item}", self.update_work, True, True),
            ("GET", f"/v1/environments/{env}/work", self.list_work, True, True),
            ("POST", "/v1/environments", self.create_environment, True, True),
            ("GET", "/v1/environments", self.list_environments, True, True),
            ("GET", f"/v1/environments/{env}", self.retrieve_environment, True, True),
            ("POST", "/v1/sessions", self.create_session, True, True),
            ("GET", f"/v1/sessions/{sess}", self.retrieve_session, True, True),
            ("GET", f"/v1/sessions/{sess}/events", self.list_events, True, True),
            ("POST", f"/v1/sessions/{sess}/events", self.send_events, True, True),
            ("GET", f"/v1/sessions/{sess}/events/stream", self.stream_events, True, True),
            ("POST", f"/local/v1/sessions/{sess}/events", self.inject_events, True, False),
            ("GET", f"/local/v1/sessions/{sess}/work", self.session_work, True, False),
            ("GET", "/local/v1/health", self.health, False, False),
            ("GET", f"/v1/skills/{skill}/versions/{ver}", self.retrieve_skill_version, True, False),
            ("GET", f"/v1/skills/{skill}/versions/{ver}/content", self.skill_content, True, False),
        ]
        self._routes = [
            Route(method, re.compile(path), handler, authenticated=authn, beta=beta)
            for method, path, handler, authn, beta in routes
        ]

    def __repr__(self) -> str:
        return f"Api(base_url={self.base_url!r})"

    # ------------------------------------------------------------- dispatch

    def handle(self, req: Request) -> Response:
        matched: tuple[Route, dict[str, str]] | None = None
        path_known = False
        for route in self._routes:
            m = route.pattern.fullmatch(req.path)
            if m is None:
                continue
            path_known = True
            if route.method == req.method:
                matched = (route, m.groupdict())
                break
        if matched is None:
            if path_known:
                raise ApiError(405, f"method {req.method} is not allowed on {req.path}")
            raise not_found(f"no such endpoint: {req.method} {req.path[:200]}")
        route, params = matched
        if req.path.startswith("/v1/"):
            if not req.headers.get("anthropic-version"):
                raise bad_request("anthropic-version: header is required")
            if route.beta:
                betas = {b.strip() for b in req.headers.get("anthropic-beta", "").split(",")}
                if MANAGED_AGENTS_BETA not in betas:
                    raise bad_request(f"anthropic-beta: this endpoint requires the {MANAGED_AGENTS_BETA} beta")
        principal = self._auth.authenticate(req.headers) if route.authenticated else None
        return route.handler(req, principal, params)

    # ------------------------------------------------------- authorization

    @staticmethod
    def _deny(principal: Principal | None, what: str) -> ApiError:
        kind = getattr(principal, "kind", "this credential")
        return forbidden(f"{what} does not accept a {kind}")

    def _env_only(self, p: Principal | None, env_id: str, what: str, *, admin: bool = False) -> None:
        if isinstance(p, EnvironmentKey):
            if p.environment_id != env_id:
                raise not_found(f"environment {env_id!r} not found")
            return
        if admin and isinstance(p, Admin):
            self._environments.retrieve(env_id)
            return
        raise self._deny(p, what)

    def _item_holder(self, p: Principal | None, env_id: str, work_id: str, what: str, *, admin: bool = False) -> int | None:
        """Authorize a per-item call; return the token's delivery generation (None: not a token)."""
        if isinstance(p, SessionsToken):
            if p.environment_id != env_id or p.work_id != work_id:
                raise not_found(f"work item {work_id!r} not found")
            return p.generation
        self._env_only(p, env_id, what, admin=admin)
        return None

    def _admin_only(self, p: Principal | None, what: str) -> None:
        if not isinstance(p, Admin):
            raise self._deny(p, what)

    def _session_access(self, p: Principal | None, session_id: str) -> None:
        if isinstance(p, Admin):
            return
        if isinstance(p, EnvironmentKey):
            if self._sessions.environment_of(session_id) != p.environment_id:
                raise not_found(f"session {session_id!r} not found")
            return
        if isinstance(p, SessionsToken):
            if p.session_id != session_id:
                raise not_found(f"session {session_id!r} not found")
            if not p.current or p.work_state == "stopped":
                raise unauthorized("this sessions token is no longer valid (its work item was stopped or re-delivered)")
            return
        raise unauthorized()

    # ------------------------------------------------------------- work API

    def poll(self, req: Request, p: Principal | None, a: dict[str, str]) -> Response:
        self._env_only(p, a["env"], "work poll")
        block_ms = int_param(req.query, "block_ms", lo=1, hi=999, default=None)
        reclaim = int_param(req.query, "reclaim_older_than_ms", lo=0, hi=MAX_RECLAIM_MS, default=None)
        worker_id = req.headers.get("anthropic-worker-id") or None
        if worker_id is not None and len(worker_id) > MAX_WORKER_ID_LEN:
            raise bad_request(f"Anthropic-Worker-ID: at most {MAX_WORKER_ID_LEN} characters")
        item = self._work.poll(
            a["env"], block_ms=block_ms, reclaim_older_than_ms=reclaim, worker_id=worker_id, api_base_url=self.base_url
        )
        return JsonResponse(200, item)

    def ack(self, req: Request, p: Principal | None, a: dict[str, str]) -> Response:
        gen = self._item_holder(p, a["env"], a["work"], "work ack")
        return JsonResponse(200, self._work.ack(a["env"], a["work"], holder_generation=gen))

    def heartbeat(self, req: Request, p: Principal | None, a: dict[str, str]) -> Response:
        gen = self._item_holder(p, a["env"], a["work"], "work heartbeat")
        ttl = int_param(req.query, "desired_ttl_seconds", lo=-(2**31), hi=2**31, default=None)
        expected = _one(req.query, "expected_last_heartbeat")
        if expected is not None and len(expected) > MAX_HEARTBEAT_ECHO_LEN:
            raise bad_request(f"expected_last_heartbeat: at most {MAX_HEARTBEAT_ECHO_LEN} characters")
        body = self._work.heartbeat(
            a["env"], a["work"], desired_ttl_seconds=ttl, expected_last_heartbeat=expected, holder_generation=gen
        )
        return JsonResponse(200, body)

    def stop(self, req: Request, p: Principal | None, a: dict[str, str]) -> Response:
        gen = self._item_holder(p, a["env"], a["work"], "work stop", admin=True)
        body = parse_json_object(req.body, required=False)
        force = body.get("force", False)
        if force is None:
            force = False
        if not isinstance(force, bool):
            raise bad_request("force: expected a boolean")
        return JsonResponse(200, self._work.stop(a["env"], a["work"], force=force, holder_generation=gen))

    def retrieve_work(self, req: Request, p: Principal | None, a: dict[str, str]) -> Response:
        self._admin_only(p, "work retrieve")
        return JsonResponse(200, self._work.retrieve(a["env"], a["work"]))

    def update_work(self, req: Request, p: Principal | None, a: dict[str, str]) -> Response:
        self._admin_only(p, "work update")
        body = parse_json_object(req.body, required=True)
        if "metadata" not in body:
            raise bad_request("metadata: required")
        patch = validate_metadata_patch(body["metadata"])
        return JsonResponse(200, self._work.update(a["env"], a["work"], patch))

    def list_work(self, req: Request, p: Principal | None, a: dict[str, str]) -> Response:
        self._env_only(p, a["env"], "work list")
        limit = int_param(req.query, "limit", lo=1, hi=MAX_WORK_LIST_LIMIT, default=DEFAULT_LIST_LIMIT)
        assert limit is not None
        return JsonResponse(200, self._work.page(a["env"], limit=limit, page=_one(req.query, "page") or None))

    def stats(self, req: Request, p: Principal | None, a: dict[str, str]) -> Response:
        self._env_only(p, a["env"], "work stats", admin=True)
        return JsonResponse(200, self._work.stats(a["env"]))

    # --------------------------------------------------------- environments

    def create_environment(self, req: Request, p: Principal | None, a: dict[str, str]) -> Response:
        self._admin_only(p, "environment create")
        body = parse_json_object(req.body, required=True)
        config = body.get("config") or {"type": "self_hosted"}
        if not isinstance(config, dict) or config.get("type") != "self_hosted":
            raise bad_request("config.type: only 'self_hosted' environments exist locally")
        metadata = body.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise bad_request("metadata: expected an object")
        name = body.get("name")
        if not isinstance(name, str):
            raise bad_request("name: required")
        description = body.get("description")
        if description is not None and not isinstance(description, str):
            raise bad_request("description: expected a string")
        return JsonResponse(200, self._environments.create(name, description=description, metadata=metadata))

    def list_environments(self, req: Request, p: Principal | None, a: dict[str, str]) -> Response:
        self._admin_only(p, "environment list")
        return JsonResponse(200, {"data": self._environments.list(), "next_page": None})

    def retrieve_environment(self, req: Request, p: Principal | None, a: dict[str, str]) -> Response:
        self._admin_only(p, "environment retrieve")
        return JsonResponse(200, self._environments.retrieve(a["env"]))

    # -------------------------------------------------------------- sessions

    def create_session(self, req: Request, p: Principal | None, a: dict[str, str]) -> Response:
        self._admin_only(p, "session create")
        body = parse_json_object(req.body, required=True)
        env_id = body.get("environment_id")
        if not isinstance(env_id, str) or not env_id:
            raise bad_request("environment_id: required")
        agent = body.get("agent")
        agent_ref = agent if isinstance(agent, str) else (agent.get("id") if isinstance(agent, dict) else None)
        title = body.get("title")
        if title is not None and not isinstance(title, str):
            raise bad_request("title: expected a string")
        metadata = body.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise bad_request("metadata: expected an object")
        skills = body.get("skills")
        if skills is not None and self._skills is None:
            raise bad_request("skills: this control plane serves no skills")
        session = self._sessions.create(
            env_id, title=title, metadata=metadata, agent_ref=agent_ref if isinstance(agent_ref, str) else None,
            skills=self._skills.agent_refs(skills) if self._skills is not None else [],
        )
        return JsonResponse(200, session)

    def retrieve_session(self, req: Request, p: Principal | None, a: dict[str, str]) -> Response:
        self._session_access(p, a["sid"])
        return JsonResponse(200, self._sessions.retrieve(a["sid"]))

    def list_events(self, req: Request, p: Principal | None, a: dict[str, str]) -> Response:
        self._session_access(p, a["sid"])
        q = req.query
        limit = int_param(q, "limit", lo=1, hi=MAX_LIST_LIMIT, default=DEFAULT_LIST_LIMIT)
        assert limit is not None
        order = _one(q, "order") or "asc"
        if order not in ("asc", "desc"):
            raise bad_request("order: expected 'asc' or 'desc'")
        raw_types = q.get("types[]", []) + q.get("types", [])
        types = [t for raw in raw_types for t in raw.split(",") if t] or None
        if types is not None and len(types) > 64:
            raise bad_request("types: at most 64 values")
        page = self._sessions.list_events(
            a["sid"],
            limit=limit,
            order=order,
            page=_one(q, "page") or None,
            types=types,
            created_after=_time_bound(q, lower=True),
            created_before=_time_bound(q, lower=False),
        )
        return JsonResponse(200, page)

    def send_events(self, req: Request, p: Principal | None, a: dict[str, str]) -> Response:
        self._session_access(p, a["sid"])
        evs = events_array(parse_json_object(req.body, required=True))
        return JsonResponse(200, {"data": self._sessions.append_client_events(a["sid"], evs)})

    def stream_events(self, req: Request, p: Principal | None, a: dict[str, str]) -> Response:
        self._session_access(p, a["sid"])
        return StreamResponse(SessionEventStream(self._db, self._sessions, a["sid"], self._ping))

    # ----------------------------------------------------------- local admin

    def inject_events(self, req: Request, p: Principal | None, a: dict[str, str]) -> Response:
        self._admin_only(p, "event injection")
        evs = events_array(parse_json_object(req.body, required=True))
        return JsonResponse(200, {"data": self._sessions.append_agent_events(a["sid"], evs)})

    def session_work(self, req: Request, p: Principal | None, a: dict[str, str]) -> Response:
        self._admin_only(p, "session work listing")
        self._sessions.retrieve(a["sid"])
        return JsonResponse(200, {"data": self._work.for_session(a["sid"]), "next_page": None})

    # ---------------------------------------------------------------- skills

    def _skill_reader(self, p: Principal | None) -> Skills:
        """Skills are read by workers (environment key, or a current sessions token) and the admin."""
        if isinstance(p, SessionsToken) and (not p.current or p.work_state == "stopped"):
            raise unauthorized("this sessions token is no longer valid (its work item was stopped or re-delivered)")
        if not isinstance(p, (Admin, EnvironmentKey, SessionsToken)):
            raise unauthorized()
        if self._skills is None:
            raise not_found("this control plane serves no skills")
        return self._skills

    def retrieve_skill_version(self, req: Request, p: Principal | None, a: dict[str, str]) -> Response:
        return JsonResponse(200, self._skill_reader(p).retrieve(a["skill"], a["ver"]))

    def skill_content(self, req: Request, p: Principal | None, a: dict[str, str]) -> Response:
        return BytesResponse(200, self._skill_reader(p).content(a["skill"], a["ver"]))

    def health(self, req: Request, p: Principal | None, a: dict[str, str]) -> Response:
        return JsonResponse(200, {"status": "ok"})
