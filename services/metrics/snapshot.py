"""One read of the job path's state, shared by ``/metrics`` (Prometheus) and ``/metrics/queues`` (KEDA).

Three cheap queries, each one aggregate or one small table, plus one Redis round trip:

* ``jobs``: ``GROUP BY status, kind, worker_kind`` gives jobs by state, per-queue demand, the oldest waiting
  job, and the attempt/retry totals in a single scan;
* ``jobs`` dispatched within the last ``DISPATCH_WINDOW_SECONDS`` (capped): the dispatch-latency histogram;
* ``workers`` (one row per live worker process; the reconciler prunes it): heartbeat ages.

Every API replica reports the same numbers (they come from Postgres and Redis, not from the process), so
dashboards aggregate with ``max by (...)``, never ``sum``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.config import Settings, get_settings
from shared.kinds import JOB_KINDS, WORKER_KINDS, queue_for
from shared.models import Job, JobStatus, Worker, utcnow

log = logging.getLogger("crucible.metrics")

# Dispatch latency is reported over a sliding window of recent dispatches (a gauge histogram): every replica
# computes the same buckets from the rows, so nothing is lost when an API pod restarts.
DISPATCH_WINDOW_SECONDS = 900.0
DISPATCH_SAMPLE_LIMIT = 5000
DISPATCH_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)

# KEDA polls every ScaledObject at about the same moment; one read serves that burst.
SNAPSHOT_TTL_SECONDS = 1.0

WAITING = (JobStatus.QUEUED, JobStatus.DISPATCHED)
DEMAND = (JobStatus.QUEUED, JobStatus.DISPATCHED, JobStatus.RUNNING)

# kombu's Redis transport keeps one list per queue and priority step ("<queue>\x06\x16<step>" for steps > 0).
_KOMBU_PRIORITY_SEP = "\x06\x16"
_KOMBU_PRIORITY_STEPS = (3, 6, 9)


@dataclass
class QueueState:
    worker_kind: str
    queue: str
    depth: int = 0  # messages waiting in the broker (Redis LLEN), or dispatched-but-unclaimed jobs
    queued: int = 0  # runnable, still in the outbox
    dispatched: int = 0  # published, not yet claimed
    running: int = 0
    oldest_waiting_at: datetime | None = None

    @property
    def demand(self) -> int:
        """Workers this kind could use right now: every job waiting for or holding a worker."""
        return self.queued + self.dispatched + self.running


@dataclass
class WorkerState:
    id: str
    kind: str
    hostname: str
    heartbeat_age: float
    busy: bool


@dataclass
class Snapshot:
    taken_at: datetime
    jobs: dict[tuple[str, str], int] = field(default_factory=dict)  # (state, kind) -> count
    attempts: dict[str, int] = field(default_factory=dict)  # kind -> sum(attempt)
    retries: dict[str, int] = field(default_factory=dict)  # kind -> sum(attempt - 1)
    infra_failures: dict[str, int] = field(default_factory=dict)  # preemptions + lost workers
    user_failures: dict[str, int] = field(default_factory=dict)
    queues: dict[str, QueueState] = field(default_factory=dict)  # worker kind -> state
    depth_source: str = "database"  # "redis" when depth is LLEN of the broker's lists
    dispatch_latencies: dict[str, list[float]] = field(default_factory=dict)  # queue -> seconds
    workers: list[WorkerState] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # part -> why it could not be read

    def oldest_waiting_age(self, worker_kind: str) -> float:
        q = self.queues[worker_kind]
        return max(0.0, (self.taken_at - q.oldest_waiting_at).total_seconds()) if q.oldest_waiting_at else 0.0


# --- database parts -----------------------------------------------------------------------------------------
def read_jobs(session: Session, snap: Snapshot) -> None:
    rows = session.execute(
        select(Job.status, Job.kind, Job.worker_kind, func.count(), func.min(Job.queued_at), func.sum(Job.attempt),
               func.sum(Job.infra_failures), func.sum(Job.user_failures))
        .group_by(Job.status, Job.kind, Job.worker_kind)
    ).all()
    for kind in JOB_KINDS:  # zero-filled, so a dashboard shows a flat line instead of "no data"
        for st in JobStatus:
            snap.jobs[(st.value, kind)] = 0
        for totals in (snap.attempts, snap.retries, snap.infra_failures, snap.user_failures):
            totals[kind] = 0
    for status, kind, worker_kind, count, oldest, attempts, infra, user in rows:
        state = JobStatus(status).value
        snap.jobs[(state, kind)] = snap.jobs.get((state, kind), 0) + count
        snap.attempts[kind] = snap.attempts.get(kind, 0) + int(attempts or 0)
        snap.retries[kind] = snap.retries.get(kind, 0) + int(attempts or 0) - count
        snap.infra_failures[kind] = snap.infra_failures.get(kind, 0) + int(infra or 0)
        snap.user_failures[kind] = snap.user_failures.get(kind, 0) + int(user or 0)
        q = snap.queues.get(worker_kind)
        if q is None:
            continue  # a worker kind this build does not know: counted in jobs, not in any queue
        if status == JobStatus.QUEUED:
            q.queued += count
        elif status == JobStatus.DISPATCHED:
            q.dispatched += count
        elif status == JobStatus.RUNNING:
            q.running += count
        if status in WAITING and oldest is not None:
            q.oldest_waiting_at = oldest if q.oldest_waiting_at is None else min(q.oldest_waiting_at, oldest)


def read_dispatch_latencies(session: Session, snap: Snapshot) -> None:
    since = snap.taken_at - timedelta(seconds=DISPATCH_WINDOW_SECONDS)
    rows = session.execute(
        select(Job.worker_kind, Job.queued_at, Job.dispatched_at)
        .where(Job.dispatched_at >= since, Job.queued_at.is_not(None))
        .order_by(Job.dispatched_at.desc())
        .limit(DISPATCH_SAMPLE_LIMIT)
    ).all()
    for worker_kind, queued_at, dispatched_at in rows:
        if worker_kind not in snap.queues or queued_at is None or dispatched_at is None:
            continue
        delay = (dispatched_at - queued_at).total_seconds()
        if delay < 0:  # re-queued for another attempt since; its new dispatch is not in yet
            continue
        snap.dispatch_latencies.setdefault(queue_for(worker_kind), []).append(delay)


def read_workers(session: Session, snap: Snapshot) -> None:
    for wid, kind, hostname, beat, job_id in session.execute(
        select(Worker.id, Worker.kind, Worker.hostname, Worker.last_heartbeat_at, Worker.current_job_id)
    ):
        age = max(0.0, (snap.taken_at - beat).total_seconds())
        snap.workers.append(WorkerState(wid, kind, hostname, age, job_id is not None))


# --- broker part --------------------------------------------------------------------------------------------
_redis_lock = threading.Lock()
_redis_clients: dict[str, Any] = {}


def _redis_for(url: str) -> Any:  # a redis.Redis (imported lazily: the API need not load it without Redis)
    import redis

    with _redis_lock:
        client = _redis_clients.get(url)
        if client is None:
            client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
            _redis_clients[url] = client
        return client


def read_broker_depths(settings: Settings, snap: Snapshot) -> None:
    """LLEN of every queue's Redis lists; other brokers (the embedded SQL broker) count unclaimed jobs instead."""
    if not settings.BROKER_URL.startswith(("redis://", "rediss://")):
        for q in snap.queues.values():
            q.depth = q.dispatched
        return
    client = _redis_for(settings.BROKER_URL)
    pipe = client.pipeline(transaction=False)
    names = []
    for q in snap.queues.values():
        for name in (q.queue, *(f"{q.queue}{_KOMBU_PRIORITY_SEP}{step}" for step in _KOMBU_PRIORITY_STEPS)):
            pipe.llen(name)
            names.append(q.worker_kind)
    for worker_kind, length in zip(names, pipe.execute(), strict=True):
        snap.queues[worker_kind].depth += int(length)
    snap.depth_source = "redis"


# --- the snapshot -------------------------------------------------------------------------------------------
def take_snapshot(settings: Settings | None = None) -> Snapshot:
    """Read everything once. A part that fails is recorded in ``errors``; the rest is still reported."""
    from shared.db import session_scope

    s = settings or get_settings()
    snap = Snapshot(taken_at=utcnow())
    snap.queues = {k: QueueState(worker_kind=k, queue=queue_for(k)) for k in WORKER_KINDS}
    try:
        with session_scope() as session:
            for name, part in (("jobs", read_jobs), ("dispatch", read_dispatch_latencies),
                               ("workers", read_workers)):
                try:
                    part(session, snap)
                except Exception as e:
                    session.rollback()  # a failed statement poisons the transaction for the next part
                    snap.errors[name] = f"{type(e).__name__}: {e}"[:300]
    except Exception as e:  # no connection at all
        for name in ("jobs", "dispatch", "workers"):
            snap.errors.setdefault(name, f"{type(e).__name__}: {e}"[:300])
    try:
        read_broker_depths(s, snap)
    except Exception as e:
        # Redis is down: the unclaimed jobs the database knows of are the best estimate of the backlog.
        snap.errors["broker"] = f"{type(e).__name__}: {e}"[:300]
        for q in snap.queues.values():
            q.depth = q.dispatched
        snap.depth_source = "database"
    for failed, why in snap.errors.items():
        log.warning("metrics: could not read %s: %s", failed, why)
    return snap


_cache_lock = threading.Lock()
_cached: tuple[float, Snapshot] | None = None


def current_snapshot() -> Snapshot:
    """The latest snapshot, re-read when older than ``SNAPSHOT_TTL_SECONDS``."""
    global _cached
    with _cache_lock:
        now = time.monotonic()
        if _cached is None or now - _cached[0] >= SNAPSHOT_TTL_SECONDS:
            _cached = (now, take_snapshot())
        return _cached[1]
