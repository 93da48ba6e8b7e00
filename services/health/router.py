"""Liveness (process up) and readiness (every dependency reachable, schema at head)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from shared.config import get_settings

router = APIRouter(tags=["health"])

# Checks run on their own small pool, never on the request thread pool: a check stuck on a frozen dependency
# must not hold a thread that API requests need. Every client has its own timeout, so a stuck check ends.
_pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="readyz")


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _checks() -> dict[str, Callable[[], None]]:
    from shared.celery_app import get_celery
    from shared.db import check_schema
    from shared.storage import ObjectStore
    from shared.tracking import Tracker

    def broker() -> None:
        timeout = get_settings().BROKER_TIMEOUT_SECONDS
        with get_celery().connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)

    def mlflow() -> None:
        settings = get_settings()
        uri = settings.MLFLOW_TRACKING_URI
        if uri.startswith(("http://", "https://")):  # the server's own health page: no mlflow import needed
            import urllib.request

            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=settings.READY_TIMEOUT_SECONDS) as r:
                if r.status != 200:
                    raise RuntimeError(f"MLflow answered {r.status} on /health")
            return
        Tracker().ping()

    return {"database": check_schema, "broker": broker, "object_store": lambda: ObjectStore().ping(),
            "mlflow": mlflow}


async def _run(fn: Callable[[], None], timeout: float) -> str:
    try:
        await asyncio.wait_for(asyncio.wrap_future(_pool.submit(fn)), timeout=timeout)
        return "ok"
    except TimeoutError:
        return f"error: no answer within {timeout:.0f}s"
    except Exception as e:
        return f"error: {type(e).__name__}: {e}"[:500]


@router.get("/readyz", responses={503: {"description": "A dependency is down; the body says which and why"}})
async def readyz() -> JSONResponse:
    """Answers within ``CRUCIBLE_READY_TIMEOUT_SECONDS`` whatever hangs: a check still running then is down."""
    timeout = get_settings().READY_TIMEOUT_SECONDS
    checks = _checks()
    outcomes = await asyncio.gather(*(_run(fn, timeout) for fn in checks.values()))
    results = dict(zip(checks, outcomes, strict=True))
    ok = all(v == "ok" for v in results.values())
    return JSONResponse(status_code=200 if ok else 503, content={"status": "ok" if ok else "unavailable",
                                                                 "checks": results},
                        headers={} if ok else {"Retry-After": str(get_settings().RETRY_AFTER_SECONDS)})
