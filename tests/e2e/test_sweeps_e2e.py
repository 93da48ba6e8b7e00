"""Sweeps through REST on real processes (api, scheduler, worker): an 8-trial random search with ASHA on a tiny
MSF job prunes trials (they checkpoint and end ``pruned``) and reports the best trial and its checkpoint, with an
MLflow parent run holding the trials' runs; a worker SIGKILLed in the middle of a trial loses no trial (the job is
retried from its checkpoint and the sweep waits for it). Plus the 422s and 404s of a bad sweep, which leave no rows.
"""

from __future__ import annotations

from typing import Any

import pytest
from mlflow import MlflowClient

from shared.config import get_settings
from tests.conftest import wait_for
from tests.e2e.conftest import processes_of_job, sigkill

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

# 2 steps per epoch with the micro ViT at 32 px: about 0.2 s per epoch on 2 cores, 4 MB checkpoints.
TINY: dict[str, Any] = {"kind": "ssl-train", "method": "msf", "experiment": "e2e-sweeps",
                        "dataset": "builtin://shapes", "limit_train": 64, "limit_test": 64,
                        "backbone": "vit_micro_p4", "proj_hidden_dim": 128, "proj_dim": 32, "batch_size": 32,
                        "bank_size": 64, "topk": 3, "knn_every": 0, "knn_k": [1], "epochs": 12}
ASHA: dict[str, Any] = {
    "name": "e2e-asha", "base": TINY, "max_trials": 8, "max_concurrency": 2,
    "search_space": {"lr": {"type": "float", "low": 0.001, "high": 0.1, "log": True}},
    "objective": {"metric": "epoch_loss", "direction": "minimise"},
    "sampler": {"type": "random", "seed": 7},
    "early_stopping": {"type": "asha", "min_resource": 1, "reduction_factor": 3}}


def _worker(platform: Any) -> Any:
    """A fresh worker (earlier ones stopped) that flushes events every 0.5 s, so a trial's epoch reaches the
    controller while the trial still runs."""
    from services.localstack import stop

    for name, proc in platform.procs.procs.items():
        if name.startswith("worker"):
            stop(proc, timeout=20)
    platform._workers += 1
    return platform.procs.start(f"worker{platform._workers}", "worker", "--kind", "ssl-trainer",
                                env={"CRUCIBLE_EVENT_FLUSH_SECONDS": "0.5"})


def _done(platform: Any, sweep_id: str, timeout: float) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        s = platform.http.get(f"/v1/sweeps/{sweep_id}").json()
        return s if s["status"] in ("succeeded", "failed", "cancelled") and all(
            t["state"] != "running" for t in s["trials"]) else None

    return wait_for(check, timeout=timeout, interval=1, what=f"sweep {sweep_id} to end",  # type: ignore[return-value]
                    on_timeout=platform.diagnostics)


def test_a_bad_sweep_is_a_422_naming_the_field_and_writes_nothing(platform):
    bad = {**ASHA, "search_space": {"lrr": {"type": "float", "low": 0.01, "high": 0.1}}}
    r = platform.http.post("/v1/sweeps", json=bad)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "search_space", "lrr"], r.text
    r = platform.http.post("/v1/sweeps", json={**ASHA, "base": {**TINY, "epochs": 0}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "base", "epochs"], r.text
    r = platform.http.post("/v1/sweeps", json={**ASHA, "base": {**TINY, "dataset": "no-such-dataset"}})
    assert r.status_code == 404 and r.json()["detail"][0]["loc"] == ["body", "base", "dataset"], r.text
    assert platform.http.get("/v1/sweeps").json() == []
    assert platform.http.get("/v1/jobs").json()["total"] == 0


def test_an_asha_sweep_of_eight_trials_prunes_and_reports_the_best(platform):
    _worker(platform)
    r = platform.http.post("/v1/sweeps", json=ASHA)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    s = _done(platform, sid, timeout=240)
    assert s["status"] == "succeeded", s
    trials = s["trials"]
    assert len(trials) == 8 and s["counts"]["failed"] == 0, trials
    pruned = [t for t in trials if t["state"] == "pruned"]
    complete = [t for t in trials if t["state"] == "complete"]
    assert pruned and complete, [(t["state"], t["last_step"]) for t in trials]
    for t in pruned:  # stopped early by ASHA, after checkpointing
        job = platform.job(t["job_id"])
        assert job["status"] == "pruned" and job["progress"] < 1.0 and t["last_step"] < TINY["epochs"], job
        assert "pruned by its sweep after checkpointing" in job["status_reason"]
        events = [e["type"] for e in platform.events(t["job_id"])]
        assert "prune_requested" in events and "checkpoint" in events
    best = min(complete, key=lambda t: t["value"])
    assert s["best"]["trial"] == best["number"] and s["best"]["value"] == pytest.approx(best["value"])
    assert s["best"]["params"] == best["params"] and s["best"]["job_id"] == best["job_id"]
    ckpts = platform.http.get("/v1/artifacts", params={"job_id": best["job_id"], "kind": "checkpoint"}).json()
    assert s["best"]["checkpoint"]["artifact_id"] in {c["id"] for c in ckpts}
    assert platform.job(best["job_id"])["spec"]["lr"] == pytest.approx(best["params"]["lr"])

    ml = MlflowClient(tracking_uri=get_settings().MLFLOW_TRACKING_URI)

    def linked() -> Any:
        v = platform.http.get(f"/v1/sweeps/{sid}").json()
        parent = v["mlflow_run_id"]
        if parent is None or ml.get_run(parent).info.status != "FINISHED":
            return None
        runs = {t["mlflow_run_id"] for t in v["trials"]}
        kids = {r for r in runs if r and ml.get_run(r).data.tags.get("mlflow.parentRunId") == parent}
        return parent if len(kids) == 8 else None

    parent = wait_for(linked, timeout=60, interval=1, what="the trials' runs linked to the sweep's parent run")
    run = ml.get_run(parent)  # type: ignore[arg-type]
    assert run.data.tags["crucible.sweep_id"] == sid and run.data.params["objective.metric"] == "epoch_loss"
    assert run.data.metrics["best_epoch_loss"] == pytest.approx(s["best"]["value"])
    child = ml.get_run(best["mlflow_run_id"])
    assert float(child.data.params["lr"]) == pytest.approx(best["params"]["lr"])  # MLflow's compare view

    out = _cli(platform, "sweep", "best", sid)
    assert f"best trial #{best['number']}" in out and s["best"]["checkpoint"]["uri"] in out
    assert "sweep" in _cli(platform, "sweep", "follow", sid, "--interval", "0.2")


def _cli(platform: Any, *args: str) -> str:
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    token = platform.http.headers["Authorization"].split()[1]
    r = subprocess.run([sys.executable, "-m", "services.cli.main", *args], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "CRUCIBLE_API_URL": platform.url, "CRUCIBLE_API_KEY": token}, timeout=60)
    assert r.returncode == 0 and "Traceback" not in r.stderr, (args, r.stdout, r.stderr)
    return r.stdout + r.stderr


def test_a_worker_killed_during_a_sweep_loses_no_trial(platform):
    worker = _worker(platform)
    body = {**ASHA, "name": "e2e-kill", "max_trials": 2, "max_concurrency": 1, "early_stopping": {"type": "none"},
            "base": {**TINY, "epochs": 40}, "sampler": {"type": "grid"},
            "search_space": {"lr": {"type": "categorical", "choices": [0.01, 0.05]}}}
    r = platform.http.post("/v1/sweeps", json=body)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]

    def first_job() -> str | None:
        t = platform.http.get(f"/v1/sweeps/{sid}").json()["trials"]
        return t[0]["job_id"] if t else None

    job_id = wait_for(first_job, timeout=60, what="the first trial's job")
    platform.wait_event(job_id, lambda e: e["type"] == "checkpoint", timeout=120, what="the trial's first checkpoint")
    sigkill(worker.pid)
    wait_for(lambda: not processes_of_job(job_id), timeout=15, what="the orphaned child to exit")
    _worker(platform)  # the reconciler re-queues the job once the lease expires; a fresh worker resumes it
    s = _done(platform, sid, timeout=240)
    assert s["status"] == "succeeded" and s["counts"] == {"running": 0, "complete": 2, "pruned": 0, "failed": 0}, s
    killed = next(t for t in s["trials"] if t["job_id"] == job_id)
    assert killed["attempt"] == 2 and killed["state"] == "complete" and killed["value"] is not None
    assert [e["attempt"] for e in platform.events(job_id, types=["resume"])] == [2]
