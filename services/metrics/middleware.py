"""API request latency, labelled by route template (``/v1/jobs/{job_id}``), never by raw path.

A pure ASGI middleware rather than ``BaseHTTPMiddleware``: it times until the response *headers*, so an SSE
stream (``GET /v1/jobs/{id}/events?follow=true``) counts as fast when it starts fast, and it never buffers
a streamed body.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.metrics.collectors import API_LATENCY
from shared.config import get_settings

access_log = logging.getLogger("crucible.access")

UNMATCHED = "<unmatched>"  # 404 probes and scanners: one label, not one per path tried


def route_label(scope: Scope) -> str:
    """The matched route's template with its router prefix: ``/v1/jobs/{job_id}``.

    FastAPI 0.16x puts the *original* route in ``scope["route"]``, whose template lacks the ``include_router``
    prefixes (``/jobs/{job_id}``). The prefix is static text, so it is the part of the request path before the
    suffix the route's own pattern matches.
    """
    route: Any = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    if not template:
        return UNMATCHED
    regex = getattr(route, "path_regex", None)
    path: str = scope.get("path", "")
    if regex is None or regex.match(path):
        return str(template)
    for i, ch in enumerate(path):
        if ch == "/" and i and regex.match(path[i:]):
            return path[:i] + str(template)
    return str(template)


class RequestLatencyMiddleware:
    """Times every request, and is the access log: one line per 5xx or slow request by default (the cheap
    part of an access log that matters), every request with ``CRUCIBLE_ACCESS_LOG=all``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        settings = get_settings()
        self.log_all = settings.ACCESS_LOG == "all"
        self.log_errors = settings.ACCESS_LOG != "off"
        self.slow = settings.SLOW_REQUEST_SECONDS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        observed = False

        def observe(status: int) -> None:
            nonlocal observed
            if not observed:
                observed = True
                elapsed = time.perf_counter() - started
                label = route_label(scope)
                API_LATENCY.labels(scope["method"], label, str(status)).observe(elapsed)
                if self.log_all or (self.log_errors and (status >= 500 or elapsed >= self.slow)):
                    client = scope.get("client") or ("-", 0)
                    access_log.info('%s "%s %s" %d %.1fms (%s)', client[0], scope["method"], scope.get("path", ""),
                                    status, elapsed * 1000, label)

        async def send_timed(message: Message) -> None:
            if message["type"] == "http.response.start":
                observe(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, send_timed)
        except Exception:
            observe(500)  # the outer error middleware turns it into a 500 we would not see
            raise
