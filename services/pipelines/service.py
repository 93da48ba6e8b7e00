"""Pipelines: submit (all rows in the caller's transaction, or none), read with aggregated status, cancel, retry
the steps that did not succeed, and ``advance`` (called by the scheduler's reconciler) which creates the jobs of
steps whose parents have succeeded and keeps the pipeline's status up to date."""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.errors import Conflict, DomainError, NotFound
from services.pipelines import steps as step_ops
from services.pipelines import templates as tpl
from services.pipelines.compile import PipelineInvalid, compile_pipeline
from services.pipelines.schemas import PipelineRead, PipelineSubmit, StepJobRead, StepRead
from shared import lifecycle, webhooks
from shared.models import Pipeline, PipelineJob, PipelineStep, utcnow

TERMINAL = ("succeeded", "failed", "cancelled")


def submit(*, session: Session, project_id: uuid.UUID, body: PipelineSubmit) -> Pipeline:
    """Validate every step and the graph, then write the pipeline, its steps, the jobs that can be created now
    (with their outbox rows) in the caller's transaction. Any problem raises before anything is committed."""
    if body.template is not None:
        t = tpl.template(body.template)
        params, raw_steps = tpl.bind_params(t, body.params), t["steps"]
    else:
        params, raw_steps = dict(body.params), body.steps or {}
    defn = compile_pipeline(raw_steps, params, experiment=body.experiment)
    name = body.name or body.template or "pipeline"
    pipeline = Pipeline(project_id=project_id, name=name, experiment=body.experiment, template=body.template,
                        params=params, definition=defn, status="running")
    session.add(pipeline)
    session.flush()
    rows = {}
    for pos, step_name in enumerate(defn["order"]):
        rows[step_name] = PipelineStep(pipeline_id=pipeline.id, name=step_name, position=pos, state="waiting")
        session.add(rows[step_name])
    session.flush()
    try:
        step_ops.materialize(session, pipeline, rows, at_submit=True)
    except step_ops.SubmitStepError as s:  # e.g. an unknown dataset: name the step (the caller rolls back)
        e = s.error
        if isinstance(e, DomainError):
            rest = [p for p in (e.loc or []) if p != "body"]
            raise type(e)(e.message, loc=["body", "steps", s.step, *rest]) from None
        if isinstance(e, ValidationError):
            raise PipelineInvalid([(["body", "steps", s.step, *err["loc"]], err["msg"]) for err in e.errors()]) \
                from None
        raise
    session.flush()
    return pipeline


def get(*, session: Session, project_id: uuid.UUID, pipeline_id: uuid.UUID, lock: bool = False) -> Pipeline:
    stmt = select(Pipeline).where(Pipeline.id == pipeline_id)
    p = session.scalars(stmt.with_for_update() if lock else stmt).first()
    if p is None or p.project_id != project_id:
        raise NotFound(f"pipeline {pipeline_id} not found", loc=["path", "pipeline_id"])
    return p


def list_pipelines(*, session: Session, project_id: uuid.UUID, limit: int = 50) -> list[Pipeline]:
    return list(session.scalars(select(Pipeline).where(Pipeline.project_id == project_id)
                                .order_by(Pipeline.created_at.desc()).limit(limit)))


def view(*, session: Session, pipeline: Pipeline) -> PipelineRead:
    """The pipeline with every step's state and jobs (states refreshed from the jobs first)."""
    rows = step_ops.step_rows(session, pipeline)
    step_ops.refresh(session, rows, pipeline.definition)
    out_steps = []
    for name in pipeline.definition["order"]:
        row, sdef = rows[name], pipeline.definition["steps"][name]
        jobs = [StepJobRead(id=j.id, status=j.status.value, status_reason=j.status_reason, progress=j.progress,
                            item_index=pj.item_index, cached=pj.cached, mlflow_run_id=j.mlflow_run_id)
                for pj, j in step_ops.current_jobs(session, row)]
        expected = max(1, len(row.items or [])) if sdef.get("foreach") is not None else 1
        progress = 1.0 if row.state == "succeeded" else sum(j.progress for j in jobs) / expected
        out_steps.append(StepRead(name=name, kind=sdef["kind"], state=row.state, reason=row.state_reason,
                                  parents=sdef["parents"], foreach=sdef.get("foreach") is not None,
                                  items=row.items, progress=round(progress, 4), jobs=jobs))
    progress = sum(s.progress for s in out_steps) / max(1, len(out_steps))
    return PipelineRead(id=pipeline.id, name=pipeline.name, experiment=pipeline.experiment,
                        template=pipeline.template, params=pipeline.params, status=pipeline.status,
                        status_reason=pipeline.status_reason, progress=round(progress, 4), retries=pipeline.retries,
                        mlflow_run_id=pipeline.mlflow_run_id, created_at=pipeline.created_at,
                        finished_at=pipeline.finished_at, steps=out_steps)


def cancel(*, session: Session, project_id: uuid.UUID, pipeline_id: uuid.UUID) -> Pipeline:
    """Cancel every step: pending and queued jobs end at once, running ones are stopped by their supervisors,
    steps without jobs yet are never created."""
    p = get(session=session, project_id=project_id, pipeline_id=pipeline_id, lock=True)
    if p.status in TERMINAL:
        raise Conflict(f"pipeline {pipeline_id} already ended {p.status}; nothing to cancel",
                       loc=["path", "pipeline_id"])
    for row in step_ops.step_rows(session, p).values():
        for _, job in step_ops.current_jobs(session, row):
            lifecycle.cancel(session, job)
        if row.state == "waiting":
            row.state, row.state_reason = "cancelled", "the pipeline was cancelled"
    _finish(session, p, "cancelled", "cancelled on request")
    return p


def retry(*, session: Session, project_id: uuid.UUID, pipeline_id: uuid.UUID) -> Pipeline:
    """Re-run what did not succeed: new jobs for failed, cancelled and skipped steps (for a fan-out step, only
    its items that did not succeed); succeeded steps keep their jobs and outputs."""
    p = get(session=session, project_id=project_id, pipeline_id=pipeline_id, lock=True)
    if p.status not in ("failed", "cancelled"):
        raise Conflict(f"pipeline {pipeline_id} is {p.status}; only a failed or cancelled pipeline can be retried",
                       loc=["path", "pipeline_id"])
    rows = step_ops.step_rows(session, p)
    step_ops.refresh(session, rows, p.definition)
    for row in rows.values():
        if row.state == "succeeded":
            continue
        for pj, job in step_ops.current_jobs(session, row):
            if job.status.value != "succeeded":
                pj.current = False
        row.state, row.state_reason = "waiting", None
    p.status, p.status_reason, p.finished_at = "running", None, None
    p.retries += 1
    p.mlflow_closed = False
    session.flush()
    step_ops.materialize(session, p, rows)
    _aggregate(session, p, rows)
    return p


def advance(session: Session) -> int:
    """One pass over running pipelines (the reconciler calls this every cycle): refresh step states, create
    the jobs that became possible, settle the pipeline's status. Returns how many pipelines changed status."""
    changed = 0
    for p in session.scalars(select(Pipeline).where(Pipeline.status == "running")
                             .with_for_update(skip_locked=True)).all():
        rows = step_ops.step_rows(session, p)
        step_ops.refresh(session, rows, p.definition)
        step_ops.materialize(session, p, rows)
        session.flush()
        step_ops.refresh(session, rows, p.definition)
        before = p.status
        _aggregate(session, p, rows)
        changed += p.status != before
    return changed


def _aggregate(session: Session, p: Pipeline, rows: dict[str, PipelineStep]) -> None:
    states = [rows[n].state for n in p.definition["order"]]
    if any(s in ("waiting", "running") for s in states):
        return
    if all(s == "succeeded" for s in states):
        _finish(session, p, "succeeded", None)
        return
    failed = [rows[n] for n in p.definition["order"] if rows[n].state == "failed"]
    if failed:
        root = failed[0]
        _finish(session, p, "failed", f"step {root.name!r} failed: {root.state_reason}")
    else:
        cancelled = next(rows[n] for n in p.definition["order"] if rows[n].state in ("cancelled", "skipped"))
        _finish(session, p, "cancelled", f"step {cancelled.name!r} was {cancelled.state}")


def _finish(session: Session, p: Pipeline, status: str, reason: str | None) -> None:
    p.status, p.status_reason, p.finished_at = status, reason, utcnow()
    webhooks.enqueue(session, p.project_id, f"pipeline.{status}",
                     {"pipeline_id": str(p.id), "status": status, "reason": reason, "name": p.name})


def step_of_job(session: Session, job_id: uuid.UUID) -> PipelineJob | None:
    return session.scalars(select(PipelineJob).where(PipelineJob.job_id == job_id)).first()


def template_list() -> list[dict[str, Any]]:
    return tpl.templates()
