"""Pipelines through REST on the real stack (Postgres): validation that writes nothing, and every state
transition - early (pending) steps, fan-out over a run-time list, failure naming the step, retry of only what
failed, cancel, cache - with the jobs driven through the real lifecycle and reconciler (no workers here; the
e2e test runs a pipeline on real workers)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import func, select

from services.scheduler.reconciler import reconcile_once
from shared import lifecycle
from shared.config import get_settings
from shared.db import session_scope
from shared.models import ApiKey, Artifact, Job, JobEvent, JobStatus, Pipeline

pytestmark = pytest.mark.integration

TRAIN = {"kind": "ssl-train", "dataset": "builtin://shapes", "limit_train": 64, "batch_size": 32, "bank_size": 64,
         "epochs": 1}


def three_steps(**train: Any) -> dict[str, Any]:
    return {"name": "p3", "experiment": "pipes", "steps": {
        "train": {**TRAIN, **train},
        "evaluate": {"kind": "eval", "checkpoint": "${steps.train.checkpoint}", "protocols": ["knn"]},
        "each": {"kind": "eval", "foreach": "${steps.train.outputs.checkpoints}", "checkpoint": "${item}",
                 "protocols": ["knn"]},
    }}


def _counts(auth: dict[str, str]) -> tuple[int, int]:
    from services.projects.service import hash_key

    with session_scope() as s:
        pid = s.scalar(select(ApiKey.project_id).where(ApiKey.key_hash == hash_key(auth["Authorization"][7:])))
        return (s.scalar(select(func.count()).select_from(Pipeline).where(Pipeline.project_id == pid)) or 0,
                s.scalar(select(func.count()).select_from(Job).where(Job.project_id == pid)) or 0)


def _submit(client, auth, body) -> dict[str, Any]:
    r = client.post("/v1/pipelines", json=body, headers=auth)
    assert r.status_code == 201, r.json()
    return r.json()


def _get(client, auth, pid) -> dict[str, Any]:
    r = client.get(f"/v1/pipelines/{pid}", headers=auth)
    assert r.status_code == 200, r.json()
    return r.json()


def _step(p: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in p["steps"] if s["name"] == name)


def _tick() -> None:
    with session_scope() as s:
        reconcile_once(s, get_settings())


def _run(job_id: str, outcome: str = "succeeded", checkpoints: int = 0, outputs: dict[str, Any] | None = None,
         reason: str | None = None) -> list[str]:
    """Drive one attempt through the real lifecycle: claim, write checkpoints/outputs, finish."""
    jid = uuid.UUID(job_id)
    made = []
    with session_scope() as s:
        job = s.get(Job, jid)
        assert job is not None and job.status == JobStatus.QUEUED, (job_id, job and job.status)
        assert lifecycle.claim(s, job_id=jid, attempt=job.attempt, worker_id="test", lease_s=60) is not None
        for i in range(checkpoints):
            art = Artifact(project_id=job.project_id, kind="checkpoint", name=f"checkpoint-epoch{i}", bucket="b",
                           key=f"k/{uuid.uuid4()}", job_id=jid, attempt=job.attempt, meta={"epoch": i})
            s.add(art)
            s.flush()
            made.append(f"artifact:{art.id}")
        for k, v in (outputs or {}).items():  # what the supervisor's relay writes for an `output` event
            s.add(JobEvent(job_id=jid, attempt=job.attempt, type="output", data={"name": k, "value": v}))
        if outputs:
            job.outputs = {**(job.outputs or {}), **outputs}
        lifecycle.finish_attempt(s, job_id=jid, attempt=job.attempt, worker_id="test", outcome=outcome,
                                 reason=reason)
    return made


def _job(job_id: str) -> Job:
    with session_scope() as s:
        job = s.get(Job, uuid.UUID(job_id))
        assert job is not None
        return job


# --- validation --------------------------------------------------------------------------------------------
def test_bad_step_spec_is_422_naming_step_and_field_and_writes_nothing(client, auth):
    body = three_steps(epochs=0)
    r = client.post("/v1/pipelines", json=body, headers=auth)
    assert r.status_code == 422
    assert any(d["loc"] == ["body", "steps", "train", "epochs"] for d in r.json()["detail"]), r.json()
    assert _counts(auth) == (0, 0)


def test_cycle_is_422_naming_the_step_and_writes_nothing(client, auth):
    r = client.post("/v1/pipelines", headers=auth, json={"steps": {
        "a": {"kind": "eval", "checkpoint": "${steps.b.checkpoint}"},
        "b": {"kind": "eval", "checkpoint": "${steps.a.checkpoint}"}}})
    assert r.status_code == 422
    (d,) = r.json()["detail"]
    assert d["loc"][:2] == ["body", "steps"] and d["loc"][2] in ("a", "b") and d["loc"][3] == "checkpoint"
    assert "cycle" in d["msg"]
    assert _counts(auth) == (0, 0)


def test_a_step_refused_by_the_job_path_rolls_back_the_whole_pipeline(client, auth):
    body = three_steps()
    body["steps"]["evaluate"]["dataset"] = "no-such-dataset"  # evaluate is created at submit (pending)
    r = client.post("/v1/pipelines", json=body, headers=auth)
    assert r.status_code == 404, r.json()
    assert r.json()["detail"][0]["loc"] == ["body", "steps", "evaluate", "dataset"]
    assert _counts(auth) == (0, 0)  # the train job created before it was rolled back too


def test_templates_are_listed_and_instantiated(client, auth):
    names = {t["name"] for t in client.get("/v1/pipeline-templates", headers=auth).json()}
    assert "pretrain-eval" in names
    p = _submit(client, auth, {"template": "pretrain-eval", "params": {"epochs": 1, "limit_train": 64}})
    assert [s["name"] for s in p["steps"]] == ["train", "evaluate", "every-checkpoint"]
    assert p["params"]["epochs"] == 1 and p["template"] == "pretrain-eval"
    r = client.post("/v1/pipelines", json={"template": "pretrain-eval", "params": {"nope": 1}}, headers=auth)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "params", "nope"]
    r = client.post("/v1/pipelines", json={"template": "nope"}, headers=auth)
    assert r.status_code == 404 and "pretrain-eval" in r.json()["detail"][0]["msg"]


# --- state transitions ---------------------------------------------------------------------------------------
def test_fan_out_failure_names_the_step_and_retry_reruns_only_the_failed_item(client, auth):
    p = _submit(client, auth, three_steps())
    train, evaluate, each = (_step(p, n) for n in ("train", "evaluate", "each"))
    assert train["state"] == "running" and train["jobs"][0]["status"] == "queued"
    # evaluate only needs train's final checkpoint: it waits as a pending job that depends on train's job
    assert evaluate["state"] == "running" and evaluate["jobs"][0]["status"] == "pending"
    assert _job(evaluate["jobs"][0]["id"]).spec["checkpoint"] == f"job:{train['jobs'][0]['id']}"
    assert each["state"] == "waiting" and each["jobs"] == [] and "waiting for step 'train'" in each["reason"]

    ckpts = _run(train["jobs"][0]["id"], checkpoints=2)
    _tick()
    p = _get(client, auth, p["id"])
    each = _step(p, "each")
    assert each["items"] == ckpts and len(each["jobs"]) == 2  # K checkpoints -> K jobs
    assert [_job(j["id"]).spec["checkpoint"] for j in each["jobs"]] == ckpts
    assert _job(_step(p, "evaluate")["jobs"][0]["id"]).status == JobStatus.QUEUED

    first, second = (j["id"] for j in each["jobs"])
    _run(_step(p, "evaluate")["jobs"][0]["id"])
    _run(first)
    _run(second, outcome="user_error", reason="boom")
    _tick()
    p = _get(client, auth, p["id"])
    assert p["status"] == "failed" and "step 'each' failed" in p["status_reason"] and "boom" in p["status_reason"]

    r = client.post(f"/v1/pipelines/{p['id']}/retry", headers=auth)
    assert r.status_code == 202, r.json()
    p = r.json()
    assert p["status"] == "running" and p["retries"] == 1
    assert [j["id"] for j in _step(p, "train")["jobs"]] == [train["jobs"][0]["id"]]  # not re-run
    each_jobs = _step(p, "each")["jobs"]
    assert each_jobs[0]["id"] == first and each_jobs[1]["id"] != second and each_jobs[1]["status"] == "queued"
    _run(each_jobs[1]["id"])
    _tick()
    p = _get(client, auth, p["id"])
    assert p["status"] == "succeeded" and p["progress"] == 1.0
    assert client.post(f"/v1/pipelines/{p['id']}/retry", headers=auth).status_code == 409


def test_a_failed_first_step_fails_the_pipeline_and_retry_rebuilds_its_dependents(client, auth):
    p = _submit(client, auth, three_steps())
    train_job = _step(p, "train")["jobs"][0]["id"]
    _run(train_job, outcome="config_error", reason="dataset too small")
    _tick()  # the pending evaluate fails with its dependency; the fan-out step is never created
    _tick()
    p = _get(client, auth, p["id"])
    assert p["status"] == "failed" and p["status_reason"].startswith("step 'train' failed")
    assert _step(p, "each")["state"] == "skipped" and _step(p, "evaluate")["state"] == "failed"

    p = client.post(f"/v1/pipelines/{p['id']}/retry", headers=auth).json()
    new_train = _step(p, "train")["jobs"][0]["id"]
    new_eval = _step(p, "evaluate")["jobs"][0]["id"]
    assert new_train != train_job and _job(new_eval).spec["checkpoint"] == f"job:{new_train}"
    assert _step(p, "each")["state"] == "waiting"


def test_cancel_stops_running_and_pending_steps_and_unstarted_ones_never_start(client, auth):
    p = _submit(client, auth, three_steps())
    train_id = _step(p, "train")["jobs"][0]["id"]
    with session_scope() as s:
        job = s.get(Job, uuid.UUID(train_id))
        assert lifecycle.claim(s, job_id=job.id, attempt=1, worker_id="test", lease_s=60) is not None
    r = client.post(f"/v1/pipelines/{p['id']}/cancel", headers=auth)
    assert r.status_code == 202, r.json()
    p = r.json()
    assert p["status"] == "cancelled"
    assert _job(train_id).cancel_requested  # running: its supervisor stops it
    assert _step(p, "evaluate")["jobs"][0]["status"] == "cancelled" and _step(p, "each")["state"] == "cancelled"
    with session_scope() as s:  # the supervisor's view of the stop
        lifecycle.finish_attempt(s, job_id=uuid.UUID(train_id), attempt=1, worker_id="test", outcome="cancelled")
    _tick()
    p = _get(client, auth, p["id"])
    assert {s["state"] for s in p["steps"]} == {"cancelled"} and _step(p, "each")["jobs"] == []
    assert client.post(f"/v1/pipelines/{p['id']}/cancel", headers=auth).status_code == 409


def test_cache_reuses_an_identical_succeeded_step_and_its_outputs(client, auth):
    body = three_steps(seed=1234)
    body["steps"]["train"]["cache"] = True
    first = _submit(client, auth, body)
    train_id = _step(first, "train")["jobs"][0]["id"]
    _run(train_id, checkpoints=1)
    second = _submit(client, auth, body)
    train2 = _step(second, "train")
    assert train2["jobs"][0]["id"] == train_id and train2["jobs"][0]["cached"] and train2["state"] == "succeeded"
    _tick()
    second = _get(client, auth, second["id"])
    assert len(_step(second, "each")["jobs"]) == 1  # fanned out over the cached job's checkpoints
    body["steps"]["train"]["epochs"] = 2  # a different spec is a different key
    third = _submit(client, auth, body)
    assert _step(third, "train")["jobs"][0]["id"] != train_id and not _step(third, "train")["jobs"][0]["cached"]


def test_fan_out_over_a_parameter_list_and_a_declared_value_output(client, auth):
    p = _submit(client, auth, {"params": {"seeds": [1, 2, 3]}, "steps": {
        "train": {**TRAIN, "foreach": "${params.seeds}", "seed": "${item}"}}})
    jobs = _step(p, "train")["jobs"]
    assert [_job(j["id"]).spec["seed"] for j in jobs] == [1, 2, 3]
    assert [j["status"] for j in jobs] == ["queued"] * 3
