from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Body, Header, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from services.api.deps import ProjectDep, SessionDep
from services.jobs import service
from services.jobs.examples import SUBMIT_EXAMPLES
from services.jobs.schemas import EventRead, JobRead, JobsPage, JobSubmit
from services.scheduler.quotas import wait_reason
from shared.db import session_scope
from shared.models import JobStatus
from shared.specs import JobSpecBase

router = APIRouter(prefix="/jobs", tags=["jobs"])


def _read(session: SessionDep, job: object) -> JobRead:
    out = JobRead.model_validate(job)
    out.depends_on = service.parents_of(session=session, job_id=out.id)
    out.wait_reason = wait_reason(session, job)  # type: ignore[arg-type]  # a Job row
    return out


@router.post("", response_model=JobRead, status_code=status.HTTP_201_CREATED,
             responses={200: {"description": "Idempotent replay: the job created earlier with this key"},
                        404: {"description": "Unknown dataset or parent job"},
                        409: {"description": "Idempotency-Key reused with another spec, or a parent already failed"},
                        422: {"description": "Invalid spec: `detail[].loc` names the field, `msg` the reason"}})
async def submit_job(
    spec: Annotated[JobSubmit, Body(openapi_examples=SUBMIT_EXAMPLES)],
    project: ProjectDep, response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobRead:
    """Submit a job. The spec's `kind` selects its schema; unknown fields are rejected."""
    out, created = await run_in_threadpool(_submit, project.id, spec, idempotency_key)  # one thread-pool hop
    if not created:
        response.status_code = status.HTTP_200_OK
    return out


def _submit(project_id: uuid.UUID, spec: JobSpecBase, idempotency_key: str | None) -> tuple[JobRead, bool]:
    with session_scope() as session:  # commits before the response is sent
        job, created = service.submit(session=session, project_id=project_id, spec=spec,
                                      idempotency_key=idempotency_key)
        if created and not spec.depends_on and "checkpoints" not in job.inputs:
            out = JobRead.model_validate(job)  # no parents: nothing to read back
        else:
            out = _read(session, job)
    return out, created


@router.get("", response_model=JobsPage)
def list_jobs(
    project: ProjectDep, session: SessionDep,
    status_: Annotated[list[JobStatus] | None, Query(alias="status")] = None,
    kind: str | None = None, experiment: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50, offset: Annotated[int, Query(ge=0)] = 0,
) -> JobsPage:
    items, total = service.list_jobs(session=session, project_id=project.id, status=status_, kind=kind,
                                     experiment=experiment, limit=limit, offset=offset)
    return JobsPage(items=[_read(session, j) for j in items], total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobRead)
async def read_job(job_id: uuid.UUID, project: ProjectDep) -> JobRead:
    return await run_in_threadpool(_read_one, project.id, job_id)


def _read_one(project_id: uuid.UUID, job_id: uuid.UUID) -> JobRead:
    with session_scope() as session:
        return _read(session, service.get(session=session, project_id=project_id, job_id=job_id))


@router.post("/{job_id}/cancel", response_model=JobRead, status_code=status.HTTP_202_ACCEPTED)
def cancel_job(job_id: uuid.UUID, project: ProjectDep, session: SessionDep) -> JobRead:
    """Cancel: queued jobs end at once; a running job's supervisor stops it (SIGTERM, grace, SIGKILL)."""
    return _read(session, service.cancel(session=session, project_id=project.id, job_id=job_id))


@router.get("/{job_id}/events", response_model=list[EventRead],
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "JSON list, or Server-Sent Events with `follow=true`"}})
def job_events(
    job_id: uuid.UUID, project: ProjectDep, session: SessionDep, request: Request,
    after: Annotated[int, Query(ge=0, description="only events with a larger id")] = 0,
    types: Annotated[list[str] | None, Query(alias="type")] = None,
    limit: Annotated[int, Query(ge=1, le=5000)] = 500,
    follow: bool = False,
    last_event_id: Annotated[int | None, Header()] = None,
) -> object:
    """Progress, metrics, log lines and state changes. `follow=true` streams them (SSE) until the job ends."""
    service.get(session=session, project_id=project.id, job_id=job_id)
    if not follow:
        return [EventRead.model_validate(e) for e in service.events(session=session, job_id=job_id, after=after,
                                                                    limit=limit, types=types)]
    start = max(after, last_event_id or 0)
    return StreamingResponse(_stream(job_id, start, types, request), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _poll(job_id: uuid.UUID, after: int, types: list[str] | None) -> tuple[list[EventRead], bool]:
    from shared.models import Job

    with session_scope() as s:
        evs = [EventRead.model_validate(e) for e in service.events(session=s, job_id=job_id, after=after, types=types)]
        job = s.get(Job, job_id)
        done = job is None or job.status.terminal
    return evs, done


async def _stream(job_id: uuid.UUID, after: int, types: list[str] | None, request: Request) -> AsyncIterator[str]:
    import time

    from shared.config import get_settings

    # A stream must not hold a connection (and a poll loop) forever: after its lifetime it ends without `end`,
    # and clients reconnect with Last-Event-ID (services/cli/client.py does), resuming where they were.
    deadline = time.monotonic() + get_settings().SSE_MAX_SECONDS
    idle = 0.0
    while True:
        if time.monotonic() >= deadline:
            yield "retry: 1000\n: stream lifetime reached; reconnect with Last-Event-ID\n\n"
            return
        evs, done = await run_in_threadpool(_poll, job_id, after, types)
        for e in evs:
            after = e.id
            yield f"id: {e.id}\nevent: {e.type}\ndata: {json.dumps(e.model_dump(mode='json'))}\n\n"
        if done and not evs:
            yield "event: end\ndata: {}\n\n"
            return
        if await request.is_disconnected():
            return
        idle = 0.0 if evs else idle + 0.5
        if idle >= 15:  # keep proxies from closing a quiet stream
            idle = 0.0
            yield ": keep-alive\n\n"
        await asyncio.sleep(0.5)
