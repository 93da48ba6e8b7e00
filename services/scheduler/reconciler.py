"""Repairs what the happy path cannot: lost workers, lost messages, and dependency edges."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol, cast

from sqlalchemy import CursorResult, case, delete, exists, func, select, update
from sqlalchemy.orm import Session, aliased

from shared.config import Settings
from shared.lifecycle import INFRA_ERROR, enqueue, finish_attempt, terminate
from shared.models import Job, JobDependency, JobStatus, Outbox, Worker, utcnow

log = logging.getLogger(__name__)


class RunCloser(Protocol):
    def terminate(self, run_id: str, job_status: str) -> None: ...


@dataclass
class ReconcileStats:
    lease_expired: int = 0
    redispatched: int = 0
    promoted: int = 0
    dependency_failed: int = 0
    stale_workers: int = 0
    pipelines_changed: int = 0
    runs_to_close: list[tuple[str, str]] = field(default_factory=list)  # (mlflow run id, job status)


def reconcile_once(session: Session, settings: Settings) -> ReconcileStats:
    stats = ReconcileStats()
    now = utcnow()

    # 1. Lost workers: a running job whose lease lapsed is re-queued as attempt + 1 (it resumes from its
    #    latest checkpoint), or fails once the infrastructure budget is spent.
    expired = session.execute(
        select(Job.id, Job.attempt, Job.worker_id).where(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now)
        .with_for_update(skip_locked=True)
    ).all()
    for job_id, attempt, worker_id in expired:
        status = finish_attempt(session, job_id=job_id, attempt=attempt, worker_id=None, outcome=INFRA_ERROR,
                                reason=f"worker {worker_id} lost (lease expired)")
        stats.lease_expired += 1
        if status is not None and status.terminal:
            job = session.get(Job, job_id)
            run_id = job.mlflow_run_id if job is not None else None
            if run_id:
                stats.runs_to_close.append((run_id, status.value))

    # 2. Lost messages: dispatched long ago and never claimed (broker restarted empty, say). Publishing
    #    again is safe: the claim lets exactly one delivery run.
    stale = session.scalars(
        select(Job).where(Job.status == JobStatus.DISPATCHED,
                          Job.dispatched_at < now - timedelta(seconds=settings.REDISPATCH_AFTER_SECONDS))
        .with_for_update(skip_locked=True)
    ).all()
    for job in stale:
        enqueue(session, job, reason=f"not claimed within {settings.REDISPATCH_AFTER_SECONDS:.0f}s; publishing again")
        stats.redispatched += 1

    # 3. Dependencies: start jobs whose parents all succeeded; fail those with a parent that cannot. One
    #    aggregate over every pending job's parents; only the jobs that change are then loaded and locked.
    stats.promoted, stats.dependency_failed = _settle_dependencies(session)

    # 3b. Pipelines: create the jobs of steps whose parents succeeded (fan-out included), settle statuses.
    from services.pipelines.service import advance as advance_pipelines

    stats.pipelines_changed = advance_pipelines(session)

    # 4. Outbox rows whose job moved on before they were published (cancelled, or re-queued as another
    #    attempt): one set-based UPDATE, so the dispatcher never ranks them again.
    session.execute(
        update(Outbox).where(Outbox.published_at.is_(None), ~exists().where(
            Job.id == Outbox.job_id, Job.status == JobStatus.QUEUED, Job.attempt == Outbox.attempt))
        .values(published_at=now, last_error="skipped: the job is no longer queued for this attempt")
        .execution_options(synchronize_session=False)
    )

    # 5. Forget workers that stopped heart-beating long ago (metrics and probes read this table).
    gone = now - timedelta(seconds=10 * settings.HEARTBEAT_SECONDS + settings.LEASE_SECONDS)
    gone_rows = cast(CursorResult[Any], session.execute(delete(Worker).where(Worker.last_heartbeat_at < gone)))
    stats.stale_workers = gone_rows.rowcount  # a DELETE's result is a cursor result
    return stats


def _settle_dependencies(session: Session) -> tuple[int, int]:
    parent = aliased(Job)
    blocked = parent.status.in_([JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.PRUNED])
    rows = session.execute(
        select(Job.id, func.count(parent.id), func.sum(case((parent.status == JobStatus.SUCCEEDED, 1), else_=0)),
               func.sum(case((blocked, 1), else_=0)))
        .outerjoin(JobDependency, JobDependency.job_id == Job.id)
        .outerjoin(parent, parent.id == JobDependency.parent_id)
        .where(Job.status == JobStatus.PENDING)
        .group_by(Job.id)
    ).all()
    promote = {jid for jid, total, ok, bad in rows if not bad and (ok or 0) == total}
    fail = {jid for jid, _, _, bad in rows if bad}
    if not promote and not fail:
        return 0, 0
    promoted = failed = 0
    for job in session.scalars(select(Job).where(Job.id.in_(promote | fail), Job.status == JobStatus.PENDING)
                               .with_for_update(skip_locked=True)):
        if job.id in fail:
            pid, st = session.execute(
                select(parent.id, parent.status).join(JobDependency, JobDependency.parent_id == parent.id)
                .where(JobDependency.job_id == job.id, blocked).limit(1)).one()
            terminate(session, job, JobStatus.FAILED, f"dependency {pid} ended {st.value}; this job cannot run")
            failed += 1
        else:
            enqueue(session, job, reason="all dependencies succeeded")
            promoted += 1
    return promoted, failed


def close_runs(tracker: RunCloser | None, runs: list[tuple[str, str]]) -> None:
    """Give abandoned jobs' MLflow runs their final status (best effort: MLflow may be down)."""
    for run_id, status in runs:
        try:
            if tracker is not None:
                tracker.terminate(run_id, status)
        except Exception as e:
            log.warning("could not close MLflow run %s as %s: %s", run_id, status, e)
