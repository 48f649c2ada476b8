"""Which tool call is running: the `tool_use_id` the SDK's runner is executing.

The SDK calls a tool with its input only, but the durable record must be keyed
by the event id. The runner wraps every tool run in an OpenTelemetry span
(`anthropic.tool_use <name>`, attribute `gen_ai.tool.call.id`) that is the
current span while the tool body runs. The worker's client is built with this
module's tracer provider (the SDK's public `open_telemetry={"tracer_provider":
...}` option): it records nothing and exports nothing, it only makes that span
carry the ids so `current_tool_call()` can read them from inside the tool.
Every other span is the no-op invalid span, so no content is ever captured.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, INVALID_SPAN_CONTEXT, Link, NonRecordingSpan, Span, SpanKind

ATTR_TOOL_USE_ID = "gen_ai.tool.call.id"
ATTR_TOOL_NAME = "gen_ai.tool.name"
ATTR_SESSION_ID = "anthropic.session.id"


@dataclass(frozen=True)
class ToolCall:
    tool_use_id: str
    tool_name: str | None
    session_id: str | None


class _ToolCallSpan(NonRecordingSpan):
    """Non-recording (the SDK then records no content) but remembers which call it is."""

    def __init__(self, call: ToolCall) -> None:
        super().__init__(INVALID_SPAN_CONTEXT)
        self.tool_call = call


class _Tracer(trace.Tracer):
    def start_span(self, name: str, context: Context | None = None, kind: SpanKind = SpanKind.INTERNAL,
                   attributes: Mapping[str, Any] | None = None, links: Sequence[Link] | None = None,
                   start_time: int | None = None, record_exception: bool = True,
                   set_status_on_exception: bool = True) -> Span:
        tool_use_id = (attributes or {}).get(ATTR_TOOL_USE_ID)
        if isinstance(tool_use_id, str) and tool_use_id:
            attrs = attributes or {}
            return _ToolCallSpan(ToolCall(tool_use_id, _str(attrs.get(ATTR_TOOL_NAME)), _str(attrs.get(ATTR_SESSION_ID))))
        return INVALID_SPAN

    @contextmanager
    def start_as_current_span(self, name: str, context: Context | None = None, kind: SpanKind = SpanKind.INTERNAL,
                              attributes: Mapping[str, Any] | None = None, links: Sequence[Link] | None = None,
                              start_time: int | None = None, record_exception: bool = True,
                              set_status_on_exception: bool = True, end_on_exit: bool = True) -> Iterator[Span]:
        span = self.start_span(name, context, kind, attributes, links, start_time)
        with trace.use_span(span, end_on_exit=end_on_exit, record_exception=False, set_status_on_exception=False):
            yield span


def _str(v: object) -> str | None:
    return v if isinstance(v, str) else None


class ToolCallTracerProvider(trace.TracerProvider):
    def __init__(self) -> None:
        self._tracer = _Tracer()

    def get_tracer(self, instrumenting_module_name: str, instrumenting_library_version: str | None = None,
                   schema_url: str | None = None, attributes: Mapping[str, Any] | None = None) -> trace.Tracer:
        return self._tracer


def open_telemetry_option() -> dict[str, Any]:
    """The `open_telemetry=` client option that enables `current_tool_call()`."""
    return {
        "tracer_provider": ToolCallTracerProvider(),
        "traces": {"enabled": True, "content_mode": "metadata_only"},
        # No trace headers on requests: these spans are not real traces.
        "propagation": False,
    }


def current_tool_call() -> ToolCall | None:
    span = trace.get_current_span()
    return span.tool_call if isinstance(span, _ToolCallSpan) else None
