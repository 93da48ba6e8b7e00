"""The job state machine, dispatcher and reconciler against real Postgres and a real Redis broker."""

from __future__ import annotations

import shutil
import subprocess
import threading
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from services import localstack
from services.scheduler.dispatcher import dispatch_once
from services.scheduler.reconciler import reconcile_once
from shared import lifecycle
from shared.config import get_settings
from shared.db import session_scope
from shared.models import Job, JobStatus, Outbox, utcnow

pytestmark = pytest.mark.integration

TINY = {"kind": "ssl-train", "dataset": "builtin://shapes", "limit_train": 256, "batch_size": 64, "bank_size": 128,
        "epochs": 1}


def _submit(client, auth, **over):
    r = client.post("/v1/jobs", json={**TINY, **over}, headers=auth)
    assert r.status_code == 201, r.json()
    return uuid.UUID(r.json()["id"])


def _status(job_id):
    with session_scope() as s:
        return s.get(Job, job_id).status


def _only_these(job_ids):
    """Tests share one database: hide other tests' queued rows from the dispatcher."""
    with session_scope() as s:
        s.execute(update(Outbox).where(Outbox.published_at.is_(None), Outbox.job_id.not_in(job_ids))
                  .values(published_at=utcnow(), last_error="hidden by test"))
        s.execute(update(Job).where(Job.status == JobStatus.DISPATCHED, Job.id.not_in(job_ids))
                  .values(status=JobStatus.CANCELLED))


class RecordingBroker:
    """Records publishes (the real-broker path is covered by test_broker_outage_delays_but_loses_nothing)."""

    def __init__(self, fail: bool = False):
        self.sent, self.fail = [], fail

    def send_task(self, name, args, queue, retry):
        if self.fail:
            raise ConnectionError("broker down")
        self.sent.append((args[0], queue))


def test_claim_is_atomic_and_ignores_duplicates_and_stale_attempts(client, auth):
    job_id = _submit(client, auth)
    winners = []

    def claim(worker):
        with session_scope() as s:
            if lifecycle.claim(s, job_id=job_id, attempt=1, worker_id=worker, lease_s=60) is not None:
                winners.append(worker)

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1
    with session_scope() as s:
        assert lifecycle.claim(s, job_id=job_id, attempt=2, worker_id="late", lease_s=60) is None
        job = s.get(Job, job_id)
        assert job.status == JobStatus.RUNNING and job.worker_id == winners[0]


def test_retry_budgets_are_separate_for_infrastructure_and_user_errors(client, auth):
    infra = _submit(client, auth, retries={"infra": 1, "user": 0})
    user = _submit(client, auth, retries={"infra": 5, "user": 1})
    with session_scope() as s:
        lifecycle.claim(s, job_id=infra, attempt=1, worker_id="w", lease_s=60)
        assert lifecycle.finish_attempt(s, job_id=infra, attempt=1, worker_id="w",
                                        outcome=lifecycle.PREEMPTED) == JobStatus.QUEUED
        lifecycle.claim(s, job_id=infra, attempt=2, worker_id="w", lease_s=60)
        assert lifecycle.finish_attempt(s, job_id=infra, attempt=2, worker_id="w",
                                        outcome=lifecycle.PREEMPTED) == JobStatus.FAILED
        lifecycle.claim(s, job_id=user, attempt=1, worker_id="w", lease_s=60)
        assert lifecycle.finish_attempt(s, job_id=user, attempt=1, worker_id="w", outcome=lifecycle.USER_ERROR,
                                        reason="ZeroDivisionError") == JobStatus.QUEUED
        lifecycle.claim(s, job_id=user, attempt=2, worker_id="w", lease_s=60)
        assert lifecycle.finish_attempt(s, job_id=user, attempt=2, worker_id="w", outcome=lifecycle.USER_ERROR,
                                        reason="ZeroDivisionError") == JobStatus.FAILED
        # a stale worker cannot change a finished attempt
        assert lifecycle.finish_attempt(s, job_id=user, attempt=2, worker_id="w",
                                        outcome=lifecycle.SUCCEEDED) is None
    with session_scope() as s:
        j = s.get(Job, infra)
        assert (j.attempt, j.infra_failures, j.user_failures) == (2, 2, 0)
        assert "infrastructure retry budget (1) exhausted" in j.status_reason
        u = s.get(Job, user)
        assert (u.attempt, u.infra_failures, u.user_failures) == (2, 0, 2)


def test_reconciler_requeues_expired_leases_as_the_next_attempt(client, auth):
    job_id = _submit(client, auth)
    with session_scope() as s:
        lifecycle.claim(s, job_id=job_id, attempt=1, worker_id="ghost", lease_s=60)
        s.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    with session_scope() as s:
        stats = reconcile_once(s, get_settings())
    assert stats.lease_expired >= 1
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job.status == JobStatus.QUEUED and job.attempt == 2 and job.infra_failures == 1
        assert "worker ghost lost" in job.status_reason
        assert s.scalars(select(Outbox).where(Outbox.job_id == job_id, Outbox.attempt == 2)).one()


def test_dispatch_follows_priority_and_holds_back_beyond_the_window(client, auth, monkeypatch):
    low = _submit(client, auth, priority=-5)
    mid = _submit(client, auth)
    high = _submit(client, auth, priority=50)
    _only_these([low, mid, high])
    monkeypatch.setattr(get_settings(), "QUEUE_WINDOW", 2)
    broker = RecordingBroker()
    with session_scope() as s:
        stats = dispatch_once(s, broker, get_settings())
    assert [uuid.UUID(j) for j, _ in broker.sent] == [high, mid]
    assert stats.held_by_window == 1 and {q for _, q in broker.sent} == {"crucible.ssl-trainer"}
    assert _status(high) == JobStatus.DISPATCHED and _status(low) == JobStatus.QUEUED
    with session_scope() as s:  # the high one is claimed and leaves the window: the low one may go
        lifecycle.claim(s, job_id=high, attempt=1, worker_id="w", lease_s=60)
    with session_scope() as s:
        dispatch_once(s, broker, get_settings())
    assert uuid.UUID(broker.sent[-1][0]) == low


def test_stale_dispatch_is_published_again_and_duplicates_are_harmless(client, auth, monkeypatch):
    job_id = _submit(client, auth)
    _only_these([job_id])
    broker = RecordingBroker()
    with session_scope() as s:
        dispatch_once(s, broker, get_settings())
    with session_scope() as s:  # the message was lost (broker restarted empty, say)
        s.execute(update(Job).where(Job.id == job_id).values(dispatched_at=utcnow() - timedelta(hours=1)))
    with session_scope() as s:
        assert reconcile_once(s, get_settings()).redispatched == 1
    with session_scope() as s:
        dispatch_once(s, broker, get_settings())
    assert [uuid.UUID(j) for j, _ in broker.sent] == [job_id, job_id]
    with session_scope() as s:
        assert lifecycle.claim(s, job_id=job_id, attempt=1, worker_id="a", lease_s=60) is not None
        assert lifecycle.claim(s, job_id=job_id, attempt=1, worker_id="b", lease_s=60) is None


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server to stop and restart a broker")
def test_broker_outage_delays_but_loses_nothing(client, auth, tmp_path):
    """Jobs submitted while Redis is down wait in the outbox and are all dispatched once it returns."""
    import redis

    from shared.celery_app import make_celery

    port = localstack.free_port()

    def start_redis():
        proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                 "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL,
                                start_new_session=True)
        localstack.wait_until(lambda: localstack.port_open("127.0.0.1", port), timeout=20, what="redis")
        return proc

    settings = get_settings().model_copy(update={"BROKER_URL": f"redis://127.0.0.1:{port}/0", "QUEUE_WINDOW": 10})
    celery = make_celery(settings)
    proc = start_redis()
    localstack.stop(proc)  # the broker goes down ...
    ids = [_submit(client, auth) for _ in range(5)]  # ... while jobs are submitted
    _only_these(ids)
    with session_scope() as s:
        stats = dispatch_once(s, celery, settings)
    assert stats.published == 0 and stats.broker_error
    assert all(_status(j) == JobStatus.QUEUED for j in ids)
    proc = start_redis()  # ... and comes back
    try:
        with session_scope() as s:
            stats = dispatch_once(s, celery, settings)
        assert stats.published == 5
        assert all(_status(j) == JobStatus.DISPATCHED for j in ids)
        assert redis.Redis(port=port).llen("crucible.ssl-trainer") == 5
        with session_scope() as s:
            rows = s.scalars(select(Outbox).where(Outbox.job_id.in_(ids))).all()
            assert all(r.published_at is not None for r in rows)
            assert sorted(r.publish_attempts for r in rows) == [1, 1, 1, 1, 2]  # one failed try, then success
    finally:
        localstack.stop(proc)


def test_a_saturated_queue_never_blocks_another_queue(client, auth):
    """205 priority-100 jobs fill one queue's window; another project's job in an empty queue still goes at once."""
    from tests.conftest import new_project_key

    busy = [_submit(client, auth, priority=100) for _ in range(205)]
    _, other_token = new_project_key("other")
    lone = _submit(client, {"Authorization": f"Bearer {other_token}"})
    with session_scope() as s:  # a job of another worker kind (its own queue, empty)
        s.execute(update(Job).where(Job.id == lone).values(kind="distill", worker_kind="distiller"))
        s.execute(update(Outbox).where(Outbox.job_id == lone).values(queue="crucible.distiller"))
    _only_these([*busy, lone])
    broker = RecordingBroker()
    with session_scope() as s:
        stats = dispatch_once(s, broker, get_settings())
    sent = {uuid.UUID(j): q for j, q in broker.sent}
    assert sent.get(lone) == "crucible.distiller"
    window = stats.per_queue["crucible.ssl-trainer"]  # QUEUE_WINDOW plus any idle workers
    assert 1 <= window < 205  # the dispatcher reads only each project's heads: the rest wait unread
    assert stats.held_by_window == get_settings().SCHEDULER_HEADS - window


def test_pending_jobs_are_settled_in_one_pass(client, auth):
    parent = _submit(client, auth)
    children = [_submit(client, auth, depends_on=[str(parent)]) for _ in range(3)]
    assert all(_status(c) == JobStatus.PENDING for c in children)
    with session_scope() as s:
        stats = reconcile_once(s, get_settings())
    assert stats.promoted == 0 and all(_status(c) == JobStatus.PENDING for c in children)
    with session_scope() as s:
        s.execute(update(Job).where(Job.id == parent).values(status=JobStatus.SUCCEEDED))
    with session_scope() as s:
        stats = reconcile_once(s, get_settings())
    assert stats.promoted >= 3 and all(_status(c) == JobStatus.QUEUED for c in children)


def test_a_submission_wakes_the_dispatcher_without_waiting_for_the_poll(client, auth, monkeypatch):
    import time

    from services.scheduler.loop import run_scheduler

    monkeypatch.setattr(get_settings(), "SCHEDULER_INTERVAL_SECONDS", 30.0)  # polling cannot explain a fast dispatch
    monkeypatch.setattr(get_settings(), "QUEUE_WINDOW", 1000)
    stop = threading.Event()
    thread = threading.Thread(target=run_scheduler, args=(stop,), daemon=True)
    thread.start()
    try:
        time.sleep(1.5)  # first cycle done, listener connected
        started = time.monotonic()
        job_id = _submit(client, auth)
        localstack.wait_until(lambda: _status(job_id) == JobStatus.DISPATCHED, timeout=5, what="dispatch on notify",
                              interval=0.01)
        assert time.monotonic() - started < 5
    finally:
        stop.set()
        thread.join(timeout=10)
