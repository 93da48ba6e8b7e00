"""Outbox → Celery. A broker outage delays jobs but loses none: unpublished rows simply wait."""

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
from shared.kinds import queue_for
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


def dispatch_once(session: Session, celery: Celery, settings: Settings, *, batch: int = 200) -> DispatchStats:
    stats = DispatchStats()
    rows = session.execute(
        select(Outbox, Job).join(Job, Job.id == Outbox.job_id)
        .where(Outbox.published_at.is_(None))
        .order_by(Outbox.priority.desc(), Outbox.id)
        .limit(batch)
        .with_for_update(of=Outbox, skip_locked=True)
    ).all()
    if not rows:
        return stats
    in_flight: Counter[str] = Counter(dict(session.execute(
        select(Job.worker_kind, func.count()).where(Job.status == JobStatus.DISPATCHED).group_by(Job.worker_kind)
    ).all()))
    idle = idle_workers_by_kind(session, settings)
    all_idle = idle.get("all", 0)
    now = utcnow()
    for outbox, job in rows:
        if job.status != JobStatus.QUEUED or job.attempt != outbox.attempt:
            outbox.published_at, outbox.last_error = now, f"skipped: job is {job.status.value}, attempt {job.attempt}"
            stats.skipped_stale += 1
            continue
        window = settings.QUEUE_WINDOW + idle.get(job.worker_kind, 0) + all_idle
        if in_flight[job.worker_kind] >= window:
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
        in_flight[job.worker_kind] += 1
        stats.published += 1
        stats.per_queue[outbox.queue] += 1
    return stats
