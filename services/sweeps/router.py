from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, status

from services.api.deps import ProjectDep, SessionDep
from services.sweeps import service
from services.sweeps.schemas import SweepRead, SweepSubmit

router = APIRouter(prefix="/sweeps", tags=["sweeps"])


@router.post("", response_model=SweepRead, status_code=status.HTTP_201_CREATED,
             responses={404: {"description": "Unknown dataset or checkpoint in the base spec"},
                        422: {"description": "Invalid base spec (`loc`: `base.<field>`) or search space "
                                             "(`search_space.<path>`)"}})
def submit_sweep(body: SweepSubmit, project: ProjectDep, session: SessionDep) -> SweepRead:
    """Submit a sweep: a base job spec, a search space over its fields (dotted paths; float/int ranges, log or
    stepped, or categorical choices), an objective metric to minimize or maximize, a trial budget, a concurrency
    and early stopping (ASHA). optuna samples (grid, random, TPE) and prunes; trials are ordinary jobs."""
    sweep = service.submit(session=session, project_id=project.id, body=body)
    return service.view(session=session, sweep=sweep)


@router.get("", response_model=list[SweepRead])
def list_sweeps(project: ProjectDep, session: SessionDep,
                limit: Annotated[int, Query(ge=1, le=200)] = 20) -> list[SweepRead]:
    return [service.view(session=session, sweep=s)
            for s in service.list_sweeps(session=session, project_id=project.id, limit=limit)]


@router.get("/{sweep_id}", response_model=SweepRead)
def read_sweep(sweep_id: uuid.UUID, project: ProjectDep, session: SessionDep) -> SweepRead:
    """The sweep's status, every trial (params, state, value, job) and the best trial with its checkpoint."""
    return service.view(session=session, sweep=service.get(session=session, project_id=project.id,
                                                           sweep_id=sweep_id))


@router.post("/{sweep_id}/cancel", response_model=SweepRead, status_code=status.HTTP_202_ACCEPTED)
def cancel_sweep(sweep_id: uuid.UUID, project: ProjectDep, session: SessionDep) -> SweepRead:
    """Stop the sweep: no new trials; running trials are cancelled (SIGTERM, checkpoint)."""
    sweep = service.cancel(session=session, project_id=project.id, sweep_id=sweep_id)
    return service.view(session=session, sweep=sweep)
