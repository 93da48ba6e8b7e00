"""Outbox → Celery, admitting jobs by quota, fair share and free GPUs. A broker outage delays jobs but loses none:
unpublished rows simply wait.

One cycle: take the dispatch lock, read the snapshot (services/scheduler/snapshot.py: per-project heads with
LIMIT, never the whole queue), let ``admission.plan`` decide (a pure function; the simulator calls the same one),
publish what it admits, store why the rest wait (``jobs.wait_reason``, written only when it changed) and flag the
jobs it preempts. Several scheduler replicas are safe: the decision runs under a transaction-scoped Postgres
advisory lock taken with ``pg_try_advisory_xact_lock`` (a replica that does not get it skips the cycle, as the
holder is dispatching), so two replicas never both spend the same free GPUs or quota; the outbox rows are also
locked ``FOR UPDATE SKIP LOCKED`` and re-checked, so a message is published once per attempt.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from sqlalchemy import Table, bindparam, func, select, update
from sqlalchemy.orm import Session

from services.scheduler import snapshot
from services.scheduler.admission import Plan, plan
from shared.celery_app import RUN_JOB_TASK
from shared.config import Settings
from shared.lifecycle import add_event, dispatch
from shared.models import Job, JobStatus, Outbox, utcnow

log = logging.getLogger(__name__)

_JOBS: Table = Job.__table__  # type: ignore[assignment]  # a Table: a Core UPDATE executemany over its rows
DISPATCH_LOCK = 0x6372_7563_6962  # "crucib": the advisory lock key every scheduler replica uses


@dataclass
class DispatchStats:
    published: int = 0
    skipped_stale: int = 0
    held_by_window: int = 0  # heads read this cycle that the plain queues' windows held back
    waiting: int = 0  # heads read this cycle that wait (quota, capacity, window)
    preempted: int = 0
    lock_busy: bool = False  # another replica was dispatching: this one skipped the cycle
    broker_error: str | None = None
    per_queue: Counter[str] = field(default_factory=Counter)


def _take_lock(session: Session) -> bool:
    if session.get_bind().dialect.name != "postgresql":
        return True  # SQLite (embedded, one scheduler) serialises writers itself
    return bool(session.scalar(select(func.pg_try_advisory_xact_lock(DISPATCH_LOCK))))


def dispatch_once(session: Session, celery: Celery, settings: Settings, *, batch: int = 200) -> DispatchStats:
    stats = DispatchStats()
    if not _take_lock(session):
        stats.lock_busy = True
        return stats
    now = utcnow()
    snap, heads = snapshot.build(session, settings, now=now)
    if not snap.candidates:
        return stats
    decided = plan(snap, snapshot.policy_from_settings(settings))
    _publish(session, celery, decided, heads, stats, batch=batch, now=now)
    _record_waiting(session, decided, heads, stats)
    _request_preemption(session, decided, stats)
    return stats


def _publish(session: Session, celery: Celery, decided: Plan, heads: dict[Any, snapshot.Head], stats: DispatchStats,
             *, batch: int, now: Any) -> None:
    chosen = decided.dispatch[:batch]
    if not chosen:
        return
    pool_of = {c.job_id: pool for c, pool in chosen}
    rows = {o.id: (o, j) for o, j in session.execute(
        select(Outbox, Job).join(Job, Job.id == Outbox.job_id)
        .where(Outbox.id.in_([heads[c.job_id].outbox_id for c, _ in chosen]), Outbox.published_at.is_(None))
        .with_for_update(of=Outbox, skip_locked=True)
    ).all()}
    for c, _ in chosen:  # in the plan's order
        got = rows.get(heads[c.job_id].outbox_id)
        if got is None:  # another transaction holds or published it
            continue
        outbox, job = got
        if job.status != JobStatus.QUEUED or job.attempt != outbox.attempt:  # changed since it was read
            outbox.published_at, outbox.last_error = now, f"skipped: job is {job.status.value}, attempt {job.attempt}"
            stats.skipped_stale += 1
            continue
        pool = pool_of[c.job_id]
        queue = snapshot.pool_queue(pool) if pool else outbox.queue
        try:
            celery.send_task(RUN_JOB_TASK, args=[str(job.id), job.attempt], queue=queue, retry=False)
        except Exception as e:  # broker down: keep the row, try again next cycle
            outbox.publish_attempts += 1
            outbox.last_error = f"{type(e).__name__}: {e}"[:1000]
            stats.broker_error = outbox.last_error
            log.warning("broker unavailable, %d job(s) wait in the outbox: %s", len(chosen), outbox.last_error)
            break
        outbox.published_at = now
        outbox.publish_attempts += 1
        job.pool, job.wait_reason, job.preempt_requested = pool, None, False
        dispatch(session, job, queue=queue, at=now)
        stats.published += 1
        stats.per_queue[queue] += 1


def _record_waiting(session: Session, decided: Plan, heads: dict[Any, snapshot.Head], stats: DispatchStats) -> None:
    """Store why each head waits, only where it changed (a stable reason costs no write per cycle)."""
    stats.waiting = len(decided.waiting)
    stats.held_by_window = sum("queue window" in r for r in decided.waiting.values())
    changed = [{"jid": jid, "reason": reason[:2000]} for jid, reason in decided.waiting.items()
               if heads[jid].wait_reason != reason[:2000]]
    if changed:
        session.execute(update(_JOBS).where(_JOBS.c.id == bindparam("jid"), _JOBS.c.status == JobStatus.QUEUED.value)
                        .values(wait_reason=bindparam("reason")), changed)


def _request_preemption(session: Session, decided: Plan, stats: DispatchStats) -> None:
    """Ask the victims' supervisors to stop (SIGTERM → checkpoint → re-queue as the next attempt)."""
    if not decided.preempt:
        return
    for job in session.scalars(select(Job).where(Job.id.in_(decided.preempt), Job.status == JobStatus.RUNNING,
                                                 Job.preempt_requested.is_(False)).with_for_update(skip_locked=True)):
        job.preempt_requested = True
        for_job = next((jid for pool, jid in decided.reserved.items() if pool == job.pool), None)
        add_event(session, job.id, job.attempt, "preempt_requested", pool=job.pool,
                  for_job=str(for_job) if for_job else None)
        stats.preempted += 1
