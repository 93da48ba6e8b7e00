"""The job state machine: every transition of a job row happens through these functions.

Each transition is a guarded UPDATE (``WHERE id = … AND attempt = … AND status = …``), so a stale worker, a
duplicate broker delivery or a racing reconciler changes nothing: "the broker delivers, Postgres decides".
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, func, select, update
from sqlalchemy.orm import Session

from shared.config import get_settings
from shared.kinds import queue_for
from shared.models import Job, JobEvent, JobStatus, Outbox, utcnow

MAX_EVENT_TEXT = 4000


def add_event(session: Session, job_id: uuid.UUID, attempt: int, type_: str, **data: Any) -> None:
    if isinstance(data.get("line"), str) and len(data["line"]) > MAX_EVENT_TEXT:
        data["line"] = data["line"][:MAX_EVENT_TEXT] + "…"
    session.add(JobEvent(job_id=job_id, attempt=attempt, type=type_, data=data))


def enqueue(session: Session, job: Job, *, reason: str) -> None:
    """Make ``job`` runnable: status queued plus an outbox row, in the caller's transaction."""
    job.status = JobStatus.QUEUED
    job.queued_at = utcnow()
    job.worker_id = None
    job.lease_expires_at = None
    session.add(Outbox(job_id=job.id, attempt=job.attempt, queue=queue_for(job.worker_kind), priority=job.priority))
    add_event(session, job.id, job.attempt, "state", status=JobStatus.QUEUED.value, reason=reason)


def claim(session: Session, *, job_id: uuid.UUID, attempt: int, worker_id: str, lease_s: float) -> Job | None:
    """Atomically take the job for this attempt; None means a duplicate/stale delivery (do no work)."""
    now = utcnow()
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.attempt == attempt, Job.cancel_requested.is_(False),
               Job.status.in_([JobStatus.QUEUED, JobStatus.DISPATCHED]))
        .values(status=JobStatus.RUNNING, worker_id=worker_id, lease_expires_at=now + timedelta(seconds=lease_s),
                started_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:  # type: ignore[attr-defined]
        return None
    add_event(session, job_id, attempt, "state", status=JobStatus.RUNNING.value, worker=worker_id)
    return session.get(Job, job_id, populate_existing=True)


@dataclass(frozen=True)
class LeaseState:
    held: bool  # False: the job is no longer ours (reconciled away, or finished elsewhere)
    cancel_requested: bool


class LeaseLost(Exception):  # noqa: N818 - a state the caller handles, like Preempted
    """This attempt no longer holds the job: whatever it was about to write must not be written."""


def fence(session: Session, *, job_id: uuid.UUID, attempt: int, worker_id: str, renew_s: float | None = None,
          progress: float | None = None, eta_seconds: float | None = None) -> LeaseState:
    """Prove, inside the caller's transaction, that (job, attempt, worker) still holds a live lease.

    Every write an attempt makes (events, checkpoints, artifacts, result, its MLflow run id) goes through this
    first, in the same transaction: the UPDATE matches only while the job is running as this attempt, on this
    worker, with an unexpired lease, and it row-locks the job until commit, so the reconciler cannot re-queue
    it between the check and the writes. A superseded attempt - frozen past its lease, then resumed - gets
    ``LeaseLost`` and its transaction is rolled back: it changes nothing. ``renew_s`` also extends the lease.
    """
    now = utcnow()
    values: dict[str, Any] = {"updated_at": now}
    if renew_s is not None:
        values["lease_expires_at"] = now + timedelta(seconds=renew_s)
    if progress is not None:
        values["progress"] = progress
        values["eta_seconds"] = eta_seconds
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.attempt == attempt, Job.worker_id == worker_id,
               Job.status == JobStatus.RUNNING, Job.lease_expires_at > now)
        .values(**values)
        .returning(Job.cancel_requested)
        .execution_options(synchronize_session=False)
    ).first()
    if res is None:
        raise LeaseLost(f"job {job_id} attempt {attempt} is no longer held by {worker_id}")
    return LeaseState(held=True, cancel_requested=bool(res[0]))


def renew_lease(session: Session, *, job_id: uuid.UUID, attempt: int, worker_id: str, lease_s: float,
                progress: float | None = None, eta_seconds: float | None = None) -> LeaseState:
    """Extend a live lease (an expired one stays expired: its attempt is over, see ``fence``)."""
    try:
        return fence(session, job_id=job_id, attempt=attempt, worker_id=worker_id, renew_s=lease_s,
                     progress=progress, eta_seconds=eta_seconds)
    except LeaseLost:
        return LeaseState(held=False, cancel_requested=False)


# Outcomes a supervisor reports when its attempt ends.
SUCCEEDED, CANCELLED, PREEMPTED, USER_ERROR, CONFIG_ERROR, INFRA_ERROR, OOM = (
    "succeeded", "cancelled", "preempted", "user_error", "config_error", "infra_error", "oom")
OOM_EVENT = "oom_kill"  # one per out-of-memory attempt: the count is the OOM budget used (no column needed)


def infra_budget(job: Job) -> int:
    """The job's infrastructure retries: what its spec asked for, capped by the operator's ceiling."""
    return min(job.max_infra_retries, get_settings().MAX_INFRA_RETRIES)


def oom_budget(job: Job) -> int:
    return int((job.spec.get("retries") or {}).get("oom", 1))


def finish_attempt(session: Session, *, job_id: uuid.UUID, attempt: int, worker_id: str | None, outcome: str,
                   reason: str | None = None, result: dict[str, Any] | None = None) -> JobStatus | None:
    """End an attempt. Retryable outcomes consume their budget and re-queue as attempt + 1.

    Returns the job's new status, or None when the attempt was no longer current (nothing changed).
    ``worker_id=None`` is the reconciler acting on an expired lease; a worker's own report is fenced by its
    lease (``fence``): one that lost it changes nothing.
    """
    conds = [Job.id == job_id, Job.attempt == attempt, Job.status == JobStatus.RUNNING]
    if worker_id is not None:
        conds += [Job.worker_id == worker_id, Job.lease_expires_at > utcnow()]
    job = session.execute(select(Job).where(and_(*conds)).with_for_update()).scalar_one_or_none()
    if job is None:
        return None
    now = utcnow()
    if result:
        job.result = {**(job.result or {}), **result}
    if job.cancel_requested and outcome != SUCCEEDED:
        # A cancel wins over any retry: the user asked for this job to stop.
        terminate(session, job, JobStatus.CANCELLED, "cancelled on request")
    elif outcome == SUCCEEDED:
        terminate(session, job, JobStatus.SUCCEEDED, reason)
    elif outcome == CANCELLED:
        terminate(session, job, JobStatus.CANCELLED, reason or "cancelled")
    elif outcome in (PREEMPTED, INFRA_ERROR):
        job.infra_failures += 1
        budget = infra_budget(job)
        if job.infra_failures <= budget:
            _retry(session, job, f"{reason or outcome}; retry {job.infra_failures}/{budget} "
                                 "(infrastructure budget), resuming from the latest checkpoint")
        else:
            cap = " (capped by CRUCIBLE_MAX_INFRA_RETRIES)" if budget < job.max_infra_retries else ""
            terminate(session, job, JobStatus.FAILED,
                      f"{reason or outcome}; infrastructure retry budget ({budget}{cap}) exhausted")
    elif outcome == OOM:
        add_event(session, job.id, job.attempt, OOM_EVENT, reason=reason)
        session.flush()
        used = session.scalar(select(func.count()).select_from(JobEvent)
                              .where(JobEvent.job_id == job.id, JobEvent.type == OOM_EVENT)) or 0
        budget = oom_budget(job)
        if used <= budget:
            _retry(session, job, f"{reason or 'out of memory'}; retry {used}/{budget} (out-of-memory budget, "
                                 "retries.oom), resuming from the latest checkpoint")
        else:
            terminate(session, job, JobStatus.FAILED,
                      f"{reason or 'out of memory'}; out-of-memory retry budget ({budget}) exhausted: lower "
                      "batch_size or image_size, or raise resources.mem_gb")
    elif outcome == USER_ERROR:
        job.user_failures += 1
        if job.user_failures <= job.max_user_retries:
            _retry(session, job, f"{reason or outcome}; retry {job.user_failures}/{job.max_user_retries} "
                                 "(user-error budget)")
        else:
            terminate(session, job, JobStatus.FAILED, reason or "the method failed")
    elif outcome == CONFIG_ERROR:
        terminate(session, job, JobStatus.FAILED, reason or "the job cannot run as specified")
    else:
        raise ValueError(f"unknown outcome {outcome!r}")
    job.updated_at = now
    return job.status


def terminate(session: Session, job: Job, status: JobStatus, reason: str | None) -> None:
    job.status = status
    job.status_reason = reason
    job.finished_at = utcnow()
    job.lease_expires_at = None
    if status == JobStatus.SUCCEEDED:
        job.progress = 1.0
        job.eta_seconds = 0.0
    add_event(session, job.id, job.attempt, "state", status=status.value, reason=reason)


def _retry(session: Session, job: Job, reason: str) -> None:
    add_event(session, job.id, job.attempt, "retry", reason=reason)
    job.attempt += 1
    job.status_reason = reason
    enqueue(session, job, reason=reason)


def cancel(session: Session, job: Job) -> JobStatus:
    """Cancel now if nothing runs; a running job gets a flag its supervisor acts on (SIGTERM → grace → SIGKILL)."""
    if job.status.terminal:
        return job.status
    job.cancel_requested = True
    if job.status == JobStatus.RUNNING:
        add_event(session, job.id, job.attempt, "cancel_requested")
    else:
        terminate(session, job, JobStatus.CANCELLED, "cancelled before it ran")
    return job.status

