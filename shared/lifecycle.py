"""The job state machine: every change of a job's status happens through these functions.

``TRANSITIONS`` is the allowed-transition table; a change it does not allow raises ``IllegalTransition`` (a
bug in the caller, never user input). Each transition of a running job is a guarded UPDATE
(``WHERE id = … AND attempt = … AND status = …``), so a stale worker, a duplicate broker delivery or a racing
reconciler changes nothing: "the broker delivers, Postgres decides".

pending -> queued (dependencies met) -> dispatched (on the broker) -> running (claimed) -> succeeded / failed /
cancelled / pruned; running -> queued is a retry (attempt + 1), dispatched -> queued a re-publish of a lost
message, queued -> running a claim that overtook the dispatcher's bookkeeping; pending, queued and dispatched jobs
can be cancelled (or pruned), and a pending one fails when a dependency does. ``pruned`` is a sweep's early stop
(``prune``): the running method gets the cooperative stop of a cancel (SIGTERM -> checkpoint), and the attempt
ends as pruned, never retried.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, and_, func, select, update
from sqlalchemy.orm import Session

from shared import webhooks
from shared.config import get_settings
from shared.kinds import queue_for
from shared.models import Job, JobEvent, JobStatus, Outbox, utcnow

MAX_EVENT_TEXT = 4000

_S = JobStatus
TRANSITIONS: Mapping[JobStatus, frozenset[JobStatus]] = {
    _S.PENDING: frozenset({_S.QUEUED, _S.FAILED, _S.CANCELLED, _S.PRUNED}),
    _S.QUEUED: frozenset({_S.DISPATCHED, _S.RUNNING, _S.CANCELLED, _S.PRUNED}),
    _S.DISPATCHED: frozenset({_S.RUNNING, _S.QUEUED, _S.CANCELLED, _S.PRUNED}),
    _S.RUNNING: frozenset({_S.SUCCEEDED, _S.FAILED, _S.CANCELLED, _S.PRUNED, _S.QUEUED}),
    _S.SUCCEEDED: frozenset(),
    _S.FAILED: frozenset(),
    _S.CANCELLED: frozenset(),
    _S.PRUNED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A status change the state machine does not allow: a bug in the caller, not bad input."""


def can_transition(src: JobStatus, dst: JobStatus) -> bool:
    return dst in TRANSITIONS[src]


def sources_of(dst: JobStatus) -> list[JobStatus]:
    """Every status a job may be in to move to ``dst`` (for guarded UPDATEs)."""
    return [src for src, dsts in TRANSITIONS.items() if dst in dsts]


def _transition(job: Job, dst: JobStatus) -> None:
    # A Job built in this transaction without a status has not been inserted yet: it starts as pending.
    src = job.status if job.status is not None else JobStatus.PENDING
    if not can_transition(src, dst):
        allowed = ", ".join(sorted(TRANSITIONS[src])) or "nothing (terminal)"
        raise IllegalTransition(f"job {job.id}: {src.value} -> {dst.value} is not allowed; from {src.value}: "
                                f"{allowed}")
    job.status = dst


def add_event(session: Session, job_id: uuid.UUID, attempt: int, type_: str, **data: Any) -> None:
    if isinstance(data.get("line"), str) and len(data["line"]) > MAX_EVENT_TEXT:
        data["line"] = data["line"][:MAX_EVENT_TEXT] + "…"
    session.add(JobEvent(job_id=job_id, attempt=attempt, type=type_, data=data))


def enqueue(session: Session, job: Job, *, reason: str) -> None:
    """Make ``job`` runnable: status queued plus an outbox row, in the caller's transaction."""
    _transition(job, JobStatus.QUEUED)
    job.queued_at = utcnow()
    job.worker_id = None
    job.lease_expires_at = None
    session.add(Outbox(job_id=job.id, attempt=job.attempt, queue=queue_for(job.worker_kind), priority=job.priority))
    add_event(session, job.id, job.attempt, "state", status=JobStatus.QUEUED.value, reason=reason)


def dispatch(session: Session, job: Job, *, queue: str, at: datetime | None = None) -> None:
    """The job's message is on the broker (``queue``): queued -> dispatched, in the caller's transaction."""
    _transition(job, JobStatus.DISPATCHED)
    job.dispatched_at = at or utcnow()
    add_event(session, job.id, job.attempt, "state", status=JobStatus.DISPATCHED.value, queue=queue)


def claim(session: Session, *, job_id: uuid.UUID, attempt: int, worker_id: str, lease_s: float) -> Job | None:
    """Atomically take the job for this attempt; None means a duplicate/stale delivery (do no work)."""
    now = utcnow()
    res = cast(CursorResult[Any], session.execute(  # an UPDATE's result is a cursor result (it has rowcount)
        update(Job)
        .where(Job.id == job_id, Job.attempt == attempt, Job.cancel_requested.is_(False),
               Job.status.in_(sources_of(JobStatus.RUNNING)))
        .values(status=JobStatus.RUNNING, worker_id=worker_id, lease_expires_at=now + timedelta(seconds=lease_s),
                started_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    ))
    if res.rowcount != 1:
        return None
    add_event(session, job_id, attempt, "state", status=JobStatus.RUNNING.value, worker=worker_id)
    return session.get(Job, job_id, populate_existing=True)


@dataclass(frozen=True)
class LeaseState:
    held: bool  # False: the job is no longer ours (reconciled away, or finished elsewhere)
    cancel_requested: bool
    stop_reason: str | None = None  # with cancel_requested: "pruned" for a sweep's early stop, else a cancel
    preempt_requested: bool = False  # the scheduler wants the GPUs back: checkpoint, exit, be re-queued


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
        .returning(Job.cancel_requested, Job.stop_reason, Job.preempt_requested)
        .execution_options(synchronize_session=False)
    ).first()
    if res is None:
        raise LeaseLost(f"job {job_id} attempt {attempt} is no longer held by {worker_id}")
    return LeaseState(held=True, cancel_requested=bool(res[0]), stop_reason=res[1], preempt_requested=bool(res[2]))


class Outcome(enum.StrEnum):
    """How an attempt ended, as its supervisor (or the reconciler) reports it to ``finish_attempt``."""

    SUCCEEDED = "succeeded"
    CANCELLED = "cancelled"
    PREEMPTED = "preempted"  # retried on the infrastructure budget, resuming from the latest checkpoint
    USER_ERROR = "user_error"  # the method failed: retried on the user-error budget
    CONFIG_ERROR = "config_error"  # the job cannot run as specified: failed at once, never retried
    INFRA_ERROR = "infra_error"  # worker lost, killed, storage down: retried on the infrastructure budget
    OOM = "oom"  # the child was killed for memory: retried on its own small budget (retries.oom)
    PRUNED = "pruned"  # stopped on its sweep's request (after checkpointing): ends pruned, never retried


PRUNE = "pruned"  # ``Job.stop_reason`` of a sweep's early stop


# Module-level names kept for callers that predate the enum (they compare equal to the strings).
SUCCEEDED, CANCELLED, PREEMPTED, USER_ERROR, CONFIG_ERROR, INFRA_ERROR, OOM = (
    Outcome.SUCCEEDED, Outcome.CANCELLED, Outcome.PREEMPTED, Outcome.USER_ERROR, Outcome.CONFIG_ERROR,
    Outcome.INFRA_ERROR, Outcome.OOM)


def renew_lease(session: Session, *, job_id: uuid.UUID, attempt: int, worker_id: str, lease_s: float,
                progress: float | None = None, eta_seconds: float | None = None) -> LeaseState:
    """Extend a live lease (an expired one stays expired: its attempt is over, see ``fence``)."""
    try:
        return fence(session, job_id=job_id, attempt=attempt, worker_id=worker_id, renew_s=lease_s,
                     progress=progress, eta_seconds=eta_seconds)
    except LeaseLost:
        return LeaseState(held=False, cancel_requested=False)


OOM_EVENT = "oom_kill"  # one per out-of-memory attempt: the count is the OOM budget used (no column needed)


def infra_budget(job: Job) -> int:
    """The job's infrastructure retries: what its spec asked for, capped by the operator's ceiling."""
    return min(job.max_infra_retries, get_settings().MAX_INFRA_RETRIES)


def oom_budget(job: Job) -> int:
    return int((job.spec.get("retries") or {}).get("oom", 1))


def finish_attempt(session: Session, *, job_id: uuid.UUID, attempt: int, worker_id: str | None,
                   outcome: Outcome | str, reason: str | None = None,
                   result: dict[str, Any] | None = None) -> JobStatus | None:
    """End an attempt. Retryable outcomes consume their budget and re-queue as attempt + 1.

    Returns the job's new status, or None when the attempt was no longer current (nothing changed).
    ``worker_id=None`` is the reconciler acting on an expired lease; a worker's own report is fenced by its
    lease (``fence``): one that lost it changes nothing. An unknown outcome is a ValueError.
    """
    try:
        outcome = Outcome(outcome)
    except ValueError:
        raise ValueError(f"unknown outcome {outcome!r}; one of: {', '.join(Outcome)}") from None
    conds = [Job.id == job_id, Job.attempt == attempt, Job.status == JobStatus.RUNNING]
    if worker_id is not None:
        conds += [Job.worker_id == worker_id, Job.lease_expires_at > utcnow()]
    job = session.execute(select(Job).where(and_(*conds)).with_for_update()).scalar_one_or_none()
    if job is None:
        return None
    now = utcnow()
    if result:
        job.result = {**(job.result or {}), **result}
    if job.cancel_requested and outcome != Outcome.SUCCEEDED:
        # A stop request wins over any retry: the user (or the job's sweep) asked for this job to stop.
        if job.stop_reason == PRUNE:
            terminate(session, job, JobStatus.PRUNED, reason if outcome == Outcome.PRUNED else
                      f"pruned by its sweep ({reason or outcome})")
        else:
            terminate(session, job, JobStatus.CANCELLED, "cancelled on request")
    elif outcome == Outcome.PRUNED:
        terminate(session, job, JobStatus.PRUNED, reason or "pruned by its sweep")
    elif outcome == Outcome.SUCCEEDED:
        terminate(session, job, JobStatus.SUCCEEDED, reason)
    elif outcome == Outcome.CANCELLED:
        terminate(session, job, JobStatus.CANCELLED, reason or "cancelled")
    elif outcome == Outcome.PREEMPTED and job.preempt_requested:
        # The scheduler stopped it for a higher-priority job (services/scheduler/admission.py): not the job's
        # fault, so no retry budget is spent; it resumes from the checkpoint it just wrote.
        job.preempt_requested = False
        _retry(session, job, f"{reason or outcome}; preempted by the scheduler for a higher-priority job, "
                             "resuming from the latest checkpoint")
    elif outcome in (Outcome.PREEMPTED, Outcome.INFRA_ERROR):
        job.infra_failures += 1
        budget = infra_budget(job)
        if job.infra_failures <= budget:
            _retry(session, job, f"{reason or outcome}; retry {job.infra_failures}/{budget} "
                                 "(infrastructure budget), resuming from the latest checkpoint")
        else:
            cap = " (capped by CRUCIBLE_MAX_INFRA_RETRIES)" if budget < job.max_infra_retries else ""
            terminate(session, job, JobStatus.FAILED,
                      f"{reason or outcome}; infrastructure retry budget ({budget}{cap}) exhausted")
    elif outcome == Outcome.OOM:
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
    elif outcome == Outcome.USER_ERROR:
        job.user_failures += 1
        if job.user_failures <= job.max_user_retries:
            _retry(session, job, f"{reason or outcome}; retry {job.user_failures}/{job.max_user_retries} "
                                 "(user-error budget)")
        else:
            terminate(session, job, JobStatus.FAILED, reason or "the method failed")
    else:  # Outcome.CONFIG_ERROR
        terminate(session, job, JobStatus.FAILED, reason or "the job cannot run as specified")
    job.updated_at = now
    return job.status


def terminate(session: Session, job: Job, status: JobStatus, reason: str | None) -> None:
    """End the job: succeeded, failed, cancelled or pruned (from any status the table allows)."""
    if not status.terminal:
        raise IllegalTransition(f"terminate() takes a terminal status, not {status.value}")
    _transition(job, status)
    job.status_reason = reason
    job.finished_at = utcnow()
    job.lease_expires_at = None
    if status == JobStatus.SUCCEEDED:
        job.progress = 1.0
        job.eta_seconds = 0.0
    add_event(session, job.id, job.attempt, "state", status=status.value, reason=reason)
    webhooks.enqueue(session, job.project_id, f"job.{status.value}",
                     {"job_id": str(job.id), "status": status.value, "reason": reason, "name": job.name})


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



def prune(session: Session, job: Job, *, reason: str) -> JobStatus:
    """A sweep's early stop. A running job gets the cancel flag with ``stop_reason="pruned"``: its supervisor
    stops the method cooperatively (SIGTERM -> checkpoint, as for a cancel) and the attempt ends pruned. A job
    waiting for a (re)try ends pruned at once; a finished one is left as it is."""
    if job.status.terminal:
        return job.status
    job.cancel_requested = True
    job.stop_reason = PRUNE
    if job.status == JobStatus.RUNNING:
        add_event(session, job.id, job.attempt, "prune_requested", reason=reason)
    else:
        terminate(session, job, JobStatus.PRUNED, reason)
    return job.status
