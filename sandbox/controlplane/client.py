"""`LocalAdmin`: drive a local control plane as the model and the user would.

The worker side needs nothing from here (it uses the official SDK). This client
holds the admin key and does what, against the real service, the model and the
application would: create sessions, emit `agent.tool_use` calls, end turns,
terminate sessions, read and watch the event log.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx2 as httpx  # anthropic ships httpx2 (same API); httpx is not a dependency

from .keys import fingerprint
from .tls import sync_http_client

ANTHROPIC_VERSION = "2023-06-01"
MANAGED_AGENTS_BETA = "managed-agents-2026-04-01"
_PAGE_LIMIT = 1000


class LocalAdminError(Exception):
    """The control plane answered with an error (`status`, `error_type`, `message`)."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(f"{status} {error_type}: {message}")
        self.status = status
        self.error_type = error_type
        self.message = message


class LocalAdmin:
    def __init__(
        self, base_url: str, admin_key: str, *, timeout: float = 30.0, http_client: httpx.Client | None = None,
        ca_file: Path | None = None,
    ) -> None:
        """`http_client`: share one (building an httpx client costs ~0.1 s); it is not closed by `close()`.
        `ca_file`: trust this CA bundle (an https control plane's generated CA) instead of the system's."""
        self.base_url = base_url.rstrip("/")
        self._key_fp = fingerprint(admin_key)
        self._timeout = timeout
        # Per request, not on the client, so a shared client never carries our key elsewhere.
        self._headers = {
            "x-api-key": admin_key,
            "anthropic-version": ANTHROPIC_VERSION,
            "anthropic-beta": MANAGED_AGENTS_BETA,
        }
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else sync_http_client(ca_file, timeout)

    def __repr__(self) -> str:
        return f"LocalAdmin(base_url={self.base_url!r}, admin_key={self._key_fp})"

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> LocalAdmin:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------ transport

    @staticmethod
    def _raise_for(resp: httpx.Response) -> None:
        if resp.status_code < 400:
            return
        try:
            err = resp.json()["error"]
            raise LocalAdminError(resp.status_code, str(err.get("type")), str(err.get("message")))
        except (ValueError, KeyError, TypeError):
            raise LocalAdminError(resp.status_code, "http_error", resp.text[:200]) from None

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self._http.request(method, self.base_url + path, headers=self._headers, timeout=self._timeout, **kwargs)
        self._raise_for(resp)
        return resp.json()

    # ------------------------------------------------------------- sessions

    def create_session(
        self, environment_id: str, *, title: str | None = None, metadata: dict[str, str] | None = None,
        skills: list[str] | None = None,
    ) -> str:
        """Create a session (this queues a work item for the environment's workers); return its id.
        `skills`: ids of skills the control plane was given, listed in the session's `agent.skills`."""
        body: dict[str, Any] = {"environment_id": environment_id}
        if skills:
            body["skills"] = skills
        if title is not None:
            body["title"] = title
        if metadata:
            body["metadata"] = metadata
        return str(self._call("POST", "/v1/sessions", json=body)["id"])

    def session(self, session_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/sessions/{session_id}"))

    def work_items(self, session_id: str) -> list[dict[str, Any]]:
        """The work items queued for a session, oldest first (local extension)."""
        return list(self._call("GET", f"/local/v1/sessions/{session_id}/work")["data"])

    # ------------------------------------------------- model-side (injected)

    def inject(self, session_id: str, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Append model/service-side events; return them as stored (with ids)."""
        return list(self._call("POST", f"/local/v1/sessions/{session_id}/events", json={"events": events})["data"])

    def send_tool_use(
        self, session_id: str, name: str, input: dict[str, Any], evaluated_permission: str | None = None
    ) -> str:
        """Emit an `agent.tool_use` call; return its event id (the `tool_use_id` of its result)."""
        ev: dict[str, Any] = {"type": "agent.tool_use", "name": name, "input": input}
        if evaluated_permission is not None:
            ev["evaluated_permission"] = evaluated_permission
        return str(self.inject(session_id, [ev])[-1]["id"])

    def send_custom_tool_use(self, session_id: str, name: str, input: dict[str, Any]) -> str:
        return str(self.inject(session_id, [{"type": "agent.custom_tool_use", "name": name, "input": input}])[-1]["id"])

    def send_idle(self, session_id: str, *, requires_action: bool = False) -> str:
        """End the turn: `session.status_idle` with `end_turn` (or `requires_action` on open calls)."""
        reason = {"type": "requires_action"} if requires_action else {"type": "end_turn"}
        return str(self.inject(session_id, [{"type": "session.status_idle", "stop_reason": reason}])[-1]["id"])

    def terminate(self, session_id: str) -> str:
        return str(self.inject(session_id, [{"type": "session.status_terminated"}])[-1]["id"])

    # ------------------------------------------------------- user-side (API)

    def post_events(self, session_id: str, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`POST /v1/sessions/{id}/events` as the user (user.message, user.tool_confirmation, ...)."""
        return list(self._call("POST", f"/v1/sessions/{session_id}/events", json={"events": events})["data"])

    def confirm(self, session_id: str, tool_use_id: str, allow: bool, deny_message: str | None = None) -> str:
        ev: dict[str, Any] = {"type": "user.tool_confirmation", "tool_use_id": tool_use_id, "result": "allow" if allow else "deny"}
        if deny_message is not None and not allow:
            ev["deny_message"] = deny_message
        return str(self.post_events(session_id, [ev])[-1]["id"])

    def events(self, session_id: str, *, types: list[str] | None = None) -> list[dict[str, Any]]:
        """The whole event log, oldest first."""
        out: list[dict[str, Any]] = []
        page: str | None = None
        while True:
            params: dict[str, Any] = {"limit": _PAGE_LIMIT, "order": "asc"}
            if page:
                params["page"] = page
            if types:
                params["types[]"] = types
            body = self._call("GET", f"/v1/sessions/{session_id}/events", params=params)
            out.extend(body["data"])
            page = body.get("next_page")
            if not page:
                return out

    def watch(self, session_id: str, *, read_timeout: float = 60.0, history: bool = False) -> Iterator[dict[str, Any]]:
        """Yield events appended after the call (with `history`: the whole log first), until the session
        terminates (pings skipped). The stream is opened before the log is read, so no event falls
        between the two; events in both are yielded once."""
        timeout = httpx.Timeout(self._timeout, read=read_timeout)
        url = f"{self.base_url}/v1/sessions/{session_id}/events/stream"
        seen: set[str] = set()
        with self._http.stream("GET", url, headers=self._headers, timeout=timeout) as resp:
            if resp.status_code >= 400:
                resp.read()
                self._raise_for(resp)
            if history:
                for ev in self.events(session_id):
                    seen.add(str(ev.get("id")))
                    yield ev
                    if ev.get("type") in ("session.status_terminated", "session.deleted"):
                        return
            event_name: str | None = None
            data: list[str] = []
            for line in resp.iter_lines():
                if line.startswith(":"):
                    continue
                if line:
                    field, _, value = line.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    if field == "event":
                        event_name = value
                    elif field == "data":
                        data.append(value)
                    continue
                name, payload = event_name, "\n".join(data)
                event_name, data = None, []
                if name in (None, "ping") or not payload:
                    continue
                ev = json.loads(payload)
                if name == "error":
                    raise LocalAdminError(500, "stream_error", payload[:200])
                if seen and str(ev.get("id")) in seen:
                    continue
                yield ev
                if ev.get("type") in ("session.status_terminated", "session.deleted"):
                    return
