"""The admission planner (services/scheduler/admission.py) and the fair-share math, on in-memory snapshots."""

from __future__ import annotations

import math

import pytest

from services.scheduler.admission import FIFO, Active, Candidate, Policy, Pool, Quota, Snapshot, plan
from services.scheduler.fairshare import DecayedLedger, decayed_gpu_seconds, usage_by_project

A100 = Pool("ssl-trainer", "a100", 8)
H100 = Pool("ssl-trainer", "h100", 4)


def job(jid, project="p", gpus=1, cls="any", prio=0, at=0.0, kind="ssl-trainer"):
    return Candidate(job_id=jid, project=project, worker_kind=kind, priority=prio, queued_at=at, gpus=gpus,
                     gpu_class=cls, seq=hash(jid) % 1000)


def started(p):
    return [c.job_id for c, _ in p.dispatch]


def test_decay_integral_matches_a_riemann_sum():
    h, now = 600.0, 5000.0
    exact = decayed_gpu_seconds(4, 1000.0, 3000.0, now, h)
    dt = 0.5
    riemann = sum(4 * 2 ** (-(now - (1000.0 + (i + 0.5) * dt)) / h) * dt for i in range(int(2000 / dt)))
    assert exact == pytest.approx(riemann, rel=1e-6)
    assert decayed_gpu_seconds(4, 1000.0, None, 1000.0 + h, h) == pytest.approx(4 * h / math.log(2) * 0.5)


def test_ledger_equals_the_batch_sum():
    h = 300.0
    allocs = [("a", 2, 0.0, 100.0), ("a", 1, 50.0, 400.0), ("b", 8, 10.0, 20.0), ("a", 4, 390.0, 395.0)]
    ledger = DecayedLedger(h)
    for p, g, s, e in allocs:
        ledger.add(p, g, s, e)
    batch = usage_by_project(allocs, 1000.0, h)
    assert ledger.value("a", 1000.0) == pytest.approx(batch["a"])
    assert ledger.value("b", 1000.0) == pytest.approx(batch["b"])


def test_priority_first_then_the_least_loaded_project_then_age():
    snap = Snapshot(now=100.0, pools=[A100], usage={"heavy": 3600.0 * 8},  # ~8 GPUs held for the last hour
                    candidates=[job("h1", "heavy", at=1), job("h2", "heavy", at=2), job("l1", "light", at=5),
                                job("l2", "light", at=6), job("urgent", "heavy", prio=5, at=9)])
    assert started(plan(snap, Policy(reserve_after_s=1e9)))[:3] == ["urgent", "l1", "l2"]
    assert started(plan(snap, FIFO))[:3] == ["urgent", "h1", "h2"]


def test_projects_interleave_by_load_within_one_plan():
    cands = [job(f"a{i}", "a", at=i) for i in range(6)] + [job(f"b{i}", "b", at=10 + i) for i in range(6)]
    p = plan(Snapshot(now=100.0, pools=[Pool("ssl-trainer", "a100", 6)], candidates=cands), Policy(reserve_after_s=1e9))
    assert sorted(started(p)) == ["a0", "a1", "a2", "b0", "b1", "b2"]


def test_gpu_class_and_capacity_admission_with_backfill():
    busy = [Active("r1", "x", "ssl-trainer", gpus=6, pool="ssl-trainer.a100")]
    cands = [job("big", gpus=4, cls="a100", at=1), job("small", gpus=2, cls="a100", at=2),
             job("h", gpus=4, cls="h100", at=3), job("toolarge", gpus=16, at=4), job("nocls", gpus=1, cls="v100", at=5)]
    p = plan(Snapshot(now=10.0, pools=[A100, H100], active=busy, candidates=cands), Policy(reserve_after_s=1e9))
    assert {c.job_id: pool for c, pool in p.dispatch} == {"small": "ssl-trainer.a100", "h": "ssl-trainer.h100"}
    assert p.waiting["big"] == "no capacity for 4 GPUs of class a100"
    assert "no pool large enough for 16 GPUs" in p.waiting["toolarge"]
    assert "no pool for 1 GPUs of class v100" in p.waiting["nocls"]
    fifo = plan(Snapshot(now=10.0, pools=[A100, H100], active=busy, candidates=cands), FIFO)
    assert "small" not in started(fifo) and "h" in started(fifo)  # head-of-line blocking on a100 only


def test_an_aged_job_reserves_its_pool_so_it_is_not_starved():
    busy = [Active("r1", "x", "ssl-trainer", gpus=6, pool="ssl-trainer.a100")]
    cands = [job("big", "p", gpus=4, cls="a100", at=0.0), job("small", "q", gpus=1, cls="a100", at=50.0)]
    young = plan(Snapshot(now=60.0, pools=[A100], active=busy, candidates=cands), Policy(reserve_after_s=100))
    assert started(young) == ["small"]
    old = plan(Snapshot(now=200.0, pools=[A100], active=busy, candidates=cands), Policy(reserve_after_s=100))
    assert started(old) == [] and old.reserved == {"ssl-trainer.a100": "big"}
    assert "reserved for it" in old.waiting["big"] and old.waiting["small"].startswith("no capacity")


def test_quotas_bound_gpus_and_jobs_per_project():
    busy = [Active("r1", "p", "ssl-trainer", gpus=3, pool="ssl-trainer.a100")]
    cands = [job("a", "p", gpus=2, at=1), job("b", "p", gpus=1, at=2), job("c", "p", gpus=0, at=3),
             job("d", "p", gpus=0, at=4)]
    p = plan(Snapshot(now=10.0, pools=[A100], active=busy, candidates=cands, window={"ssl-trainer": 5},
                      quotas={"p": Quota(max_gpus=4, max_jobs=3)}, names={"p": "vision"}), Policy())
    assert started(p) == ["b", "c"]
    assert p.waiting["a"] == "quota: project vision uses 3/4 GPUs (this job needs 2)"
    assert p.waiting["d"] == "quota: project vision runs 3/3 jobs"


def test_plain_queue_window_for_jobs_without_gpus():
    cands = [job(f"c{i}", gpus=0, at=i) for i in range(4)]
    busy = [Active("d", "p", "ssl-trainer", dispatched=True)]
    p = plan(Snapshot(now=10.0, candidates=cands, active=busy, window={"ssl-trainer": 3}), Policy())
    assert started(p) == ["c0", "c1"] and "queue window full" in p.waiting["c2"]


def test_preemption_stops_the_cheapest_lower_priority_jobs():
    busy = [Active("old", "x", "ssl-trainer", gpus=4, pool="ssl-trainer.a100", priority=0, started_at=0.0),
            Active("new", "x", "ssl-trainer", gpus=4, pool="ssl-trainer.a100", priority=0, started_at=50.0),
            Active("vip", "y", "ssl-trainer", gpus=4, pool="ssl-trainer.h100", priority=9, started_at=1.0)]
    cands = [job("urgent", "z", gpus=4, prio=5, at=90.0)]
    snap = Snapshot(now=100.0, pools=[A100, H100], active=busy, candidates=cands)
    assert plan(snap, Policy()).preempt == []
    p = plan(snap, Policy(preemption=True))
    assert p.preempt == ["new"] and p.reserved == {"ssl-trainer.a100": "urgent"} and started(p) == []
    stopping = [*busy[:1], Active("new", "x", "ssl-trainer", gpus=4, pool="ssl-trainer.a100", preempting=True),
                busy[2]]
    again = plan(Snapshot(now=101.0, pools=[A100, H100], active=stopping, candidates=cands), Policy(preemption=True))
    assert again.preempt == []  # the stopping job frees enough: nobody else is stopped


def test_pools_have_their_own_queues_and_are_validated(monkeypatch):
    from shared.celery_app import make_celery
    from shared.config import Settings
    from workers.worker import queues_for

    s = Settings(GPU_POOLS={"ssl-trainer.a100": 8})
    assert "crucible.ssl-trainer.a100" in make_celery(s).amqp.queues
    monkeypatch.setenv("CRUCIBLE_WORKER_GPU_CLASS", "a100")
    assert queues_for({"ssl-trainer"}) == ["crucible.ssl-trainer.a100"]
    for bad in ({"ssl-trainer": 8}, {"ssl-trainer.any": 8}, {"ssl-trainer.A100": 8}, {"ssl-trainer.a100": 0}):
        with pytest.raises(ValueError, match="pool"):
            Settings(GPU_POOLS=bad)
    from services.scheduler.snapshot import pool_queue, pools_from_settings

    with pytest.raises(ValueError, match="known kinds"):
        pools_from_settings(Settings(GPU_POOLS={"nope.a100": 8}))
    assert pool_queue("ssl-trainer.h100") == "crucible.ssl-trainer.h100"
