"""Which session events exist, who may send them, and what a well-formed one looks like.

Two producers write to a session's event log:
- clients (`POST /v1/sessions/{id}/events`): the worker's `user.tool_result`,
  the user's `user.message`, `user.tool_confirmation`, ...;
- the local admin standing in for the model (`POST /local/v1/sessions/{id}/events`):
  `agent.tool_use`, `session.status_idle`, `session.status_terminated`, ...

Validation is deliberately shallow but strict about what the SDK runner relies on
(ids it pairs results with, permission values, content block types): a malformed
event is a 400 here instead of a crash in a worker later. Unknown fields pass
through untouched, as the real API's newer fields would.
"""

from __future__ import annotations

from typing import Any

from .errors import bad_request

MAX_EVENTS_PER_REQUEST = 100
MAX_TOOL_NAME_LEN = 128

CLIENT_EVENT_TYPES = frozenset(
    {
        "user.message",
        "user.interrupt",
        "user.tool_confirmation",
        "user.custom_tool_result",
        "user.define_outcome",
        "user.tool_result",
        "system.message",
    }
)
AGENT_EVENT_TYPES = frozenset(
    {
        "agent.tool_use",
        "agent.custom_tool_use",
        "agent.message",
        "agent.thinking",
        "session.status_running",
        "session.status_idle",
        "session.status_terminated",
        "session.error",
    }
)
# Events that give a dormant session's worker something to do (re-enqueue work).
WAKING_EVENT_TYPES = frozenset(
    {"agent.tool_use", "agent.custom_tool_use", "user.message", "user.tool_confirmation", "user.define_outcome"}
)
# Agent activity implies the session is running; injecting it into an idle
# session first emits `session.status_running`, as the real service would.
ACTIVITY_EVENT_TYPES = frozenset({"agent.tool_use", "agent.custom_tool_use", "agent.message", "agent.thinking"})
STOP_REASONS = frozenset({"end_turn", "requires_action", "retries_exhausted", "budget_reached", "refusal"})
PERMISSIONS = frozenset({"allow", "ask", "deny"})
RESULT_BLOCK_TYPES = frozenset({"text", "image", "document", "search_result"})
MESSAGE_BLOCK_TYPES = frozenset({"text", "image", "document", "redacted"})
# Fields only the server sets; a client's values are dropped, never trusted.
SERVER_FIELDS = ("id", "processed_at")


def events_array(body: dict[str, Any]) -> list[dict[str, Any]]:
    evs = body.get("events")
    if not isinstance(evs, list) or not evs:
        raise bad_request("events: expected a non-empty array of event objects")
    if len(evs) > MAX_EVENTS_PER_REQUEST:
        raise bad_request(f"events: at most {MAX_EVENTS_PER_REQUEST} events per request")
    for i, ev in enumerate(evs):
        if not isinstance(ev, dict) or not isinstance(ev.get("type"), str):
            raise bad_request(f"events[{i}]: expected an object with a string `type`")
    return evs


def _blocks(ev: dict[str, Any], where: str, allowed: frozenset[str], *, required: bool) -> None:
    content = ev.get("content")
    if content is None and not required:
        return
    if not isinstance(content, list) or (required and not content):
        raise bad_request(f"{where}.content: expected {'a non-empty' if required else 'an'} array of content blocks")
    for j, block in enumerate(content):
        if not isinstance(block, dict) or block.get("type") not in allowed:
            raise bad_request(f"{where}.content[{j}]: block type must be one of {sorted(allowed)}")
        if block["type"] == "text" and not isinstance(block.get("text"), str):
            raise bad_request(f"{where}.content[{j}].text: expected a string")


def _str_field(ev: dict[str, Any], field: str, where: str) -> str:
    value = ev.get(field)
    if not isinstance(value, str) or not value:
        raise bad_request(f"{where}.{field}: expected a non-empty string")
    return value


def clean_client_event(ev: dict[str, Any], where: str) -> tuple[dict[str, Any], str | None]:
    """Validate one client event; return (event without server fields, id it refers to)."""
    kind = ev["type"]
    if kind not in CLIENT_EVENT_TYPES:
        raise bad_request(f"{where}.type: {kind[:64]!r} is not an event type clients can send")
    out = {k: v for k, v in ev.items() if k not in SERVER_FIELDS}
    ref: str | None = None
    if kind == "user.tool_result":
        ref = _str_field(ev, "tool_use_id", where)
        _blocks(ev, where, RESULT_BLOCK_TYPES, required=False)
        if ev.get("is_error") is not None and not isinstance(ev["is_error"], bool):
            raise bad_request(f"{where}.is_error: expected a boolean")
    elif kind == "user.custom_tool_result":
        ref = _str_field(ev, "custom_tool_use_id", where)
        _blocks(ev, where, RESULT_BLOCK_TYPES, required=False)
        if ev.get("is_error") is not None and not isinstance(ev["is_error"], bool):
            raise bad_request(f"{where}.is_error: expected a boolean")
    elif kind == "user.tool_confirmation":
        ref = _str_field(ev, "tool_use_id", where)
        if ev.get("result") not in ("allow", "deny"):
            raise bad_request(f"{where}.result: expected 'allow' or 'deny'")
        if ev.get("deny_message") is not None:
            if ev["result"] != "deny":
                raise bad_request(f"{where}.deny_message: only allowed when result is 'deny'")
            if not isinstance(ev["deny_message"], str):
                raise bad_request(f"{where}.deny_message: expected a string")
    elif kind == "user.message":
        _blocks(ev, where, MESSAGE_BLOCK_TYPES, required=True)
    elif kind == "system.message":
        if not isinstance(ev.get("content"), list) or not ev["content"]:
            raise bad_request(f"{where}.content: expected a non-empty array")
    elif kind == "user.define_outcome":
        _str_field(ev, "description", where)
        if not isinstance(ev.get("rubric"), dict):
            raise bad_request(f"{where}.rubric: expected an object")
    return out, ref


def clean_agent_event(ev: dict[str, Any], where: str) -> dict[str, Any]:
    """Validate one injected (model-side) event; return it without server fields."""
    kind = ev["type"]
    if kind not in AGENT_EVENT_TYPES:
        raise bad_request(f"{where}.type: {kind[:64]!r} is not an event type the local admin can inject")
    out = {k: v for k, v in ev.items() if k not in SERVER_FIELDS}
    if kind in ("agent.tool_use", "agent.custom_tool_use"):
        name = _str_field(ev, "name", where)
        if len(name) > MAX_TOOL_NAME_LEN:
            raise bad_request(f"{where}.name: at most {MAX_TOOL_NAME_LEN} characters")
        if not isinstance(ev.get("input", {}), dict):
            raise bad_request(f"{where}.input: expected an object")
        out.setdefault("input", {})
        if kind == "agent.tool_use":
            perm = ev.get("evaluated_permission")
            if perm is not None and perm not in PERMISSIONS:
                raise bad_request(f"{where}.evaluated_permission: expected one of {sorted(PERMISSIONS)}")
            if perm is None:
                out.pop("evaluated_permission", None)
        elif "evaluated_permission" in ev:
            raise bad_request(f"{where}.evaluated_permission: only agent.tool_use carries a permission")
    elif kind == "agent.message":
        _blocks(ev, where, frozenset({"text", "redacted"}), required=True)
    elif kind == "agent.thinking":
        pass
    elif kind == "session.status_idle":
        reason = ev.get("stop_reason", {"type": "end_turn"})
        if not isinstance(reason, dict) or reason.get("type") not in STOP_REASONS:
            raise bad_request(f"{where}.stop_reason.type: expected one of {sorted(STOP_REASONS)}")
        if reason["type"] == "requires_action" and "event_ids" in reason:
            ids = reason["event_ids"]
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise bad_request(f"{where}.stop_reason.event_ids: expected an array of event ids")
        out["stop_reason"] = reason
        out.setdefault("stop_details", None)
    elif kind == "session.error":
        if not isinstance(ev.get("error", {"type": "unknown_error"}), dict):
            raise bad_request(f"{where}.error: expected an object")
        out.setdefault(
            "error",
            {"type": "unknown_error", "message": "error injected by the local admin", "retry_status": {"type": "terminal"}},
        )
    return out
