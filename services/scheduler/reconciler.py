"""Repairs what the happy path cannot: lost workers, lost messages, and dependency edges."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from shared.config import Settings
from shared.lifecycle import INFRA_ERROR, enqueue, finish_attempt, terminate
from shared.models import Job, JobDependency, JobStatus, Worker, utcnow

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
            run_id = session.get(Job, job_id).mlflow_run_id  # type: ignore[union-attr]
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

    # 3. Dependencies: start jobs whose parents all succeeded; fail those with a parent that cannot.
    pending = session.scalars(
        select(Job).where(Job.status == JobStatus.PENDING).with_for_update(skip_locked=True)
    ).all()
    for job in pending:
        parents = session.execute(
            select(Job.id, Job.status).join(JobDependency, JobDependency.parent_id == Job.id)
            .where(JobDependency.job_id == job.id)
        ).all()
        bad = [(pid, st) for pid, st in parents if st in (JobStatus.FAILED, JobStatus.CANCELLED)]
        if bad:
            pid, st = bad[0]
            terminate(session, job, JobStatus.FAILED, f"dependency {pid} ended {st.value}; this job cannot run")
            stats.dependency_failed += 1
        elif all(st == JobStatus.SUCCEEDED for _, st in parents):
            enqueue(session, job, reason="all dependencies succeeded")
            stats.promoted += 1

    # 3b. Pipelines: create the jobs of steps whose parents succeeded (fan-out included), settle statuses.
    from services.pipelines.service import advance as advance_pipelines

    stats.pipelines_changed = advance_pipelines(session)

    # 4. Forget workers that stopped heart-beating long ago (metrics and probes read this table).
    gone = now - timedelta(seconds=10 * settings.HEARTBEAT_SECONDS + settings.LEASE_SECONDS)
    stats.stale_workers = session.execute(delete(Worker).where(Worker.last_heartbeat_at < gone)).rowcount  # type: ignore[attr-defined]
    return stats


def close_runs(tracker: RunCloser | None, runs: list[tuple[str, str]]) -> None:
    """Give abandoned jobs' MLflow runs their final status (best effort: MLflow may be down)."""
    for run_id, status in runs:
        try:
            if tracker is not None:
                tracker.terminate(run_id, status)
        except Exception as e:
            log.warning("could not close MLflow run %s as %s: %s", run_id, status, e)
