"""Bounded input for every route, as ASGI middleware (it runs before FastAPI reads anything).

* Body size counts the bytes actually received, so a chunked body with no ``Content-Length`` is cut off at the
  limit as surely as one that declares its size. Uploads (multipart to the upload paths) get
  ``MAX_UPLOAD_BYTES`` and stream through; every other body gets ``MAX_REQUEST_BYTES`` and is read here.
* JSON bodies are read (bounded) and checked before the app sees them: UTF-8, no NaN/Infinity, no nesting
  deeper than ``MAX_JSON_DEPTH``, no string with a NUL, control character or lone surrogate (Postgres cannot
  store them), no integer outside signed 64 bits. The error names the offending field.
* The path and the query string get the same string and integer checks.

Rejections use the API's error shape: ``{"detail": [{"loc": [...], "msg": "...", "type": "..."}]}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.config import get_settings

MULTIPART_SLACK = 64 * 1024  # boundaries and part headers around the file itself
MAX_JSON_DEPTH = 32
INT64 = 2**63
_BAD_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")
_INTEGER = re.compile(r"[+-]?[0-9]+")
_JSON_TYPES = ("application/json",)


class BodyTooLarge(Exception):
    """Raised from ``receive`` when a body passes its limit; the middleware answers 413."""

    def __init__(self, limit: int, loc: list[str]) -> None:
        super().__init__(f"the request body exceeds the {limit}-byte limit")
        self.limit = limit
        self.loc: list[str | int] = list(loc)


class _Rejected(Exception):
    def __init__(self, loc: list[str | int], msg: str, type_: str = "value_error", status: int = 422) -> None:
        super().__init__(msg)
        self.loc, self.msg, self.type, self.status = loc, msg, type_, status


def _error(status: int, loc: list[str | int], msg: str, type_: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": [{"loc": loc, "msg": msg, "type": type_}]})


def string_problem(value: str) -> str | None:
    """Why a string cannot be accepted (None when it can)."""
    m = _BAD_CHARS.search(value)
    if m is None:
        return None
    ch = m.group()
    what = "a NUL byte" if ch == "\x00" else "a lone surrogate" if "\ud800" <= ch <= "\udfff" else \
        f"the control character U+{ord(ch):04X}"
    return f"contains {what}; remove it"


def _check_json(value: Any, loc: list[str | int], depth: int = 0) -> None:
    if depth > MAX_JSON_DEPTH:
        raise _Rejected(loc, f"nested more than {MAX_JSON_DEPTH} levels deep")
    if isinstance(value, str):
        problem = string_problem(value)
        if problem:
            raise _Rejected(loc, problem, "string_type")
    elif isinstance(value, bool):
        return
    elif isinstance(value, int):
        if not -INT64 <= value < INT64:
            raise _Rejected(loc, "integer out of range (must fit in 64 bits)", "int_range")
    elif isinstance(value, dict):
        for k, v in value.items():
            problem = string_problem(k)
            if problem:
                raise _Rejected(loc, f"a key {problem}", "string_type")
            _check_json(v, [*loc, k], depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_json(v, [*loc, i], depth + 1)


def _reject_constant(name: str) -> Any:
    raise _Rejected(["body"], f"{name} is not a JSON number; send a finite number", "float_parsing")


def check_json_body(body: bytes) -> None:
    """Raise _Rejected for a JSON body the API must not accept. Bodies that are not JSON at all are left for
    FastAPI's own parser, which answers 422 with the position of the error."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Rejected(["body"], f"the body is not UTF-8 (byte {e.start}); send UTF-8 encoded JSON",
                        "json_invalid") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError:
        return
    except RecursionError:
        raise _Rejected(["body"], f"nested more than {MAX_JSON_DEPTH} levels deep", "json_invalid") from None
    _check_json(value, ["body"])


def check_params(path: str, query: Iterable[tuple[str, str]]) -> None:
    problem = string_problem(path)
    if problem:
        raise _Rejected(["path"], f"the URL path {problem}")
    for key, value in query:
        for text in (key, value):
            problem = string_problem(text)
            if problem:
                raise _Rejected(["query", key[:40]], problem, "string_type")
        if _INTEGER.fullmatch(value.strip()) and len(value) > 18 and not -INT64 <= int(value) < INT64:
            raise _Rejected(["query", key[:40]], "integer out of range (must fit in 64 bits)", "int_range")


class InputLimits:
    """Pure ASGI middleware (no BaseHTTPMiddleware: it must see and cut the body stream itself)."""

    def __init__(self, app: ASGIApp, *, upload_paths: Iterable[str] = ()) -> None:
        self.app = app
        self.upload_paths = frozenset(upload_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = get_settings()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        upload = ctype == "multipart/form-data" and scope["path"] in self.upload_paths
        limit = settings.MAX_UPLOAD_BYTES + MULTIPART_SLACK if upload else settings.MAX_REQUEST_BYTES
        loc = ["body", "file"] if upload else ["body"]
        try:
            query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True,
                              encoding="utf-8", errors="surrogateescape")
            check_params(scope["path"], query)
            for name, value in headers.items():  # servers refuse most of these; the in-process clients do not
                problem = string_problem(value.replace("\t", " "))
                if problem:
                    raise _Rejected(["header", name[:40]], problem, "string_type")
            last_event_id = headers.get("last-event-id", "")
            if _INTEGER.fullmatch(last_event_id) and not -INT64 <= int(last_event_id) < INT64:
                raise _Rejected(["header", "last-event-id"], "integer out of range (must fit in 64 bits)",
                                "int_range")
            declared = headers.get("content-length")
            if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
                raise BodyTooLarge(limit, loc)
            if upload:  # streams through to a spooled file; cut off by bytes received
                receive = _counting(receive, limit, loc)
            else:  # read here (bounded), so FastAPI's body parsing never sees an over-long stream
                body = await _read_all(receive, limit, loc)
                if ctype in _JSON_TYPES or ctype.endswith("+json"):
                    check_json_body(body)
                receive = _replay(body, receive)
        except _Rejected as e:
            await _error(e.status, e.loc, e.msg, e.type)(scope, receive, send)
            return
        except BodyTooLarge as e:
            await _error(413, e.loc, str(e), "too_large")(scope, receive, send)
            return

        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except BodyTooLarge as e:  # raised while the app streamed the body (an upload)
            if started:
                raise
            await _error(413, e.loc, str(e), "too_large")(scope, receive, send)


async def _read_all(receive: Receive, limit: int, loc: list[str]) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit, loc)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later calls wait for the disconnect, as the server's receive would

    return replay


def _counting(receive: Receive, limit: int, loc: list[str]) -> Receive:
    size = 0

    async def counting() -> Message:
        nonlocal size
        message = await receive()
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > limit:
                raise BodyTooLarge(limit, loc)
        return message

    return counting
