"""Errors the HTTP layer turns into ``{"error": {"code", "message", "details"}}`` answers."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error with an HTTP status, a stable machine code and a human message."""

    status = 500
    code = "internal"

    def __init__(self, message: str, *, details: Any = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


class InvalidRequest(ApiError):
    status = 400
    code = "invalid_request"

    @classmethod
    def field(cls, field: str, message: str) -> InvalidRequest:
        return cls(f"{field}: {message}", details=[{"field": field, "message": message}])


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"


class Forbidden(ApiError):
    status = 403
    code = "forbidden"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class Conflict(ApiError):
    status = 409
    code = "conflict"


class TooManyRequests(ApiError):
    status = 429
    code = "rate_limited"


class UpstreamError(ApiError):
    """Proxmox (or another upstream) failed in a way the caller cannot fix."""

    status = 502
    code = "upstream_error"


class Unavailable(ApiError):
    status = 503
    code = "unavailable"
