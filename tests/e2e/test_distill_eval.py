"""Distillation and evaluation through the whole platform with real processes: MSF teachers → SimReg (two
teachers) and CompRess students → an eval job on the student, chained only by ``job:<id>`` references
(implicit dependencies); checkpoints in S3, lineage to the teachers, metrics in MLflow (the eval's numbers
also in the student's run). Plus: a SIGKILLed worker resumes a distill job and an eval job from their
checkpoints."""

from __future__ import annotations

from typing import Any

import pytest
from mlflow import MlflowClient

from shared.config import get_settings
from shared.storage import ObjectStore
from tests.conftest import wait_for
from tests.e2e.conftest import TERMINAL, processes_of_job, sigkill

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

# Tiny on purpose: 4 steps per epoch at 32 px.
TINY: dict[str, Any] = {"experiment": "e2e-distill", "dataset": "builtin://shapes", "limit_train": 128,
                        "limit_test": 200, "backbone": "resnet18", "stem": "imagenet", "batch_size": 32,
                        "knn_k": [1, 20]}
MSF: dict[str, Any] = {"kind": "ssl-train", "method": "msf", **TINY, "bank_size": 64, "topk": 3, "epochs": 1}


def _mlflow() -> MlflowClient:
    return MlflowClient(tracking_uri=get_settings().MLFLOW_TRACKING_URI)


def _checkpoints(platform: Any, job_id: str) -> list[dict[str, Any]]:
    return platform.http.get("/v1/artifacts", params={"job_id": job_id, "kind": "checkpoint"}).json()


def _final_checkpoint(platform: Any, job_id: str) -> dict[str, Any]:
    return next(c for c in _checkpoints(platform, job_id) if c["meta"].get("final"))


def _succeeded(platform: Any, job_id: str, timeout: float) -> dict[str, Any]:
    job = platform.wait_status(job_id, TERMINAL, timeout=timeout)
    assert job["status"] == "succeeded", platform.diagnostics(job_id)
    return job


@pytest.fixture(scope="module")
def teachers(platform: Any) -> list[str]:
    """Two MSF teacher jobs, submitted (not awaited): consumers wait for them through their job:<id> inputs."""
    return [platform.submit({**MSF, "name": f"e2e-teacher-{i}", "seed": i})["id"] for i in range(2)]


def test_teachers_students_and_evaluation_chain_through_job_references(platform, teachers):
    platform.start_worker("all")
    # Submitted right away: each job:<id> input makes the job wait for that job (an implicit dependency).
    simreg = platform.submit({"kind": "distill", "method": "simreg", **TINY, "teachers": [f"job:{t}" for t in teachers],
                              "epochs": 1, "name": "e2e-simreg"})
    compress = platform.submit({"kind": "distill", "method": "compress", **TINY, "teachers": [f"job:{teachers[0]}"],
                                "bank_size": 64, "compress": {"variant": "2q"}, "epochs": 1, "name": "e2e-compress"})
    evaluation = platform.submit({"kind": "eval", "experiment": "e2e-distill", "checkpoint": f"job:{simreg['id']}",
                                  "dataset": "builtin://shapes", "limit_train": 128, "limit_test": 200,
                                  "linear": {"epochs": 2, "batch_size": 32}, "name": "e2e-eval"})
    assert simreg["status"] == "pending" and set(simreg["depends_on"]) == set(teachers)
    assert evaluation["status"] == "pending" and evaluation["depends_on"] == [simreg["id"]]

    for t in teachers:
        _succeeded(platform, t, timeout=300)
    simreg, compress = (_succeeded(platform, j["id"], timeout=300) for j in (simreg, compress))
    evaluation = _succeeded(platform, evaluation["id"], timeout=300)

    # --- results: student, random-init baseline and each teacher's own k-NN side by side ---------------------
    res = simreg["result"]
    assert {"knn_top1_k20", "baseline_knn_top1_k20", "teacher0_knn_top1_k20", "teacher1_knn_top1_k20",
            "final_loss"} <= set(res), res
    assert {"knn_top1_k20", "teacher0_knn_top1_k20", "final_loss"} <= set(compress["result"])
    ev = evaluation["result"]
    assert {"knn_top1_k1", "knn_top1_k20", "knn_weighted_top1_k200", "linear_top1", "linear_top1_best"} <= set(ev)
    # Same student backbone, same data and protocol: the eval job's k-NN equals the distill job's final one.
    assert ev["knn_top1_k20"] == pytest.approx(res["knn_top1_k20"], abs=0.02)  # exact on CPU; AMP on GPU

    # --- checkpoints in S3, lineage to the teachers' checkpoints ---------------------------------------------
    store = ObjectStore()
    teacher_finals = {_final_checkpoint(platform, t)["id"] for t in teachers}
    for job in (simreg, compress, evaluation):
        ckpts = _checkpoints(platform, job["id"])
        assert ckpts and all(store.exists(f"cas/sha256/{c['sha256']}") for c in ckpts)
    assert teacher_finals <= set(_checkpoints(platform, simreg["id"])[0]["parents"])
    assert _final_checkpoint(platform, teachers[0])["id"] in _checkpoints(platform, compress["id"])[0]["parents"]
    student_final = _final_checkpoint(platform, simreg["id"])
    assert student_final["id"] in _checkpoints(platform, evaluation["id"])[0]["parents"]
    probes = platform.http.get("/v1/artifacts", params={"job_id": evaluation["id"], "kind": "model"}).json()
    assert [p["name"] for p in probes] == ["linear-probe"] and student_final["id"] in probes[0]["parents"]

    # --- MLflow: each job's run, and the evaluation reported into the student's run ------------------------
    ml = _mlflow()
    run = ml.get_run(simreg["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["method"] == "simreg"
    assert run.data.metrics["teacher1_knn_top1_k20"] == pytest.approx(res["teacher1_knn_top1_k20"])
    assert [m.step for m in ml.get_metric_history(run.info.run_id, "epoch_loss")] == [4]
    assert ml.get_run(compress["mlflow_run_id"]).data.metrics["epoch_teacher_entropy"] > 0
    eval_run = ml.get_run(evaluation["mlflow_run_id"])
    assert {1, 2} <= {m.step for m in ml.get_metric_history(eval_run.info.run_id, "linear_top1")}  # per epoch
    assert run.data.metrics["eval.linear_top1"] == pytest.approx(ev["linear_top1"])
    assert run.data.metrics["eval.knn_top1_k20"] == pytest.approx(ev["knn_top1_k20"])
    assert run.data.tags[f"crucible.eval.{evaluation['id']}"] == evaluation["mlflow_run_id"]


def _kill_mid_job_and_resume(platform: Any, worker: Any, job_id: str) -> tuple[dict[str, Any], Any]:
    """SIGKILL the worker after the job's first checkpoint; a fresh worker must finish it on attempt 2."""
    first = platform.wait_event(job_id, lambda e: e["type"] == "checkpoint", timeout=300, what="the first checkpoint")
    sigkill(worker.pid)
    wait_for(lambda: not processes_of_job(job_id), timeout=15, what="the orphaned child to exit")
    assert platform.job(job_id)["status"] == "running"
    fresh = platform.start_worker("all")
    done = _succeeded(platform, job_id, timeout=300)
    assert done["attempt"] == 2 and done["infra_failures"] == 1
    (resume,) = platform.events(job_id, types=["resume"])
    assert resume["attempt"] == 2 and resume["data"]["epoch"] >= first["data"]["epoch"]
    checkpoints = _checkpoints(platform, job_id)
    resumed_from = next(c for c in checkpoints if c["id"] == resume["data"]["artifact_id"])
    assert not resumed_from["meta"].get("final"), "the job finished before the kill; make the test job longer"
    progress2 = [e for e in platform.events(job_id, types=["progress"]) if e["attempt"] == 2]
    assert progress2 and progress2[0]["data"]["done"] > 0  # attempt 2 did not start from step 0
    first_of_attempt2 = next(c for c in checkpoints if c["attempt"] == 2)
    assert resume["data"]["artifact_id"] in first_of_attempt2["parents"]
    return done, fresh


def test_sigkilled_worker_resumes_distill_and_eval_jobs_from_their_checkpoints(platform, teachers):
    worker = platform.start_worker("all")
    job = platform.submit({"kind": "distill", "method": "simreg", **TINY, "teachers": [f"job:{teachers[0]}"],
                           "head": "linear", "epochs": 6, "name": "e2e-kill-simreg"})
    done, worker = _kill_mid_job_and_resume(platform, worker, job["id"])
    assert {"knn_top1_k20", "baseline_knn_top1_k20", "teacher0_knn_top1_k20"} <= set(done["result"])

    # Eval: the reference's 40-epoch probe with augmentation, 32 steps per epoch: long enough that the ~1 s between
    # the first checkpoint and the kill is a few epochs, even on a fast CPU (at 4 steps per epoch a fast machine
    # finished all 40 epochs in that second, and attempt 2 had nothing left to resume).
    ev = platform.submit({"kind": "eval", "experiment": "e2e-distill", "checkpoint": f"job:{job['id']}",
                          "dataset": "builtin://shapes", "limit_train": 1024, "limit_test": 200,
                          "protocols": ["linear"], "linear": {"epochs": 40, "batch_size": 32},
                          "name": "e2e-kill-eval"})
    done_ev, _ = _kill_mid_job_and_resume(platform, worker, ev["id"])
    assert {"linear_top1", "linear_top1_best"} <= set(done_ev["result"])
    epochs = [e["data"]["values"]["epoch"] for e in platform.events(ev["id"], types=["metrics"])
              if "linear_top1" in e["data"]["values"]]
    assert epochs[-1] == 40 and set(epochs) == set(range(1, 41))  # replayed epochs at most, none missing
    runs = _mlflow().search_runs([_mlflow().get_run(done_ev["mlflow_run_id"]).info.experiment_id],
                                 filter_string=f"tags.`crucible.job_id` = '{ev['id']}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
