"""The whole job path with real processes: HTTP → Postgres → scheduler → Redis → Celery worker → child process
training MSF → checkpoints in S3 → metrics in MLflow. Plus: SIGKILL mid-training resumes, cancel stops."""

from __future__ import annotations

import re

import pytest
from mlflow import MlflowClient

from shared.config import get_settings
from shared.storage import ObjectStore
from tests.conftest import wait_for
from tests.e2e.conftest import TERMINAL, processes_of_job, sigkill

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

# Tiny on purpose: 4 steps per epoch, a few seconds per epoch on 2 CPU cores.
MSF_TINY = {"kind": "ssl-train", "method": "msf", "experiment": "e2e", "dataset": "builtin://shapes",
            "limit_train": 128, "limit_test": 200, "backbone": "resnet18", "stem": "imagenet", "batch_size": 32,
            "bank_size": 64, "topk": 3, "lr": 0.05, "knn_every": 1, "knn_k": [1, 5]}


def _mlflow() -> MlflowClient:
    return MlflowClient(tracking_uri=get_settings().MLFLOW_TRACKING_URI)


def test_msf_job_runs_end_to_end(platform):
    worker = platform.start_worker()
    job = platform.submit({**MSF_TINY, "epochs": 2, "name": "e2e-msf"})
    job = platform.wait_status(job["id"], TERMINAL, timeout=420)
    assert job["status"] == "succeeded", platform.diagnostics(job["id"])
    assert job["progress"] == 1.0 and job["attempt"] == 1
    assert worker.poll() is None  # the worker survives and waits for more
    # the job ran in the worker's pre-started child (torch already imported), not a fresh interpreter
    worker_log = platform.procs.log(f"worker{platform._workers}")
    assert re.search(rf"job {job['id']} attempt 1: child pid \d+ \(warm\)", worker_log), worker_log[-3000:]

    # results: k-NN of the trained network and of the random-init baseline
    res = job["result"]
    assert {"knn_top1_k1", "knn_top1_k5", "baseline_knn_top1_k5"} <= set(res), res
    assert all(0.0 <= v <= 1.0 for k, v in res.items() if k.startswith("knn_"))

    # checkpoints: every epoch, in S3 under their sha256, recorded with lineage
    ckpts = platform.http.get("/v1/artifacts", params={"job_id": job["id"], "kind": "checkpoint"}).json()
    assert len(ckpts) >= 2
    store = ObjectStore()
    for c in ckpts:
        assert c["uri"] == f"s3://{store.bucket}/cas/sha256/{c['sha256']}"
        assert store.exists(f"cas/sha256/{c['sha256']}")
    assert ckpts[1]["parents"] == [ckpts[0]["id"]]
    assert any(c["meta"].get("final") for c in ckpts)

    # progress, metrics and state changes are in the event log, in order
    types = [e["type"] for e in platform.events(job["id"])]
    for t in ("submitted", "state", "progress", "metrics", "checkpoint", "result"):
        assert t in types, t

    # MLflow: one run, full spec as params, per-step metrics, final status set by the supervisor
    ml = _mlflow()
    run = ml.get_run(job["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["method"] == "msf" and run.data.params["resources.gpus"] == "0"
    # the resolved augmentation recipe of the dataset's family is part of the logged spec
    assert run.data.params["augment.preset"] == "shapes" and run.data.params["augment.hflip"] == "True"
    assert run.data.tags["crucible.job_id"] == job["id"]
    assert run.data.tags["crucible.checkpoint_uri"].startswith("s3://")
    losses = ml.get_metric_history(run.info.run_id, "epoch_loss")
    assert [m.step for m in losses] == [4, 8] and all(0.0 < m.value < 4.0 for m in losses)
    assert ml.get_metric_history(run.info.run_id, "progress")[-1].value == pytest.approx(1.0)
    assert run.data.metrics["knn_top1_k5"] == pytest.approx(res["knn_top1_k5"])
    assert run.inputs.dataset_inputs and run.inputs.dataset_inputs[0].dataset.name == "builtin://shapes"
    exp = ml.get_experiment(run.info.experiment_id)
    assert exp.name.endswith("/e2e")


def test_sigkilled_worker_job_resumes_from_its_checkpoint_in_the_same_run(platform):
    worker = platform.start_worker()
    job = platform.submit({**MSF_TINY, "epochs": 6, "knn_every": 0, "name": "e2e-kill"})
    first_ckpt = platform.wait_event(job["id"], lambda e: e["type"] == "checkpoint", timeout=300,
                                     what="the first checkpoint")
    sigkill(worker.pid)
    # the method's process dies with its supervisor (PR_SET_PDEATHSIG): no orphan keeps training
    wait_for(lambda: not processes_of_job(job["id"]), timeout=15, what="the orphaned child to exit")
    assert platform.job(job["id"])["status"] == "running"  # nobody knows yet: the lease has not expired

    platform.start_worker()  # a fresh worker; the reconciler re-queues the job once the lease expires
    done = platform.wait_status(job["id"], TERMINAL, timeout=480)
    assert done["status"] == "succeeded", platform.diagnostics(job["id"])
    assert done["attempt"] == 2 and done["infra_failures"] == 1

    (resume,) = platform.events(job["id"], types=["resume"])
    assert resume["attempt"] == 2 and resume["data"]["epoch"] >= first_ckpt["data"]["epoch"]
    progress2 = [e for e in platform.events(job["id"], types=["progress"]) if e["attempt"] == 2]
    assert progress2 and progress2[0]["data"]["done"] > 0  # attempt 2 did not start from step 0

    # lineage: attempt 2's first checkpoint descends from the checkpoint it resumed from
    ckpts = platform.http.get("/v1/artifacts", params={"job_id": job["id"], "kind": "checkpoint"}).json()
    resumed_from = resume["data"]["artifact_id"]
    first_of_attempt2 = next(c for c in ckpts if c["attempt"] == 2)
    assert resumed_from in first_of_attempt2["parents"]

    # one MLflow run for both attempts, closed as FINISHED
    runs = _mlflow().search_runs([_mlflow().get_run(done["mlflow_run_id"]).info.experiment_id],
                                 filter_string=f"tags.`crucible.job_id` = '{job['id']}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["crucible.attempt"] == "2"


def test_cancel_stops_the_running_method_and_marks_the_run_killed(platform):
    platform.start_worker()
    job = platform.submit({**MSF_TINY, "epochs": 50, "knn_every": 0, "name": "e2e-cancel"})
    platform.wait_event(job["id"], lambda e: e["type"] == "progress", timeout=300, what="training to start")
    assert processes_of_job(job["id"])
    r = platform.http.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 202 and r.json()["cancel_requested"]
    done = platform.wait_status(job["id"], TERMINAL, timeout=120)
    assert done["status"] == "cancelled" and done["progress"] < 1.0
    wait_for(lambda: not processes_of_job(job["id"]), timeout=15, what="the method's processes to exit")
    run = _mlflow().get_run(done["mlflow_run_id"])
    assert run.info.status == "KILLED"
