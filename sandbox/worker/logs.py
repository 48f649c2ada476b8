"""Structured JSON logs with session/work ids, and redaction of anything secret.

Every record passes a `RedactingFilter` (attached to the handler, so it also
covers the SDK's and the runtime's loggers): anything shaped like an Anthropic
credential (`sk-ant-...`) and every secret registered at runtime (the
environment key, each work item's `secret` payload and the sessions token in
it) is replaced by a short fingerprint. The session and work ids come from
context variables the worker sets per work item, so the SDK's own log lines
inside that item carry them too.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import re
import sys
import threading
import time
import traceback
from collections import OrderedDict
from typing import IO, Any

SECRET_RE = re.compile(r"sk-ant-[A-Za-z0-9_\-]{4,}")
MAX_REGISTERED = 4096

session_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("session_id", default=None)
work_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("work_id", default=None)


def fingerprint(secret: str) -> str:
    return "fp:" + hashlib.sha256(secret.encode("utf-8", "replace")).hexdigest()[:10]


class SecretRegistry:
    """Exact secrets to redact in addition to the `sk-ant-` pattern (bounded, thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._secrets: OrderedDict[str, None] = OrderedDict()
        self._rx: re.Pattern[str] | None = None

    def add(self, secret: str | None) -> None:
        if not secret or len(secret) < 8:
            return
        with self._lock:
            self._secrets[secret] = None
            self._secrets.move_to_end(secret)
            while len(self._secrets) > MAX_REGISTERED:
                self._secrets.popitem(last=False)
            self._rx = None

    def redact(self, text: str) -> str:
        text = SECRET_RE.sub(lambda m: f"<redacted {fingerprint(m.group(0))}>", text)
        with self._lock:
            if not self._secrets:
                return text
            if self._rx is None:
                alts = sorted(self._secrets, key=len, reverse=True)
                self._rx = re.compile("|".join(re.escape(s) for s in alts))
            rx = self._rx
        return rx.sub(lambda m: f"<redacted {fingerprint(m.group(0))}>", text)


secrets = SecretRegistry()


def redact(text: str) -> str:
    return secrets.redact(text)


class RedactingFilter(logging.Filter):
    """Rewrites the message (and any exception text) of every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string still gets logged
            message = str(record.msg)
        clean = redact(message)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            text = "".join(traceback.format_exception(*record.exc_info))
            record.exc_text = redact(text)
            record.exc_info = None
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        if record.__dict__.get("session_id") is None:
            record.__dict__["session_id"] = session_id_var.get()
        if record.__dict__.get("work_id") is None:
            record.__dict__["work_id"] = work_id_var.get()
        return True


_EXTRA_FIELDS = ("session_id", "work_id", "tool", "tool_use_id", "event")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in _EXTRA_FIELDS:
            value = record.__dict__.get(key)
            if value is not None:
                out[key] = value
        fields = record.__dict__.get("fields")
        if isinstance(fields, dict):
            for k, v in fields.items():
                out.setdefault(k, v)
        if record.exc_text:
            out["exc"] = record.exc_text
        return redact(json.dumps(out, default=str, ensure_ascii=False))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ids = " ".join(f"{k}={record.__dict__[k]}" for k in ("session_id", "work_id") if record.__dict__.get(k))
        base = f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {record.levelname.lower():7} " \
               f"{record.name}: {record.getMessage()}" + (f" [{ids}]" if ids else "")
        if record.exc_text:
            base += "\n" + record.exc_text
        return redact(base)


def setup_logging(level: int = logging.INFO, stream: IO[str] | None = None, fmt: str = "json") -> logging.Handler:
    """Install one redacting handler on the root logger (idempotent per stream)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_sandbox_worker", False):
            root.removeHandler(h)
    handler._sandbox_worker = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    # The HTTP client logs every request line at INFO; keep it at WARNING.
    for noisy in ("httpx", "httpx2", "httpcore", "anthropic._base_client", "docker", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return handler


def log_event(logger: logging.Logger, level: int, event: str, msg: str, **fields: Any) -> None:
    """One structured record: `event` names it, `fields` become JSON keys."""
    logger.log(level, msg, extra={"event": event, "fields": fields})
