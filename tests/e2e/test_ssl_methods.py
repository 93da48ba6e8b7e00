"""Every ssl-train method end to end: REST -> scheduler -> worker -> child (or torchrun ranks) -> S3 + MLflow.

All jobs are submitted at once (tiny: 128 shapes, batch 32, bank 64, 1-2 epochs) and run on two workers;
the cross-modal CMSF job names the first job's checkpoint as ``job:<id>``, which the platform turns into an
implicit dependency and a downloaded input. One MSF job asks for ``resources.gpus: 2``: the worker starts
it under torchrun (2 CPU processes, gloo).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow import MlflowClient

from shared.config import get_settings
from shared.storage import ObjectStore
from tests.e2e.conftest import TERMINAL

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

TINY: dict[str, Any] = {
    "kind": "ssl-train", "experiment": "e2e-ssl", "dataset": "builtin://shapes", "limit_train": 128,
    "limit_test": 200, "backbone": "resnet18", "stem": "imagenet", "batch_size": 32, "bank_size": 64, "epochs": 1,
    "knn_k": [1, 5], "proj_hidden_dim": 128, "proj_dim": 32,
}
# name -> (spec overrides, a metric only that method logs)
JOBS: dict[str, tuple[dict[str, Any], str]] = {
    "cmsf-2q": ({"method": "cmsf", "epochs": 2, "cmsf": {"constraint": "2q"}}, "epoch_purity_msf"),
    "cmsf-kmeans": ({"method": "cmsf", "epochs": 2, "cmsf": {"constraint": "kmeans", "kmeans_clusters": 8}},
                    "kmeans_objective"),
    "cmsf-supervised": ({"method": "cmsf", "cmsf": {"constraint": "supervised"}}, "epoch_constraint_short"),
    "cmsf-semi": ({"method": "cmsf", "cmsf": {"constraint": "semi-supervised", "label_fraction": 0.25,
                                              "head_epochs": 3}}, "epoch_pseudo_confident_fraction"),
    "isd-r18": ({"method": "isd", "isd": {"recipe": "r18"}}, "epoch_teacher_entropy_ratio"),
    "isd-plus": ({"method": "isd", "isd": {"recipe": "plus"}}, "epoch_teacher_entropy_ratio"),
    "msf-2proc": ({"method": "msf", "epochs": 2, "resources": {"gpus": 2}}, "epoch_purity"),
}


def _mlflow() -> MlflowClient:
    return MlflowClient(tracking_uri=get_settings().MLFLOW_TRACKING_URI)


@pytest.fixture(scope="module")
def jobs(platform: Any) -> dict[str, str]:
    platform.start_worker()
    platform.start_worker()
    ids = {name: platform.submit(TINY | spec | {"name": f"e2e-{name}"})["id"] for name, (spec, _) in JOBS.items()}
    cross = {"method": "cmsf", "name": "e2e-cmsf-cross-modal",
             "cmsf": {"constraint": "cross-modal", "topk_constraint": 8, "cross_modal_features": "projection",
                      "cross_modal_checkpoint": f"job:{ids['cmsf-2q']}"}}
    ids["cmsf-cross-modal"] = platform.submit(TINY | cross)["id"]
    return ids


def _checkpoints(platform: Any, job_id: str) -> list[dict[str, Any]]:
    return platform.http.get("/v1/artifacts", params={"job_id": job_id, "kind": "checkpoint"}).json()


def _succeeded(platform: Any, job_id: str) -> dict[str, Any]:
    job = platform.wait_status(job_id, TERMINAL, timeout=400)
    assert job["status"] == "succeeded", platform.diagnostics(job_id)
    return job


def _final_state(ckpts: list[dict[str, Any]], tmp: Path) -> dict[str, Any]:
    final = next(c for c in ckpts if c["meta"].get("final"))
    path = ObjectStore().get_file(f"cas/sha256/{final['sha256']}", tmp / "final.pt")
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.parametrize("name", [n for n in JOBS if n != "msf-2proc"])
def test_method_job_succeeds_with_checkpoints_and_metrics(platform: Any, jobs: dict[str, str], name: str,
                                                         tmp_path: Path) -> None:
    job = _succeeded(platform, jobs[name])
    spec, metric = JOBS[name]
    assert {"knn_top1_k1", "knn_top1_k5", "baseline_knn_top1_k1", "final_loss"} <= set(job["result"])
    ckpts = _checkpoints(platform, job["id"])
    assert len(ckpts) == spec.get("epochs", 1)  # one per epoch, the last one final
    store = ObjectStore()
    assert all(store.exists(f"cas/sha256/{c['sha256']}") for c in ckpts)
    ml = _mlflow()
    run = ml.get_run(job["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["method"] == spec["method"]
    assert [m.step for m in ml.get_metric_history(run.info.run_id, "epoch_loss")] == \
        [4 * e for e in range(1, spec.get("epochs", 1) + 1)]
    assert ml.get_metric_history(run.info.run_id, metric), metric
    if name == "cmsf-supervised":
        assert run.data.metrics["epoch_purity"] == 1.0
    if name == "cmsf-semi":
        files = platform.http.get("/v1/artifacts", params={"job_id": job["id"], "kind": "file"}).json()
        assert [f["meta"].get("count") for f in files if f["name"] == "labelled-split.json"] == \
            [run.data.metrics["labelled_count"]]
    if name in ("isd-r18", "cmsf-2q"):  # what downstream jobs read
        state = _final_state(ckpts, tmp_path)
        assert {"backbone", "projector", "meta"} <= set(state)
        if name == "isd-r18":
            assert state["projector"] is None and state["meta"]["projector"] is None
        else:
            assert state["meta"]["projector"] == {"in": 512, "hidden": 128, "out": 32}


def test_cross_modal_job_uses_the_first_jobs_checkpoint(platform: Any, jobs: dict[str, str]) -> None:
    source = _succeeded(platform, jobs["cmsf-2q"])
    job = _succeeded(platform, jobs["cmsf-cross-modal"])
    source_final = next(c for c in _checkpoints(platform, source["id"]) if c["meta"].get("final"))
    (ckpt,) = _checkpoints(platform, job["id"])
    assert source_final["id"] in ckpt["parents"]  # lineage: the constraint model is an input of this run
    run = _mlflow().get_run(job["mlflow_run_id"])
    assert run.info.status == "FINISHED" and "epoch_constraint_short" in run.data.metrics


def test_two_gpu_job_runs_under_torchrun_and_reports_once(platform: Any, jobs: dict[str, str]) -> None:
    job = _succeeded(platform, jobs["msf-2proc"])
    ckpts = _checkpoints(platform, job["id"])
    assert [c["meta"].get("epoch") for c in ckpts] == [1, 2]  # rank 0 alone uploaded
    done = [e["data"]["done"] for e in platform.events(job["id"], types=["progress"])]
    assert done == sorted(set(done)) and done[-1] == 8  # one progress stream: 2 epochs x 4 global steps
    ml = _mlflow()
    run = ml.get_run(job["mlflow_run_id"])
    assert run.data.params["resources.gpus"] == "2" and run.info.status == "FINISHED"
    assert [m.step for m in ml.get_metric_history(run.info.run_id, "epoch_loss")] == [4, 8]
