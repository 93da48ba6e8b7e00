"""Liveness (process up) and readiness (every dependency reachable, schema at head)."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable

from fastapi import APIRouter
from fastapi.responses import JSONResponse

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _checks() -> dict[str, Callable[[], None]]:
    from shared.celery_app import get_celery
    from shared.db import check_schema
    from shared.storage import ObjectStore
    from shared.tracking import Tracker

    def broker() -> None:
        with get_celery().connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)

    return {"database": check_schema, "broker": broker, "object_store": lambda: ObjectStore().ping(),
            "mlflow": lambda: Tracker().ping()}


@router.get("/readyz", responses={503: {"description": "A dependency is down; the body says which and why"}})
def readyz() -> JSONResponse:
    results: dict[str, str] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(fn) for name, fn in _checks().items()}
        for name, fut in futures.items():
            try:
                fut.result(timeout=10)
                results[name] = "ok"
            except Exception as e:
                results[name] = f"error: {type(e).__name__}: {e}"[:500]
    ok = all(v == "ok" for v in results.values())
    return JSONResponse(status_code=200 if ok else 503, content={"status": "ok" if ok else "unavailable",
                                                                 "checks": results})
