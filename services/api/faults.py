"""Fail soft: a dependency that is down or too slow is a 503 with Retry-After, never a 500.

Every client has a bounded timeout (shared/db.py, shared/storage.py, shared/tracking.py, shared/celery_app.py),
so a dead or frozen Postgres, S3 server, MLflow or Redis surfaces here as one of these exceptions within
seconds. Nothing is cached in a broken state: the next request reconnects (pool_pre_ping, fresh sockets), so
recovery needs no restart.
"""

from __future__ import annotations

import logging

import sqlalchemy.exc
import urllib3.exceptions
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from shared.config import get_settings

log = logging.getLogger("crucible.api")


def _unavailable(what: str, exc: BaseException) -> JSONResponse:
    log.warning("%s unavailable: %s: %s", what, type(exc).__name__, str(exc)[:300])
    retry_after = get_settings().RETRY_AFTER_SECONDS
    return JSONResponse(
        status_code=503, headers={"Retry-After": str(retry_after)},
        content={"detail": [{"type": "unavailable",
                             "msg": f"the {what} is unavailable right now; nothing was changed, retry in "
                                    f"{retry_after}s (`GET /readyz` says which dependency is down)"}]})


def _dependency_of(exc: BaseException) -> str | None:
    """Which dependency an exception says is down, or None for an error that is not an outage."""
    if isinstance(exc, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError
                  | sqlalchemy.exc.TimeoutError | sqlalchemy.exc.DisconnectionError):
        return "database"
    if isinstance(exc, urllib3.exceptions.HTTPError):
        return "object store"
    try:
        from minio.error import ServerError

        if isinstance(exc, ServerError):
            return "object store"
    except ImportError:  # pragma: no cover
        pass
    mod = type(exc).__module__
    if mod.startswith(("redis", "kombu", "amqp")):
        return "broker"
    if mod.startswith(("mlflow", "requests")):
        return "tracking server"
    if isinstance(exc, ConnectionError | TimeoutError):
        return "backing service"
    return None


OUTAGES: tuple[type[Exception], ...] = (
    sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, sqlalchemy.exc.TimeoutError,
    sqlalchemy.exc.DisconnectionError, urllib3.exceptions.HTTPError, ConnectionError, TimeoutError,
)


def install_fault_handlers(app: FastAPI) -> None:
    async def handler(_: Request, exc: Exception) -> JSONResponse:
        return _unavailable(_dependency_of(exc) or "backing service", exc)

    for cls in OUTAGES:
        app.add_exception_handler(cls, handler)
    try:
        from minio.error import ServerError

        app.add_exception_handler(ServerError, handler)
    except ImportError:  # pragma: no cover
        pass
    for path in ("redis.exceptions", "kombu.exceptions"):
        try:
            mod = __import__(path, fromlist=["ConnectionError", "OperationalError"])
        except ImportError:
            continue
        for name in ("ConnectionError", "TimeoutError", "OperationalError"):
            found = getattr(mod, name, None)
            if isinstance(found, type) and issubclass(found, Exception):
                app.add_exception_handler(found, handler)
