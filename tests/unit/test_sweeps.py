"""Sweeps without servers: the search space's validation (422 naming the field) and its mapping onto optuna, and the
controller's whole trial lifecycle on the embedded SQLite database (optuna's study in the same file): trials asked
and submitted within the budget and the concurrency, intermediate values reported, ASHA pruning through the job's
stop flag, a retried job waited for, an asked-but-unrecorded optuna trial adopted, the best trial and the webhook."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from services.sweeps import space
from shared.specs.sweeps import SweepSpec

BASE: dict[str, Any] = {"kind": "ssl-train", "method": "msf", "dataset": "builtin://shapes", "limit_train": 64,
                        "limit_test": 64, "batch_size": 32, "bank_size": 64, "topk": 3, "epochs": 3, "knn_every": 0}


def sweep(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"base": dict(BASE), "max_trials": 4, "max_concurrency": 2,
                            "search_space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}},
                            "objective": {"metric": "epoch_loss", "direction": "minimise"}}
    return {**body, **over}


def problems(body: dict[str, Any]) -> list[tuple[list[Any], str]]:
    with pytest.raises(space.SweepInvalid) as e:
        space.check(SweepSpec.model_validate(body))
    return e.value.problems


# --- search space -> optuna ---------------------------------------------------------------------------------
def test_search_space_maps_onto_optuna_distributions():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    spec = SweepSpec.model_validate(sweep(search_space={
        "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
        "weight_decay": {"type": "float", "low": 0.0, "high": 0.001, "step": 0.0005},
        "epochs": {"type": "int", "low": 1, "high": 5, "step": 2},
        "augmentation": {"type": "categorical", "choices": ["weak/strong", "strong/strong"]}}))
    d = space.distributions(spec)
    assert d["lr"] == FloatDistribution(1e-4, 1e-1, log=True)
    assert d["weight_decay"] == FloatDistribution(0.0, 0.001, step=0.0005)
    assert d["epochs"] == IntDistribution(1, 5, step=2)
    assert d["augmentation"] == CategoricalDistribution(["weak/strong", "strong/strong"])
    assert spec.objective.direction == "minimize"  # the British spelling is accepted
    assert space.check(spec) == ("ssl-train", 4)
    grid, _ = space.grid_space(spec)
    assert grid["epochs"] == [1, 3, 5] and grid["weight_decay"] == [0.0, 0.0005, 0.001]


def test_trial_params_are_set_at_their_dotted_paths():
    out = space.apply(BASE, {"lr": 0.01, "augment.hflip": False})
    assert out["lr"] == 0.01 and out["augment"] == {"hflip": False} and "augment" not in BASE


def test_ranges_are_checked_by_the_model():
    for param, needle in (({"type": "float", "low": 0.1, "high": 0.01}, "below high"),
                          ({"type": "float", "low": 0.0, "high": 1.0, "log": True}, "low > 0"),
                          ({"type": "int", "low": 1, "high": 8, "log": True, "step": 2}, "cannot be combined"),
                          ({"type": "categorical", "choices": []}, "at least 1")):
        with pytest.raises(ValidationError) as e:
            SweepSpec.model_validate(sweep(search_space={"lr": param}))
        err = e.value.errors()[0]
        assert err["loc"][:2] == ("search_space", "lr") and needle in err["msg"], err


def test_unknown_path_is_a_422_naming_the_path_and_the_fields():
    (loc, msg), = problems(sweep(search_space={"lrr": {"type": "float", "low": 0.1, "high": 0.2},
                                               "lr": {"type": "float", "low": 0.01, "high": 0.1}}))
    assert loc == ["body", "search_space", "lrr"]
    assert "has no field 'lrr'" in msg and "lr" in msg
    (loc, msg), = problems(sweep(search_space={"lr.x": {"type": "float", "low": 0.1, "high": 0.2}}))
    assert loc == ["body", "search_space", "lr.x"] and "is a value" in msg


def test_a_range_the_field_refuses_is_a_422_naming_the_search_path_and_the_field():
    (loc, msg), = problems(sweep(search_space={"epochs": {"type": "int", "low": 1, "high": 10**6}}))
    assert loc == ["body", "search_space", "epochs"] and "base.epochs" in msg and "1000000" in msg
    (loc, msg), = problems(sweep(search_space={"method": {"type": "categorical", "choices": ["msf", "nope"]}}))
    assert loc == ["body", "search_space", "method"] and "'nope'" in msg


def test_a_bad_base_spec_is_a_422_at_base_field():
    (loc, msg), = problems(sweep(base={**BASE, "epochs": 0}))
    assert loc == ["body", "base", "epochs"]
    with pytest.raises(Exception) as e:
        space.check(SweepSpec.model_validate(sweep(base={**BASE, "kind": "nope"})))
    assert getattr(e.value, "loc", None) == ["body", "base", "kind"]


def test_grid_needs_discrete_values_and_caps_the_budget():
    (loc, msg), = problems(sweep(sampler={"type": "grid"}))
    assert loc == ["body", "search_space", "lr"] and "grid" in msg
    spec = SweepSpec.model_validate(sweep(sampler={"type": "grid"}, max_trials=50, search_space={
        "lr": {"type": "categorical", "choices": [0.01, 0.05]}, "epochs": {"type": "int", "low": 1, "high": 3}}))
    assert space.check(spec) == ("ssl-train", 6)


# --- the controller on SQLite ----------------------------------------------------------------------------------
@pytest.fixture
def embedded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[uuid.UUID]:
    from services.sweeps import study
    from shared.config import reset_settings
    from shared.db import dispose_engine, session_scope, upgrade_to_head
    from shared.models import Project

    monkeypatch.setenv("CRUCIBLE_HOME", str(tmp_path))
    monkeypatch.setenv("CRUCIBLE_DATABASE_URL", f"sqlite:///{tmp_path / 'embedded.db'}")
    reset_settings()
    dispose_engine()
    study.reset()
    upgrade_to_head()
    with session_scope() as s:
        project = Project(name=f"sweeps-{uuid.uuid4().hex[:6]}")
        s.add(project)
        s.flush()
        pid = project.id
    try:
        yield pid
    finally:
        study.reset()
        dispose_engine()
        monkeypatch.undo()
        reset_settings()


def _run(job_id: uuid.UUID, worker: str = "w1") -> int:
    """Claim the job as a worker would (its current attempt); returns the attempt."""
    from shared import lifecycle
    from shared.db import session_scope
    from shared.models import Job

    with session_scope() as s:
        job = s.get_one(Job, job_id)
        attempt = job.attempt
        assert lifecycle.claim(s, job_id=job_id, attempt=attempt, worker_id=worker, lease_s=60) is not None
    return attempt


def _metric(job_id: uuid.UUID, epoch: int, loss: float) -> None:
    from shared import lifecycle
    from shared.db import session_scope
    from shared.models import Job

    with session_scope() as s:
        job = s.get_one(Job, job_id)
        lifecycle.add_event(s, job_id, job.attempt, "metrics", step=epoch * 2,
                            values={"epoch_loss": loss, "epoch": epoch})


def _finish(job_id: uuid.UUID, outcome: str, worker: str = "w1") -> str:
    from shared import lifecycle
    from shared.db import session_scope
    from shared.models import Job

    with session_scope() as s:
        job = s.get_one(Job, job_id)
        status = lifecycle.finish_attempt(s, job_id=job_id, attempt=job.attempt, worker_id=worker, outcome=outcome)
        assert status is not None
        return status.value


def _view(project_id: uuid.UUID, sweep_id: uuid.UUID) -> dict[str, Any]:
    from services.sweeps import service
    from shared.db import session_scope

    with session_scope() as s:
        return service.view(session=s, sweep=service.get(session=s, project_id=project_id, sweep_id=sweep_id)
                            ).model_dump(mode="json")


def test_controller_runs_a_sweep_with_asha_pruning_retries_and_a_best_trial(embedded):
    from services.sweeps import controller, service
    from services.sweeps import study as study_mod
    from services.webhooks.schemas import WebhookCreate
    from services.webhooks.service import create as create_webhook
    from shared.db import session_scope
    from shared.models import Job, JobEvent, WebhookDelivery

    pid = embedded
    with session_scope() as s:
        create_webhook(session=s, project_id=pid, body=WebhookCreate(url="http://127.0.0.1:9/hook"))
    with session_scope() as s:
        body = SweepSpec.model_validate(sweep(sampler={"type": "random", "seed": 3},
                                              early_stopping={"type": "asha", "reduction_factor": 2}))
        sid = service.submit(session=s, project_id=pid, body=body).id
        s.flush()
        assert s.query(Job).count() == 0  # the dry run of the base job left nothing behind

    controller.advance_all()
    v = _view(pid, sid)
    assert [t["state"] for t in v["trials"]] == ["running", "running"]  # max_concurrency
    a, b = (uuid.UUID(t["job_id"]) for t in v["trials"])
    with session_scope() as s:
        jobs = [s.get_one(Job, a), s.get_one(Job, b)]
        assert all(j.status.value == "queued" and j.spec["tags"]["crucible.sweep"] == str(sid) for j in jobs)
        assert jobs[0].spec["lr"] == v["trials"][0]["params"]["lr"] != jobs[1].spec["lr"]

    # epoch 1: a is better; at ASHA's first rung (epoch 1, reduction factor 2) b is stopped
    _run(a), _run(b)
    _metric(a, 1, 1.0)
    controller.advance_all()
    _metric(b, 1, 2.0)
    controller.advance_all()
    with session_scope() as s:
        jb = s.get_one(Job, b)
        assert jb.cancel_requested and jb.stop_reason == "pruned" and jb.status.value == "running"
        assert s.query(JobEvent).filter_by(job_id=b, type="prune_requested").count() == 1
        assert not s.get_one(Job, a).cancel_requested
    assert _finish(b, "pruned") == "pruned"  # what the supervisor reports after the stop's checkpoint

    # a's worker is lost mid-trial: the job is retried (attempt 2) and the trial waits for it
    assert _finish(a, "infra_error") == "queued"
    controller.advance_all()
    v = _view(pid, sid)
    assert [t["state"] for t in v["trials"][:2]] == ["running", "pruned"] and len(v["trials"]) == 3
    assert _run(a, "w2") == 2
    _metric(a, 2, 0.5)
    _metric(a, 3, 0.25)
    assert _finish(a, "succeeded", "w2") == "succeeded"

    # a pass that died after optuna's ask (before our rows were written): the next pass adopts that trial
    with session_scope() as s:
        name = s.get_one(service.Sweep, sid).study_name
    orphan = study_mod.load(name, body).ask(fixed_distributions=space.distributions(body))
    controller.advance_all()
    v = _view(pid, sid)
    assert [t["number"] for t in v["trials"]] == [0, 1, 2, 3] and v["trials"][3]["params"] == orphan.params
    assert v["trials"][0]["state"] == "complete" and v["trials"][0]["value"] == 0.25
    assert v["best"]["trial"] == 0 and v["best"]["value"] == 0.25 and v["best"]["job_id"] == str(a)

    for t in v["trials"][2:]:
        job = uuid.UUID(t["job_id"])
        _run(job)
        _metric(job, 1, 0.9)  # not worse than a at the first rung: promoted
        controller.advance_all()
        _metric(job, 2, 0.1 if t["number"] == 3 else 0.6)
        _finish(job, "succeeded")
    controller.advance_all()
    controller.advance_all()  # idempotent: nothing more happens
    v = _view(pid, sid)
    assert v["status"] == "succeeded" and v["counts"] == {"running": 0, "complete": 3, "pruned": 1, "failed": 0}
    assert v["best"]["trial"] == 3 and v["best"]["value"] == 0.1 and len(v["trials"]) == 4
    import optuna

    st = optuna.load_study(study_name=name, storage=study_mod.storage())
    assert [t.state.name for t in st.trials] == ["COMPLETE", "PRUNED", "COMPLETE", "COMPLETE"]
    assert st.best_trial.number == 3 and st.trials[0].intermediate_values == {1: 1.0, 2: 0.5, 3: 0.25}
    with session_scope() as s:
        assert s.get_one(service.Sweep, sid).settled
        assert [d.event for d in s.query(WebhookDelivery).all()].count("sweep.succeeded") == 1
        assert [d.event for d in s.query(WebhookDelivery).all()].count("job.pruned") == 1


def test_cancelling_a_sweep_cancels_its_trials_and_settles(embedded):
    from services.errors import Conflict
    from services.sweeps import controller, service
    from shared.db import session_scope

    pid = embedded
    with session_scope() as s:
        sid = service.submit(session=s, project_id=pid, body=SweepSpec.model_validate(sweep())).id
    controller.advance_all()
    running = uuid.UUID(_view(pid, sid)["trials"][0]["job_id"])
    _run(running)
    with session_scope() as s:
        service.cancel(session=s, project_id=pid, sweep_id=sid)
    with session_scope() as s, pytest.raises(Conflict):
        service.cancel(session=s, project_id=pid, sweep_id=sid)
    controller.advance_all()
    v = _view(pid, sid)
    assert v["status"] == "cancelled" and len(v["trials"]) == 2  # no new trials
    assert [t["job_status"] for t in v["trials"]] == ["running", "cancelled"]
    assert _finish(running, "cancelled") == "cancelled"
    controller.advance_all()
    v = _view(pid, sid)
    assert [t["state"] for t in v["trials"]] == ["failed", "failed"]
    with session_scope() as s:
        assert s.get_one(service.Sweep, sid).settled


def test_the_example_sweeps_are_valid():
    import yaml

    files = sorted((Path(__file__).resolve().parents[2] / "shared" / "specs" / "sweeps").glob("*.yaml"))
    assert files
    for f in files:
        spec = SweepSpec.model_validate(yaml.safe_load(f.read_text()))
        kind, budget = space.check(spec)
        assert kind == spec.base["kind"] and budget == spec.max_trials, f


# --- the pruned outcome ----------------------------------------------------------------------------------------
def test_a_pruned_running_job_gets_the_cooperative_stop_and_ends_pruned_not_cancelled_or_retried():
    from types import SimpleNamespace

    from shared import lifecycle
    from shared.models import Job, JobStatus
    from workers.runtime.protocol import EXIT_OK, EXIT_PREEMPTED
    from workers.runtime.supervisor import classify

    added: list[Any] = []
    session = SimpleNamespace(add=added.append)
    job = Job(id=uuid.uuid4(), attempt=1, status=JobStatus.RUNNING, project_id=uuid.uuid4())
    assert lifecycle.prune(session, job, reason="asha") == JobStatus.RUNNING  # type: ignore[arg-type]
    assert job.cancel_requested and job.stop_reason == lifecycle.PRUNE
    assert [e.type for e in added] == ["prune_requested"]
    # the supervisor's stop (SIGTERM -> checkpoint -> exit 75) is classified as pruned, not preempted/cancelled
    outcome, reason = classify(EXIT_PREEMPTED, "pruned", 100, [])
    assert outcome == lifecycle.Outcome.PRUNED and "after checkpointing" in (reason or "")
    assert classify(EXIT_OK, "pruned", 100, [])[0] == lifecycle.SUCCEEDED  # finished before the stop landed
    assert classify(-9, "pruned", 100, [])[0] == lifecycle.Outcome.PRUNED
    assert lifecycle.can_transition(JobStatus.QUEUED, JobStatus.PRUNED) and JobStatus.PRUNED.terminal


def test_follow_renders_one_line_per_trial_with_its_progress():
    from services.cli.sweeps import render

    s = {"name": "x", "status": "running", "progress": 0.5, "max_trials": 3, "objective": {"metric": "loss"},
         "counts": {"running": 1, "complete": 1, "pruned": 1, "failed": 0},
         "best": {"trial": 0, "value": 0.25},
         "trials": [{"number": 0, "state": "complete", "params": {"lr": 0.01}, "value": 0.25, "last_value": 0.3,
                     "last_step": 3, "attempt": 1, "progress": 1.0},
                    {"number": 1, "state": "pruned", "params": {"lr": 0.1}, "value": None, "last_value": 0.9,
                     "last_step": 1, "attempt": 1, "progress": 1.0},
                    {"number": 2, "state": "running", "params": {"lr": 0.05}, "value": None, "last_value": None,
                     "last_step": None, "attempt": 2, "progress": 0.4}]}
    lines = render(s)
    assert lines[0] == ("sweep x [running] 1 complete, 1 pruned, 0 failed of 3, best #0 0.25", 0.5)
    assert lines[1] == ("  #0 [complete] lr=0.01 loss=0.25", 1.0)
    assert lines[2] == ("  #1 [pruned] lr=0.1 loss=0.9 @1", 1.0)
    assert lines[3] == ("  #2 [running] (attempt 2) lr=0.05", 0.4)
