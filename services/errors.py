"""Domain errors raised by services and mapped to HTTP by the API (services never import FastAPI).

Every error names the field it is about (``loc``, FastAPI's validation-error shape) and says how to fix it.
"""

from __future__ import annotations

from collections.abc import Sequence


class DomainError(Exception):
    status_code = 400
    error_type = "bad_request"

    def __init__(self, message: str, *, loc: Sequence[str | int] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.loc = list(loc) if loc else None

    def detail(self) -> list[dict[str, object]]:
        item: dict[str, object] = {"msg": self.message, "type": self.error_type}
        if self.loc:
            item["loc"] = self.loc
        return [item]


class Unauthorized(DomainError):
    status_code = 401
    error_type = "unauthorized"


class NotFound(DomainError):
    status_code = 404
    error_type = "not_found"


class Conflict(DomainError):
    status_code = 409
    error_type = "conflict"


class PayloadTooLarge(DomainError):
    status_code = 413
    error_type = "too_large"


class Invalid(DomainError):
    status_code = 422
    error_type = "value_error"


class Unavailable(DomainError):
    status_code = 503
    error_type = "unavailable"
