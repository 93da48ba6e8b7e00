"""Several schedulers on one sweep, on real Postgres: controller passes racing from many threads create each trial
once (one optuna trial, one row, one job per trial number), never exceed the concurrency or the budget."""

from __future__ import annotations

import threading
import uuid

import pytest
from sqlalchemy import func, select

from shared.db import session_scope
from shared.models import Job, JobStatus, Sweep, SweepTrial
from shared.specs.sweeps import SweepSpec

pytestmark = pytest.mark.integration

BASE = {"kind": "ssl-train", "method": "msf", "dataset": "builtin://shapes", "limit_train": 64, "limit_test": 64,
        "batch_size": 32, "bank_size": 64, "topk": 3, "epochs": 2, "knn_every": 0, "experiment": "sweep-race"}


def test_racing_controller_passes_create_each_trial_once(stack):
    import optuna

    from services.projects.service import create_key
    from services.sweeps import controller, service
    from services.sweeps import study as study_mod
    from shared import lifecycle

    with session_scope() as s:
        key, _ = create_key(session=s, project_name=f"sweep-race-{uuid.uuid4().hex[:6]}")
        pid = key.project_id
    with session_scope() as s:
        body = SweepSpec.model_validate({
            "base": BASE, "max_trials": 6, "max_concurrency": 3, "sampler": {"type": "tpe", "seed": 1},
            "search_space": {"lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}},
            "objective": {"metric": "epoch_loss", "direction": "minimize"}})
        sid = service.submit(session=s, project_id=pid, body=body).id

    def passes(n: int) -> None:
        for _ in range(n):
            with session_scope() as s:
                controller.advance(s, sid)

    def race() -> None:
        threads = [threading.Thread(target=passes, args=(4,)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)

    def counts() -> tuple[int, int, int]:
        with session_scope() as s:
            rows = s.scalar(select(func.count()).select_from(SweepTrial).where(SweepTrial.sweep_id == sid)) or 0
            numbers = s.scalar(select(func.count(func.distinct(SweepTrial.number)))
                               .where(SweepTrial.sweep_id == sid)) or 0
            jobs = s.scalar(select(func.count()).select_from(Job).where(Job.project_id == pid)) or 0
            return rows, numbers, jobs

    race()
    assert counts() == (3, 3, 3)  # max_concurrency, each trial once
    with session_scope() as s:  # end the running trials' jobs; the next passes fill up to the budget
        for i, job in enumerate(s.scalars(select(Job).where(Job.project_id == pid))):
            assert lifecycle.claim(s, job_id=job.id, attempt=1, worker_id="w", lease_s=60) is not None
            job.result = {"epoch_loss": 1.0 + i}
            lifecycle.terminate(s, job, JobStatus.SUCCEEDED, None)
    race()
    rows, numbers, jobs = counts()
    assert rows == numbers == jobs == 6
    with session_scope() as s:
        name = s.get_one(Sweep, sid).study_name
    trials = optuna.load_study(study_name=name, storage=study_mod.storage()).trials
    assert sorted(t.number for t in trials) == list(range(6))
    assert [t.state.name for t in sorted(trials, key=lambda t: t.number)][:3] == ["COMPLETE"] * 3
