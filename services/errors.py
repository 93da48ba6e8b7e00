"""Domain errors raised by services and mapped to HTTP by the API (services never import FastAPI).

Every error names the field it is about (``loc``, FastAPI's validation-error shape) and says how to fix it.
"""

from __future__ import annotations

from collections.abc import Sequence


class DomainError(Exception):
    status_code = 400
    error_type = "bad_request"

    def __init__(self, message: str, *, loc: Sequence[str | int] | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.loc = list(loc) if loc else None
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        """HTTP headers the response carries (``Retry-After`` for errors that pass)."""
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}

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


MAX_ECHO_CHARS = 64
MAX_MESSAGE_CHARS = 400


def short(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """At most ``limit`` characters of ``text`` (an error must not echo a 256 MiB input back)."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def safe_input(value: object) -> object:
    """What an error may echo of the input that caused it: short, JSON-safe scalars only.

    Containers (often the whole request body) are not echoed; bytes are decoded leniently; NaN, infinities and
    huge integers become strings (JSON has no NaN, and the encoder would fail on it)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if abs(value) < 2**53 else short(str(value), 24)
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if isinstance(value, bytes | bytearray):
        return short(bytes(value[: MAX_ECHO_CHARS * 4]).decode("utf-8", "replace"))
    if isinstance(value, str):
        return short(value.encode("utf-8", "replace").decode("utf-8"))
    return f"<{type(value).__name__}>"
