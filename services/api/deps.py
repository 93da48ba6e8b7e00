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


# scope="function": commit BEFORE the response is sent. FastAPI's default ("request") closes a yield
# dependency after the response, so a client could read 201 for a job and then get 404 for it (or be told
# it was created when the commit then failed).
SessionDep = Annotated[Session, Depends(get_db, scope="function")]


def get_project(session: SessionDep, authorization: Annotated[str | None, Header()] = None) -> Project:
    if not authorization or not authorization.lower().startswith("bearer "):
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' "
                           "(create one with `crucible keys create --project NAME`)", loc=["header", "authorization"])
    return project_service.authenticate(session=session, token=authorization.split(" ", 1)[1].strip())


ProjectDep = Annotated[Project, Depends(get_project)]
