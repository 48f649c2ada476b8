"""The API's error shape, raised anywhere below the HTTP layer and rendered once.

Every failure a client can cause becomes `{"type":"error","error":{"type":...,
"message":...}}` with the status the real API uses, so the official SDK maps it
to the same exception class (`NotFoundError`, `PreconditionFailedError`, ...) it
would raise against api.anthropic.com. Messages never carry credentials.
"""

from __future__ import annotations

from typing import Any

# Error `type` per status, as the real API names them (types/shared/error_type.py
# in the SDK, plus `request_too_large` from the public error docs).
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    411: "invalid_request_error",
    412: "invalid_request_error",
    413: "request_too_large",
    500: "api_error",
    503: "overloaded_error",
}


class ApiError(Exception):
    """A client-visible failure: HTTP status, error type, message, optional details."""

    def __init__(self, status: int, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details

    @property
    def error_type(self) -> str:
        return ERROR_TYPES.get(self.status, "api_error")

    def body(self, request_id: str | None = None) -> dict[str, Any]:
        err: dict[str, Any] = {"type": self.error_type, "message": self.message}
        if self.details is not None:
            err["details"] = self.details
        out: dict[str, Any] = {"type": "error", "error": err}
        if request_id:
            out["request_id"] = request_id
        return out


def bad_request(message: str) -> ApiError:
    return ApiError(400, message)


def unauthorized(message: str = "invalid or missing credentials") -> ApiError:
    return ApiError(401, message)


def forbidden(message: str) -> ApiError:
    return ApiError(403, message)


def not_found(message: str = "not found") -> ApiError:
    return ApiError(404, message)


def conflict(message: str) -> ApiError:
    return ApiError(409, message)
