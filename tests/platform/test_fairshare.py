"""Quotas, fair share, GPU pools and backfill in the dispatcher, against real Postgres (several schedulers at once)."""

from __future__ import annotations

import random
import threading
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from services.scheduler.dispatcher import dispatch_once
from shared import lifecycle
from shared.config import get_settings
from shared.db import session_scope
from shared.models import Job, JobStatus, utcnow
from tests.conftest import new_project_key
from tests.platform.test_scheduler import TINY, RecordingBroker, _only_these

pytestmark = pytest.mark.integration

POOL = "ssl-trainer.a100"


def _project():
    name, token = new_project_key("fs")
    return name, {"Authorization": f"Bearer {token}"}


def _submit(client, auth, gpus, **over):
    r = client.post("/v1/jobs", json={**TINY, "resources": {"gpus": gpus, "gpu_class": "a100"}, **over}, headers=auth)
    assert r.status_code == 201, r.json()
    return uuid.UUID(r.json()["id"])


def _set_quota(name, gpus=None, jobs=None):
    from typer.testing import CliRunner

    from services.cli.main import app

    args = ["admin", "set-quota", name] + (["--gpus", str(gpus)] if gpus is not None else []) + \
        (["--jobs", str(jobs)] if jobs is not None else [])
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    return out.output


@pytest.fixture
def pools(monkeypatch):
    s = get_settings()
    monkeypatch.setattr(s, "GPU_POOLS", {POOL: 8})
    monkeypatch.setattr(s, "RESERVE_AFTER_SECONDS", 3600.0)
    monkeypatch.setattr(s, "SCHEDULER_HEADS", 16)
    return s


def _active(project_name=None):
    """(GPUs, jobs) dispatched or running: of one project, or on the pool."""
    from shared.models import Project

    gpus = func.coalesce(func.sum(Job.spec["resources"]["gpus"].as_integer()), 0)
    stmt = select(gpus, func.count()).where(Job.status.in_([JobStatus.DISPATCHED, JobStatus.RUNNING]))
    if project_name is None:
        stmt = stmt.where(Job.pool == POOL)
    else:
        stmt = stmt.join(Project, Project.id == Job.project_id).where(Project.name == project_name)
    with session_scope() as s:
        return tuple(s.execute(stmt).one())


def test_quota_and_capacity_hold_with_concurrent_schedulers_and_nothing_is_sent_twice(client, pools):
    """Four schedulers dispatch at once while a fake worker pool claims and finishes jobs: the quota'd project
    never holds more than 3 GPUs / 2 jobs, the pool never more than 8 GPUs, and no attempt is published twice."""
    limited, auth_l = _project()
    free, auth_f = _project()
    assert "at most 3 GPUs, 2 jobs" in _set_quota(limited, gpus=3, jobs=2)
    ids = [_submit(client, auth_l, g) for g in (1, 2, 1, 1, 2, 1, 1, 1)]
    ids += [_submit(client, auth_f, g) for g in (2, 1, 4, 1, 2, 1, 1, 2)]
    _only_these(ids)
    broker = RecordingBroker()
    stop = threading.Event()
    errors: list[BaseException] = []
    busy = []

    def scheduler():
        try:
            while not stop.is_set():
                with session_scope() as s:
                    busy.append(dispatch_once(s, broker, pools).lock_busy)
        except BaseException as e:  # surfaced by the main thread
            errors.append(e)

    def workers():  # claim what was dispatched, finish a random running job now and then
        rnd = random.Random(7)
        try:
            while not stop.is_set():
                with session_scope() as s:
                    for jid, attempt in s.execute(select(Job.id, Job.attempt).where(
                            Job.id.in_(ids), Job.status == JobStatus.DISPATCHED)).all():
                        lifecycle.claim(s, job_id=jid, attempt=attempt, worker_id="w", lease_s=60)
                with session_scope() as s:
                    running = s.execute(select(Job.id, Job.attempt).where(
                        Job.id.in_(ids), Job.status == JobStatus.RUNNING)).all()
                    if running and rnd.random() < 0.5:
                        jid, attempt = rnd.choice(running)
                        lifecycle.finish_attempt(s, job_id=jid, attempt=attempt, worker_id="w",
                                                 outcome=lifecycle.SUCCEEDED)
                stop.wait(0.02)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=scheduler) for _ in range(4)] + [threading.Thread(target=workers)]
    for t in threads:
        t.start()
    try:
        deadline = utcnow() + timedelta(seconds=40)
        while utcnow() < deadline:
            g_l, j_l = _active(limited)
            g_p, _ = _active()
            assert g_l <= 3 and j_l <= 2 and g_p <= 8, (g_l, j_l, g_p)
            with session_scope() as s:
                left = s.scalar(select(func.count()).where(Job.id.in_(ids), Job.status != JobStatus.SUCCEEDED))
            if not left:
                break
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=20)
    assert not errors, errors
    assert not left, f"{left} jobs never finished"
    assert any(busy) and not all(busy)  # the schedulers did overlap: some cycles found the lock taken
    sent = [j for j, _ in broker.sent]
    assert len(sent) == len(set(sent)) == len(ids)  # every job once, none twice
    assert {q for _, q in broker.sent} == {"crucible.ssl-trainer.a100"}


def test_fair_share_prefers_the_project_that_used_fewer_gpus_lately(client, pools):
    heavy, auth_h = _project()
    light, auth_l = _project()
    past = _submit(client, auth_h, 8)  # heavy held 8 GPUs for three hours, until 5 minutes ago
    with session_scope() as s:
        now = utcnow()
        s.execute(update(Job).where(Job.id == past).values(status=JobStatus.SUCCEEDED, started_at=now - timedelta(
            minutes=185), finished_at=now - timedelta(minutes=5)))
    h = [_submit(client, auth_h, 2) for _ in range(3)]  # heavy submitted first: FIFO would run its jobs
    lt = [_submit(client, auth_l, 2) for _ in range(3)]
    _only_these([*h, *lt])
    with session_scope() as s:
        s.execute(update(Job).where(Job.pool == POOL, Job.status.in_([JobStatus.DISPATCHED, JobStatus.RUNNING]))
                  .values(status=JobStatus.CANCELLED))
    broker = RecordingBroker()
    with session_scope() as s:
        stats = dispatch_once(s, broker, pools)
    sent = [uuid.UUID(j) for j, _ in broker.sent]
    # 8 GPUs: all three of light's jobs (load 0, 2, 4) come before heavy's (load 6.6: its decayed usage)
    assert sent[:3] == lt and len(sent) == 4 and sent[3] == h[0], (sent, lt, h)
    assert stats.waiting == 2
    r = client.get(f"/v1/jobs/{h[1]}", headers=auth_h).json()
    assert r["status"] == "queued" and r["wait_reason"] == "no capacity for 2 GPUs of class a100"


def test_backfill_then_reservation_for_a_large_job(client, pools, monkeypatch):
    _, auth = _project()
    running = _submit(client, auth, 4)
    _only_these([running])
    with session_scope() as s:
        s.execute(update(Job).where(Job.pool == POOL, Job.status.in_([JobStatus.DISPATCHED, JobStatus.RUNNING]))
                  .values(status=JobStatus.CANCELLED))
    broker = RecordingBroker()
    with session_scope() as s:
        dispatch_once(s, broker, pools)
    big = _submit(client, auth, 8)
    small = _submit(client, auth, 2)
    _only_these([running, big, small])
    with session_scope() as s:
        dispatch_once(s, broker, pools)
    assert [uuid.UUID(j) for j, _ in broker.sent] == [running, small]  # the small one backfilled
    with session_scope() as s:
        assert s.get(Job, big).wait_reason == "no capacity for 8 GPUs of class a100"
    monkeypatch.setattr(pools, "RESERVE_AFTER_SECONDS", 0.0)
    later = _submit(client, auth, 1)
    _only_these([running, big, small, later])
    with session_scope() as s:
        dispatch_once(s, broker, pools)
    assert len(broker.sent) == 2  # 2 GPUs are free, but the pool drains for the big job now
    with session_scope() as s:
        assert "pool ssl-trainer.a100 is reserved for it" in s.get(Job, big).wait_reason
        assert s.get(Job, later).wait_reason.startswith("no capacity for 1 GPUs")


def test_waiting_reasons_through_the_api_and_cli(client, pools):
    from typer.testing import CliRunner

    from services.cli.main import app

    name, auth = _project()
    _set_quota(name, gpus=2)
    first = _submit(client, auth, 2)
    second = _submit(client, auth, 1)
    child = _submit(client, auth, 1, depends_on=[str(first)])
    _only_these([first, second])
    with session_scope() as s:
        dispatch_once(s, RecordingBroker(), pools)
    r = client.get(f"/v1/jobs/{second}", headers=auth).json()
    assert r["wait_reason"] == f"quota: project {name} uses 2/2 GPUs (this job needs 1)"
    assert client.get(f"/v1/jobs/{child}", headers=auth).json()["wait_reason"] == f"waiting for job {first}"
    assert client.get(f"/v1/jobs/{first}", headers=auth).json()["wait_reason"] is None
    listed = {j["id"]: j["wait_reason"] for j in client.get("/v1/jobs", headers=auth).json()["items"]}
    assert listed[str(second)].startswith("quota:")
    out = CliRunner().invoke(app, ["admin", "quotas"])
    assert f"{name}  gpus=2  jobs=-" in out.output
    assert "no limits" in _set_quota(name)


def test_preemption_stops_a_lower_priority_job_which_requeues_without_spending_its_budget(client, pools,
                                                                                       monkeypatch):
    _, auth = _project()
    low = _submit(client, auth, 8, priority=-5)
    _only_these([low])
    with session_scope() as s:
        s.execute(update(Job).where(Job.pool == POOL, Job.status.in_([JobStatus.DISPATCHED, JobStatus.RUNNING]))
                  .values(status=JobStatus.CANCELLED))
    broker = RecordingBroker()
    with session_scope() as s:
        dispatch_once(s, broker, pools)
    with session_scope() as s:
        assert lifecycle.claim(s, job_id=low, attempt=1, worker_id="w", lease_s=60) is not None
    urgent = _submit(client, auth, 4, priority=50)
    _only_these([low, urgent])
    with session_scope() as s:
        dispatch_once(s, broker, pools)  # preemption is off: the urgent job just waits
    with session_scope() as s:
        assert not s.get(Job, low).preempt_requested
    monkeypatch.setattr(pools, "PREEMPTION", True)
    with session_scope() as s:
        assert dispatch_once(s, broker, pools).preempted == 1
    with session_scope() as s:  # the supervisor learns it from its lease renewal
        state = lifecycle.renew_lease(s, job_id=low, attempt=1, worker_id="w", lease_s=60)
        assert state.held and state.preempt_requested and not state.cancel_requested
        assert "preempting lower-priority jobs" in s.get(Job, urgent).wait_reason
    with session_scope() as s:  # ... stops the method (SIGTERM → checkpoint → exit 75) and reports it
        assert lifecycle.finish_attempt(s, job_id=low, attempt=1, worker_id="w", outcome=lifecycle.PREEMPTED,
                                        reason="preempted (the scheduler needs its GPUs) after checkpointing"
                                        ) == JobStatus.QUEUED
    with session_scope() as s:
        j = s.get(Job, low)
        assert (j.attempt, j.infra_failures, j.preempt_requested) == (2, 0, False)
    with session_scope() as s:
        dispatch_once(s, broker, pools)
    assert uuid.UUID(broker.sent[-1][0]) == urgent and [uuid.UUID(j) for j, _ in broker.sent].count(low) == 1
