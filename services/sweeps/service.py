"""Sweeps: submit (validated against the base kind, written in the caller's transaction, nothing else), read with
trials and the best one, list, cancel. The trials themselves are created by the controller (controller.py) that
the scheduler runs every cycle."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.errors import Conflict, DomainError, NotFound
from services.jobs import service as job_service
from services.projects import service as project_service
from services.sweeps import space
from services.sweeps.schemas import BestRead, CheckpointRead, SweepRead, TrialRead
from shared import lifecycle, webhooks
from shared.lineage import latest_checkpoint
from shared.models import Artifact, Job, Sweep, SweepTrial, utcnow
from shared.specs import parse_spec
from shared.specs.sweeps import SweepSpec

TERMINAL = ("succeeded", "failed", "cancelled")


def submit(*, session: Session, project_id: uuid.UUID, body: SweepSpec) -> Sweep:
    """Check the search space against the base kind, dry-run the base job through the job path (datasets,
    checkpoints, resources: the same 404/422 as ``POST /v1/jobs``, under ``base``), then write the sweep row."""
    kind, budget = space.check(body)
    spec = parse_spec(space.anchor(body))
    # The experiment is made outside the dry run's savepoint: its rollback must not undo a row that the experiment
    # cache of services.projects holds by then; a refused sweep forgets it (the caller rolls the row back).
    project_service.get_or_create_experiment(session=session, project_id=project_id, name=spec.experiment)
    savepoint = session.begin_nested()
    try:
        job_service.submit(session=session, project_id=project_id, spec=spec)
    except DomainError as e:
        savepoint.rollback()
        project_service.forget_experiment(project_id, spec.experiment)
        rest = [p for p in (e.loc or []) if p != "body"]
        raise type(e)(e.message, loc=["body", "base", *rest]) from None
    savepoint.rollback()
    sweep_id = uuid.uuid4()
    sweep = Sweep(id=sweep_id, project_id=project_id, name=body.name or f"{kind}-sweep", experiment=spec.experiment,
                  kind=kind, definition=body.model_dump(mode="json"), max_trials=budget,
                  max_concurrency=body.max_concurrency, study_name=f"crucible-sweep-{sweep_id}", status="running")
    session.add(sweep)
    session.flush()
    return sweep


def get(*, session: Session, project_id: uuid.UUID, sweep_id: uuid.UUID, lock: bool = False) -> Sweep:
    stmt = select(Sweep).where(Sweep.id == sweep_id)
    sweep = session.scalars(stmt.with_for_update() if lock else stmt).first()
    if sweep is None or sweep.project_id != project_id:
        raise NotFound(f"sweep {sweep_id} not found", loc=["path", "sweep_id"])
    return sweep


def list_sweeps(*, session: Session, project_id: uuid.UUID, limit: int = 20) -> list[Sweep]:
    return list(session.scalars(select(Sweep).where(Sweep.project_id == project_id)
                                .order_by(Sweep.created_at.desc()).limit(limit)))


def trials(session: Session, sweep: Sweep) -> list[SweepTrial]:
    return list(session.scalars(select(SweepTrial).where(SweepTrial.sweep_id == sweep.id)
                                .order_by(SweepTrial.number)))


def cancel(*, session: Session, project_id: uuid.UUID, sweep_id: uuid.UUID) -> Sweep:
    """Stop the sweep: no new trials; running trial jobs are cancelled (the controller then tells optuna)."""
    sweep = get(session=session, project_id=project_id, sweep_id=sweep_id, lock=True)
    if sweep.status in TERMINAL:
        raise Conflict(f"sweep {sweep_id} already ended {sweep.status}; nothing to cancel", loc=["path", "sweep_id"])
    for t in trials(session, sweep):
        job = session.get(Job, t.job_id) if t.job_id else None
        if t.state == "running" and job is not None:
            lifecycle.cancel(session, job)
    finish(session, sweep, "cancelled", "cancelled on request")
    return sweep


def finish(session: Session, sweep: Sweep, status: str, reason: str | None) -> None:
    """The sweep's terminal status, and its webhook (same transaction)."""
    sweep.status, sweep.status_reason, sweep.finished_at = status, reason, utcnow()
    webhooks.enqueue(session, sweep.project_id, f"sweep.{status}",
                     {"sweep_id": str(sweep.id), "status": status, "reason": reason, "name": sweep.name,
                      "best": sweep.best or None})


def best_checkpoint(session: Session, job_id: uuid.UUID | None) -> CheckpointRead | None:
    art: Artifact | None = latest_checkpoint(session, job_id) if job_id else None
    if art is None:
        return None
    return CheckpointRead(artifact_id=art.id, uri=art.uri, epoch=(art.meta or {}).get("epoch"))


def view(*, session: Session, sweep: Sweep) -> SweepRead:
    rows = trials(session, sweep)
    jobs = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_([t.job_id for t in rows if t.job_id])))}
    out: list[TrialRead] = []
    counts = dict.fromkeys(("running", "complete", "pruned", "failed"), 0)
    for t in rows:
        job = jobs.get(t.job_id) if t.job_id else None
        counts[t.state] = counts.get(t.state, 0) + 1
        out.append(TrialRead(number=t.number, state=t.state, params=t.params, value=t.value, last_step=t.last_step,
                             last_value=t.last_value, reason=t.reason, job_id=t.job_id,
                             job_status=job.status.value if job else None, attempt=job.attempt if job else None,
                             progress=1.0 if t.state != "running" else (job.progress if job else 0.0),
                             mlflow_run_id=job.mlflow_run_id if job else None))
    done = sum(1.0 if t.state != "running" else t.progress for t in out)
    best = None
    if sweep.best:
        b = sweep.best
        job_id = uuid.UUID(b["job_id"]) if b.get("job_id") else None
        best_job = jobs.get(job_id) if job_id else None
        best = BestRead(trial=b["trial"], value=b["value"], params=b["params"], job_id=job_id,
                        mlflow_run_id=best_job.mlflow_run_id if best_job else None,
                        checkpoint=best_checkpoint(session, job_id))
    d = sweep.definition
    return SweepRead(id=sweep.id, name=sweep.name, experiment=sweep.experiment, kind=sweep.kind, status=sweep.status,
                     status_reason=sweep.status_reason, objective=d["objective"], sampler=d["sampler"]["type"],
                     early_stopping=d["early_stopping"]["type"], max_trials=sweep.max_trials,
                     max_concurrency=sweep.max_concurrency, counts=counts,
                     progress=1.0 if sweep.status == "succeeded" else round(done / max(1, sweep.max_trials), 4),
                     best=best, mlflow_run_id=sweep.mlflow_run_id, created_at=sweep.created_at,
                     finished_at=sweep.finished_at, definition=d, trials=out)
