"""The control plane's FastAPI app (``crucible api`` serves it with uvicorn)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from services.api.faults import install_fault_handlers
from services.api.limits import InputLimits
from services.artifacts.router import router as artifacts_router
from services.datasets.router import router as datasets_router
from services.errors import MAX_MESSAGE_CHARS, DomainError, safe_input, short
from services.health.router import router as health_router
from services.jobs.router import router as jobs_router
from services.metrics import install_metrics
from services.pipelines.router import router as pipelines_router
from services.pipelines.router import templates_router as pipeline_templates_router
from services.projects.router import router as projects_router
from services.serving.router import router as serving_router
from services.sweeps.router import router as sweeps_router
from services.webhooks.router import router as webhooks_router
from shared.config import get_settings

log = logging.getLogger("crucible.api")

API_PREFIX = "/v1"


def _operation_id(route: APIRoute) -> str:
    # "<tag>-<route name>" gives generated clients tidy method names (jobs-submit_job, ...).
    return f"{route.tags[0]}-{route.name}" if route.tags else route.name


def clean_validation_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Make pydantic's errors name the user's field: drop the union tag from ``loc`` (body.ssl-train.epochs →
    body.epochs), point kind errors at ``kind``, and drop the 'Value error, ' prefix. What is echoed of the input
    is short and JSON-safe (errors.safe_input): this handler must never fail on the input it reports."""
    from shared.specs import SPEC_MODELS

    out = []
    for err in errors:
        e = {k: v for k, v in err.items() if k not in ("ctx", "url", "input")}
        loc = [p if isinstance(p, int) else short(str(p)) for p in err.get("loc", ())]
        if len(loc) > 1 and loc[0] == "body" and loc[1] in SPEC_MODELS:
            loc.pop(1)
        raw = err.get("input")
        if "input" in err:
            e["input"] = safe_input(raw)
        if e.get("type") in ("union_tag_invalid", "union_tag_not_found"):
            loc = ["body", "kind"]
            got = safe_input(raw.get("kind")) if isinstance(raw, dict) else None
            e["msg"] = (f"unknown job kind {got!r}" if got else "required: the job kind") + \
                f"; one of: {', '.join(SPEC_MODELS)}"
        e["loc"] = loc
        e["msg"] = short(str(e.get("msg", "")).removeprefix("Value error, "), MAX_MESSAGE_CHARS)
        out.append(e)
    return out


def create_app(*, check_schema: bool = True) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if check_schema:
            from shared.db import check_schema as _check

            _check()  # refuse to serve on an out-of-date schema; the message names the fix
        yield

    app = FastAPI(
        title="Crucible", version="0.1.0", lifespan=lifespan, generate_unique_id_function=_operation_id,
        description="Submit training jobs, follow them, and find their datasets, checkpoints and MLflow runs. "
                    "Authenticate with `Authorization: Bearer <key>` (`crucible keys create --project NAME`).",
    )

    @app.exception_handler(DomainError)
    async def _domain_error(_: Request, exc: DomainError) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content={"detail": exc.detail()}, headers=exc.headers())

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        detail = jsonable_encoder(clean_validation_errors(exc.errors()))
        return JSONResponse(status_code=422, content={"detail": detail})

    install_fault_handlers(app)  # a dependency outage is a 503 with Retry-After, never a 500
    app.include_router(health_router)
    install_metrics(app)  # GET /metrics, GET /metrics/queues and the request-latency middleware
    for router in (projects_router, jobs_router, datasets_router, artifacts_router, pipelines_router,
                   pipeline_templates_router, webhooks_router, sweeps_router, serving_router):
        app.include_router(router, prefix=API_PREFIX)
    # Outermost of the app's own middleware: nothing reads a body or a parameter before it is bounded.
    app.add_middleware(InputLimits, upload_paths=[f"{API_PREFIX}/datasets"])
    app.state.settings = get_settings()
    return app
