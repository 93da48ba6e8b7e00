from __future__ import annotations

import uuid

from fastapi import APIRouter, status

from services.api.deps import ProjectDep, SessionDep
from services.errors import Conflict
from services.projects import service
from services.projects.schemas import ExperimentCreate, ExperimentRead, KeyRead, ProjectRead

router = APIRouter(tags=["projects"])


@router.get("/projects/current", response_model=ProjectRead)
def read_current_project(project: ProjectDep) -> object:
    """The project the API key belongs to."""
    return project


@router.get("/experiments", response_model=list[ExperimentRead])
def list_experiments(project: ProjectDep, session: SessionDep) -> object:
    return service.list_experiments(session=session, project_id=project.id)


@router.post("/experiments", response_model=ExperimentRead, status_code=status.HTTP_201_CREATED)
def create_experiment(body: ExperimentCreate, project: ProjectDep, session: SessionDep) -> object:
    """Create an experiment (jobs can also name a new experiment directly; it is created on submit)."""
    existing = [e for e in service.list_experiments(session=session, project_id=project.id) if e.name == body.name]
    if existing:
        raise Conflict(f"experiment {body.name!r} already exists", loc=["body", "name"])
    exp = service.get_or_create_experiment(session=session, project_id=project.id, name=body.name)
    exp.description = body.description
    return exp


@router.get("/experiments/{experiment}", response_model=ExperimentRead)
def read_experiment(experiment: str, project: ProjectDep, session: SessionDep) -> object:
    return service.get_experiment(session=session, project_id=project.id, name_or_id=experiment)


@router.get("/keys", response_model=list[KeyRead], tags=["keys"])
def list_keys(project: ProjectDep, session: SessionDep) -> object:
    """The project's API keys (ids, names, prefixes, last use, expiry, revocation; never the secrets)."""
    return service.list_keys(session=session, project_id=project.id)


@router.delete("/keys/{key_id}", response_model=KeyRead, tags=["keys"],
               responses={404: {"description": "No such key in this project"}})
def revoke_key(key_id: uuid.UUID, project: ProjectDep, session: SessionDep) -> object:
    """Revoke exactly this key. It stops working at once on this API replica and within
    `CRUCIBLE_API_KEY_CACHE_SECONDS` (5 s) on the others."""
    return service.revoke_key(session=session, ref=str(key_id), project_id=project.id)
