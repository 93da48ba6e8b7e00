"""Request-scoped dependencies: a DB session per request and the caller's project (from its API key)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header
from sqlalchemy.orm import Session

from services.errors import Unauthorized
from services.projects import service as project_service
from shared.db import session_scope
from shared.models import Project


def get_db() -> Iterator[Session]:
    """One session per request: committed when the handler succeeds, rolled back on any error."""
    with session_scope() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_db)]


def get_project(session: SessionDep, authorization: Annotated[str | None, Header()] = None) -> Project:
    if not authorization or not authorization.lower().startswith("bearer "):
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' "
                           "(create one with `crucible keys create --project NAME`)", loc=["header", "authorization"])
    return project_service.authenticate(session=session, token=authorization.split(" ", 1)[1].strip())


ProjectDep = Annotated[Project, Depends(get_project)]
