"""Request-scoped dependencies: a DB session per request and the caller's project (from its API key).

The key lookup is cached per process for ``CRUCIBLE_API_KEY_CACHE_SECONDS`` (5 s): an authenticated request
on a warm key costs no database round trip and no thread-pool hop, and a key revoked or expired elsewhere
stops working within that time (at once in the process that revoked it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from services.errors import Unauthorized
from services.projects import service as project_service
from shared.config import get_settings
from shared.db import session_scope
from shared.models import Project, utcnow


def get_db() -> Iterator[Session]:
    """One session per request: committed when the handler succeeds, rolled back on any error."""
    with session_scope() as session:
        yield session


# scope="function": commit BEFORE the response is sent. FastAPI's default ("request") closes a yield
# dependency after the response, so a client could read 201 for a job and then get 404 for it (or be told
# it was created when the commit then failed).
SessionDep = Annotated[Session, Depends(get_db, scope="function")]

_MAX_KEYS = 10_000
_keys: dict[str, tuple[float, project_service.KeyGrant]] = {}  # key sha256 -> (looked up at, grant)
_keys_lock = threading.Lock()


def _lookup(key_hash: str) -> project_service.KeyGrant:
    with session_scope() as session:
        return project_service.authenticate_hash(session=session, key_hash=key_hash)


def forget_keys() -> None:
    """Drop every cached key (tests; a revoke in this process drops its own key already)."""
    with _keys_lock:
        _keys.clear()


async def get_project(authorization: Annotated[str | None, Header()] = None) -> Project:
    if not authorization or not authorization.lower().startswith("bearer "):
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' "
                           "(create one with `crucible keys create --project NAME`)", loc=["header", "authorization"])
    key_hash = project_service.hash_key(authorization.split(" ", 1)[1].strip())
    for revoked in project_service.take_forgotten():
        _keys.pop(revoked, None)
    now = time.monotonic()
    hit = _keys.get(key_hash)
    if hit is None or now - hit[0] >= get_settings().API_KEY_CACHE_SECONDS:
        grant = await run_in_threadpool(_lookup, key_hash)  # Unauthorized propagates; failures are not cached
        with _keys_lock:
            if len(_keys) >= _MAX_KEYS:
                _keys.clear()
            _keys[key_hash] = (now, grant)
    else:
        grant = hit[1]
    if grant.expires_at is not None and grant.expires_at <= utcnow():
        _keys.pop(key_hash, None)
        raise Unauthorized("expired API key; create a new one with `crucible keys create --project NAME`",
                           loc=["header", "authorization"])
    return grant.project


ProjectDep = Annotated[Project, Depends(get_project)]
