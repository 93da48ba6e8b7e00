from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, status

from services.api.deps import ProjectDep, SessionDep
from services.pipelines import service
from services.pipelines.schemas import PipelineRead, PipelineSubmit, TemplateRead

router = APIRouter(prefix="/pipelines", tags=["pipelines"])
templates_router = APIRouter(prefix="/pipeline-templates", tags=["pipelines"])


@router.post("", response_model=PipelineRead, status_code=status.HTTP_201_CREATED,
             responses={404: {"description": "Unknown template, dataset or checkpoint"},
                        422: {"description": "Invalid step, reference or cycle: `loc` is `steps.<step>.<field>`"}})
def submit_pipeline(body: PipelineSubmit, project: ProjectDep, session: SessionDep) -> PipelineRead:
    """Submit a pipeline: named steps (job specs whose fields may use `${steps.<s>.checkpoint}`,
    `${steps.<s>.outputs.<name>}`, `${params.<p>}`; `foreach` fans a step out), or a template with params."""
    p = service.submit(session=session, project_id=project.id, body=body)
    return service.view(session=session, pipeline=p)


@router.get("", response_model=list[PipelineRead])
def list_pipelines(project: ProjectDep, session: SessionDep,
                   limit: Annotated[int, Query(ge=1, le=200)] = 20) -> list[PipelineRead]:
    return [service.view(session=session, pipeline=p)
            for p in service.list_pipelines(session=session, project_id=project.id, limit=limit)]


@router.get("/{pipeline_id}", response_model=PipelineRead)
def read_pipeline(pipeline_id: uuid.UUID, project: ProjectDep, session: SessionDep) -> PipelineRead:
    """The pipeline's overall status and each step's state, reason and jobs."""
    p = service.get(session=session, project_id=project.id, pipeline_id=pipeline_id)
    return service.view(session=session, pipeline=p)


@router.post("/{pipeline_id}/cancel", response_model=PipelineRead, status_code=status.HTTP_202_ACCEPTED)
def cancel_pipeline(pipeline_id: uuid.UUID, project: ProjectDep, session: SessionDep) -> PipelineRead:
    """Cancel every pending, queued and running step; steps not started yet never start."""
    p = service.cancel(session=session, project_id=project.id, pipeline_id=pipeline_id)
    return service.view(session=session, pipeline=p)


@router.post("/{pipeline_id}/retry", response_model=PipelineRead, status_code=status.HTTP_202_ACCEPTED)
def retry_pipeline(pipeline_id: uuid.UUID, project: ProjectDep, session: SessionDep) -> PipelineRead:
    """Re-run the steps that failed or were cancelled (new jobs); succeeded steps are not re-run."""
    p = service.retry(session=session, project_id=project.id, pipeline_id=pipeline_id)
    return service.view(session=session, pipeline=p)


@templates_router.get("", response_model=list[TemplateRead])
def list_templates(project: ProjectDep) -> list[TemplateRead]:
    """Pipeline templates kept in the repo (`shared/specs/pipelines/*.yaml`): submit one with
    `POST /v1/pipelines {"template": name, "params": {...}}`."""
    return [TemplateRead(**t) for t in service.template_list()]
