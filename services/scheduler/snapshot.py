"""The admission snapshot from the database, with queries whose cost does not grow with the queue.

* **Heads**: for every (project, worker kind), its best ``CRUCIBLE_SCHEDULER_HEADS`` queued jobs (priority,
  then age). On Postgres one ``LATERAL … LIMIT k`` probe of the partial index ``ix_jobs_queued_heads`` per
  pair, so 100,000 queued jobs cost what 1,000 do. SQLite (the embedded stack) ranks with ``ROW_NUMBER``.
* **Active**: dispatched and running jobs (bounded by the cluster, not the queue) via ``ix_jobs_status_lease``.
* **Usage**: jobs with GPUs that ended within ``HORIZON_HALF_LIVES`` half-lives (``ix_jobs_finished_at``),
  plus the running ones, decayed (fairshare.py).
* **Quotas**: the ``project_quotas`` table (one row per limited project).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import String, and_, column, func, select, text, true, values
from sqlalchemy.orm import Session

from services.scheduler.admission import ANY_CLASS, Active, Candidate, Policy, Pool, Quota, Snapshot
from services.scheduler.fairshare import HORIZON_HALF_LIVES, usage_by_project
from shared.config import Settings
from shared.kinds import WORKER_KINDS, queue_for
from shared.models import Job, JobStatus, Outbox, Project, ProjectQuota, Worker, utcnow

_QUEUED = text("jobs.status = 'queued'")  # a literal, so the planner matches the partial index's predicate


def pools_from_settings(settings: Settings) -> list[Pool]:
    pools = []
    for key, gpus in settings.GPU_POOLS.items():
        kind, _, gpu_class = key.rpartition(".")
        if kind not in WORKER_KINDS:
            raise ValueError(f"CRUCIBLE_GPU_POOLS: {key!r} names worker kind {kind!r}; known kinds: "
                             f"{', '.join(WORKER_KINDS)}")
        pools.append(Pool(kind, gpu_class, gpus))
    return pools


def pool_queue(pool_name: str) -> str:
    """Celery queue of a pool ``<worker kind>.<gpu class>``: the kind's queue plus ``.<gpu class>``."""
    kind, _, gpu_class = pool_name.rpartition(".")
    return f"{queue_for(kind)}.{gpu_class}"


def policy_from_settings(settings: Settings) -> Policy:
    return Policy(fair_share=settings.FAIR_SHARE, backfill=True, quotas=True,
                  reserve_after_s=settings.RESERVE_AFTER_SECONDS, half_life_s=settings.FAIR_SHARE_HALF_LIFE_SECONDS,
                  preemption=settings.PREEMPTION)


@dataclass(frozen=True)
class Head:
    """What the dispatcher needs besides the candidate: its outbox row and the reason stored last cycle."""

    outbox_id: int
    queue: str
    attempt: int
    wait_reason: str | None


def _gpus(spec: dict[str, Any] | None) -> int:
    return int(((spec or {}).get("resources") or {}).get("gpus") or 0)


def _gpu_class(spec: dict[str, Any] | None) -> str:
    return str(((spec or {}).get("resources") or {}).get("gpu_class") or ANY_CLASS)


def _ts(dt: datetime | None) -> float:
    return dt.timestamp() if dt is not None else 0.0


def _gpus_sql() -> Any:
    return func.coalesce(Job.spec["resources"]["gpus"].as_integer(), 0)


def heads(session: Session, k: int) -> list[tuple[Candidate, Head]]:
    """Each (project, worker kind)'s best ``k`` queued jobs that have an unpublished outbox row for their attempt
    (the join is inside the LIMIT: a queued row whose message went out is skipped, not counted)."""
    cols = (Job.id, Job.project_id, Job.worker_kind, Job.priority, Job.queued_at, Job.attempt, Job.wait_reason,
            Job.spec["resources"].label("resources"), Outbox.id.label("outbox_id"), Outbox.queue)
    pending = and_(Outbox.job_id == Job.id, Outbox.attempt == Job.attempt, Outbox.published_at.is_(None))
    if session.get_bind().dialect.name == "postgresql":
        kinds = values(column("kind", String), name="kinds").data([(k_,) for k_ in WORKER_KINDS])
        lat = (select(*cols).join(Outbox, pending)
               .where(Job.project_id == Project.id, Job.worker_kind == kinds.c.kind, _QUEUED)
               .order_by(Job.priority.desc(), Job.queued_at, Job.id).limit(k).lateral("h"))
        stmt = select(lat).select_from(Project).join(kinds, true()).join(lat, true())
    else:
        rn = func.row_number().over(partition_by=(Job.project_id, Job.worker_kind),
                                    order_by=(Job.priority.desc(), Job.queued_at, Job.id))
        inner = select(*cols, rn.label("rn")).join(Outbox, pending).where(_QUEUED).subquery()
        stmt = select(inner).where(inner.c.rn <= k)
    out = []
    for r in session.execute(stmt).all():
        spec = {"resources": r.resources}
        out.append((Candidate(job_id=r.id, project=r.project_id, worker_kind=r.worker_kind, priority=r.priority,
                              queued_at=_ts(r.queued_at), gpus=_gpus(spec), gpu_class=_gpu_class(spec),
                              seq=r.outbox_id),
                    Head(outbox_id=r.outbox_id, queue=r.queue, attempt=r.attempt, wait_reason=r.wait_reason)))
    return out


def active(session: Session) -> list[Active]:
    rows = session.execute(
        select(Job.id, Job.project_id, Job.worker_kind, _gpus_sql(), Job.pool, Job.priority, Job.started_at,
               Job.status, Job.preempt_requested)
        .where(Job.status.in_([JobStatus.DISPATCHED, JobStatus.RUNNING]))
    ).all()
    return [Active(job_id=jid, project=pid, worker_kind=kind, gpus=int(g or 0), pool=pool, priority=prio,
                   started_at=_ts(started) if started else None, dispatched=st == JobStatus.DISPATCHED,
                   preempting=bool(pre))
            for jid, pid, kind, g, pool, prio, started, st, pre in rows]


def usage(session: Session, running: list[Active], *, now: datetime, half_life: float) -> dict[Any, float]:
    """Decayed GPU-seconds per project: jobs that ended within the horizon, plus the running ones."""
    since = now - timedelta(seconds=HORIZON_HALF_LIVES * half_life)
    rows = session.execute(
        select(Job.project_id, _gpus_sql(), Job.started_at, Job.finished_at)
        .where(Job.finished_at > since, Job.started_at.is_not(None), _gpus_sql() > 0)
    ).all()
    intervals: list[tuple[Any, float, float, float | None]] = [(pid, float(g), _ts(s), _ts(f))
                                                                  for pid, g, s, f in rows]
    intervals += [(a.project, float(a.gpus), a.started_at, None) for a in running
                  if a.gpus and a.started_at is not None]
    return usage_by_project(intervals, now.timestamp(), half_life)


def quotas(session: Session) -> tuple[dict[uuid.UUID, Quota], dict[uuid.UUID, str]]:
    rows = session.execute(select(ProjectQuota, Project.name).join(Project, Project.id == ProjectQuota.project_id)
                           ).all()
    return ({q.project_id: Quota(q.max_gpus, q.max_jobs) for q, _ in rows},
            {q.project_id: name for q, name in rows})


def window(session: Session, settings: Settings) -> dict[str, int]:
    """Messages each worker kind's plain queue may hold: the window plus its idle, fresh workers."""
    fresh = utcnow() - timedelta(seconds=3 * settings.HEARTBEAT_SECONDS)
    idle: dict[str, int] = {}
    for kinds, in session.execute(
        select(Worker.kind).where(Worker.last_heartbeat_at >= fresh, Worker.current_job_id.is_(None))
    ):
        for k_ in kinds.split(","):
            idle[k_] = idle.get(k_, 0) + 1
    return {k_: settings.QUEUE_WINDOW + idle.get(k_, 0) + idle.get("all", 0) for k_ in WORKER_KINDS}


def build(session: Session, settings: Settings, *, now: datetime) -> tuple[Snapshot, dict[Any, Head]]:
    """The snapshot ``admission.plan`` decides on, and each candidate's outbox row."""
    found = heads(session, settings.SCHEDULER_HEADS)
    if not found:
        return Snapshot(now=now.timestamp(), candidates=[]), {}
    running = active(session)
    limits, names = quotas(session)
    snap = Snapshot(now=now.timestamp(), candidates=[c for c, _ in found], active=running,
                    pools=pools_from_settings(settings), window=window(session, settings),
                    usage=usage(session, running, now=now, half_life=settings.FAIR_SHARE_HALF_LIFE_SECONDS)
                    if settings.FAIR_SHARE else {},
                    quotas=limits, names=names)
    return snap, {c.job_id: h for c, h in found}
