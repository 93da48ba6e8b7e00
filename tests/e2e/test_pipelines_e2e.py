"""A pipeline on real processes (api, scheduler, worker): pre-train → evaluate its final checkpoint, and a
fan-out step that evaluates every checkpoint the pre-training wrote (a list known only at run time). The
pipeline's MLflow parent run holds every step's run as a child."""

from __future__ import annotations

from typing import Any

import pytest
from mlflow import MlflowClient

from shared.config import get_settings
from tests.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

TINY: dict[str, Any] = {"dataset": "builtin://shapes", "limit_train": 64, "limit_test": 100}
PIPELINE: dict[str, Any] = {"name": "e2e-pipeline", "experiment": "e2e-pipelines", "steps": {
    "train": {"kind": "ssl-train", "method": "msf", **TINY, "backbone": "resnet18", "stem": "imagenet",
              "batch_size": 32, "bank_size": 64, "topk": 3, "epochs": 2, "knn_k": [1]},
    "evaluate": {"kind": "eval", "checkpoint": "${steps.train.checkpoint}", **TINY, "protocols": ["knn"],
                 "knn_k": [1]},
    "every-checkpoint": {"kind": "eval", "foreach": "${steps.train.outputs.checkpoints}", "checkpoint": "${item}",
                         **TINY, "protocols": ["knn"], "knn_k": [1]},
}}


def test_a_three_step_pipeline_with_fan_out_runs_to_completion_with_mlflow_child_runs(platform):
    platform.start_worker("all")
    r = platform.http.post("/v1/pipelines", json=PIPELINE)
    assert r.status_code == 201, r.text
    pid = r.json()["id"]

    def done() -> dict[str, Any] | None:
        p = platform.http.get(f"/v1/pipelines/{pid}").json()
        return p if p["status"] in ("succeeded", "failed", "cancelled") else None

    p = wait_for(done, timeout=600, interval=2, what="the pipeline to end", on_timeout=platform.diagnostics)
    assert p["status"] == "succeeded", p  # type: ignore[index]
    steps = {s["name"]: s for s in p["steps"]}  # type: ignore[index]
    ckpts = platform.http.get("/v1/artifacts", params={"job_id": steps["train"]["jobs"][0]["id"],
                                                        "kind": "checkpoint"}).json()
    fan = steps["every-checkpoint"]
    assert len(ckpts) >= 2 and len(fan["jobs"]) == len(ckpts) == len(fan["items"])  # K checkpoints -> K jobs
    for j in fan["jobs"]:
        job = platform.job(j["id"])
        assert job["status"] == "succeeded" and "knn_top1_k1" in job["result"]
    assert platform.job(steps["evaluate"]["jobs"][0]["id"])["result"]["knn_top1_k1"] >= 0

    client = MlflowClient(tracking_uri=get_settings().MLFLOW_TRACKING_URI)
    job_runs = {j["mlflow_run_id"] for s in steps.values() for j in s["jobs"]}
    assert None not in job_runs and len(job_runs) == 2 + len(ckpts)

    def linked() -> Any:
        parent = platform.http.get(f"/v1/pipelines/{pid}").json()["mlflow_run_id"]
        if parent is None:
            return None
        kids = {run_id for run_id in job_runs
                if client.get_run(run_id).data.tags.get("mlflow.parentRunId") == parent}
        return parent if kids == job_runs and client.get_run(parent).info.status == "FINISHED" else None

    parent = wait_for(linked, timeout=60, interval=1, what="child runs linked to the pipeline's parent run")
    assert client.get_run(parent).data.tags["crucible.pipeline_id"] == pid  # type: ignore[arg-type]
