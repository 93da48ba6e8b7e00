"""Outbox → Celery. A broker outage delays jobs but loses none: unpublished rows simply wait.

Selection is per queue: each queue's best rows (priority, then age) are ranked separately, so a queue holding
hundreds of high-priority jobs never keeps another queue's job waiting.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta

from celery import Celery
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.celery_app import RUN_JOB_TASK
from shared.config import Settings
from shared.kinds import WORKER_KINDS, queue_for
from shared.lifecycle import dispatch
from shared.models import Job, JobStatus, Outbox, Worker, utcnow

log = logging.getLogger(__name__)


@dataclass
class DispatchStats:
    published: int = 0
    skipped_stale: int = 0
    held_by_window: int = 0
    broker_error: str | None = None
    per_queue: Counter[str] = field(default_factory=Counter)


def idle_workers_by_kind(session: Session, settings: Settings) -> Counter[str]:
    """Idle workers with a fresh heartbeat, per worker kind they serve."""
    fresh = utcnow() - timedelta(seconds=3 * settings.HEARTBEAT_SECONDS)
    counts: Counter[str] = Counter()
    for kinds, in session.execute(
        select(Worker.kind).where(Worker.last_heartbeat_at >= fresh, Worker.current_job_id.is_(None))
    ):
        for k in kinds.split(","):
            counts[k] += 1
    return counts


def _free_slots(session: Session, settings: Settings) -> dict[str, int]:
    """Per queue: how many more messages may be in flight (window + idle workers - already dispatched)."""
    in_flight: Counter[str] = Counter(dict(session.execute(
        select(Job.worker_kind, func.count()).where(Job.status == JobStatus.DISPATCHED).group_by(Job.worker_kind)
    ).all()))
    idle = idle_workers_by_kind(session, settings)
    return {queue_for(k): settings.QUEUE_WINDOW + idle.get(k, 0) + idle.get("all", 0) - in_flight[k]
            for k in WORKER_KINDS}


def _candidates(session: Session, free: dict[str, int], batch: int) -> tuple[list[int], int]:
    """Outbox ids of each queue's best rows, at most that queue's free slots (ROW_NUMBER per queue), and how
    many runnable rows the windows hold back."""
    limit = min(batch, max(free.values(), default=0))
    rank = func.row_number().over(partition_by=Outbox.queue, order_by=(Outbox.priority.desc(), Outbox.id))
    total = func.count().over(partition_by=Outbox.queue)
    ranked = (select(Outbox.id, Outbox.queue, rank.label("rn"), total.label("total"))
              .join(Job, Job.id == Outbox.job_id)
              .where(Outbox.published_at.is_(None), Job.status == JobStatus.QUEUED, Job.attempt == Outbox.attempt)
              .subquery())
    rows = session.execute(select(ranked.c.id, ranked.c.queue, ranked.c.rn, ranked.c.total)
                           .where(ranked.c.rn <= max(limit, 1))).all()
    ids = [oid for oid, queue, rn, _ in rows if rn <= free.get(queue, 0)]
    totals = {queue: n for _, queue, _, n in rows}
    held = sum(max(0, n - max(free.get(q, 0), 0)) for q, n in totals.items())
    return ids, held


def dispatch_once(session: Session, celery: Celery, settings: Settings, *, batch: int = 200) -> DispatchStats:
    stats = DispatchStats()
    free = _free_slots(session, settings)
    ids, stats.held_by_window = _candidates(session, free, batch)
    if not ids:
        return stats
    rows = session.execute(
        select(Outbox, Job).join(Job, Job.id == Outbox.job_id)
        .where(Outbox.id.in_(ids), Outbox.published_at.is_(None))
        .order_by(Outbox.priority.desc(), Outbox.id)
        .with_for_update(of=Outbox, skip_locked=True)
    ).all()
    now = utcnow()
    for outbox, job in rows:
        if job.status != JobStatus.QUEUED or job.attempt != outbox.attempt:  # changed since it was ranked
            outbox.published_at, outbox.last_error = now, f"skipped: job is {job.status.value}, attempt {job.attempt}"
            stats.skipped_stale += 1
            continue
        if free.get(outbox.queue, 0) <= 0:
            stats.held_by_window += 1
            continue
        try:
            celery.send_task(RUN_JOB_TASK, args=[str(job.id), job.attempt], queue=queue_for(job.worker_kind),
                             retry=False)
        except Exception as e:  # broker down: keep the row, try again next cycle
            outbox.publish_attempts += 1
            outbox.last_error = f"{type(e).__name__}: {e}"[:1000]
            stats.broker_error = outbox.last_error
            log.warning("broker unavailable, %d job(s) wait in the outbox: %s", len(rows), outbox.last_error)
            break
        outbox.published_at = now
        outbox.publish_attempts += 1
        dispatch(session, job, queue=outbox.queue, at=now)
        free[outbox.queue] -= 1
        stats.published += 1
        stats.per_queue[outbox.queue] += 1
    return stats
