"""PatchSearch through the whole platform with real processes: the ``patchsearch-defense`` template on a tiny
dataset (poison -> clean/poisoned pre-training -> patchsearch -> i-CutMix re-training on the filtered data, the
KD branch, four evaluations) to completion under one MLflow parent run; the patchsearch step's scores and patch
grid in S3 (the grid also in its MLflow run), its filtered dataset registered with lineage; a patchsearch job on
a dataset without a manifest (metrics skipped with the reason); submit-time 422s for checkpoints that cannot work."""

from __future__ import annotations

import io
import zipfile
from typing import Any

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from shared.config import get_settings
from shared.storage import ObjectStore
from tests.conftest import wait_for
from tests.e2e.conftest import TERMINAL

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

TINY_PARAMS: dict[str, Any] = {
    "limit_train": 200, "limit_test": 100, "epochs": 1, "defended_epochs": 1, "batch_size": 32,
    "backbone": "resnet10", "clusters": 5, "test_images": 20, "window": 6, "classifier_iterations": 4,
    "max_removed_fraction": 0.3, "kd_clean_images": 64, "kd_epochs": 1, "kd_bank": 32, "defended_bank": 64,
    "probe_epochs": 1,
}


def _zip_dataset() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for c, cls in enumerate(["a", "b", "c"]):
            for i in range(20):
                img = np.full((16, 16, 3), 50 + 70 * c, np.uint8) + rng.integers(0, 40, (16, 16, 3), dtype=np.uint8)
                png = io.BytesIO()
                Image.fromarray(img).save(png, format="PNG")
                z.writestr(f"train/{cls}/{i:03d}.png", png.getvalue())
    return buf.getvalue()


def _outputs(platform: Any, job_id: str) -> dict[str, Any]:
    return {e["data"]["name"]: e["data"]["value"] for e in platform.events(job_id, ["output"])}


def test_the_defense_pipeline_and_patchsearch_jobs_through_the_api(platform):
    platform.start_worker("all")
    r = platform.http.post("/v1/pipelines", json={"template": "patchsearch-defense", "params": TINY_PARAMS,
                                                  "experiment": "e2e-patchsearch"})
    assert r.status_code == 201, r.text
    pid = r.json()["id"]

    def done() -> dict[str, Any] | None:
        p = platform.http.get(f"/v1/pipelines/{pid}").json()
        return p if p["status"] in ("succeeded", "failed", "cancelled") else None

    p: Any = wait_for(done, timeout=900, interval=2, what="the defense pipeline to end",
                      on_timeout=platform.diagnostics)
    steps = {s["name"]: s for s in p["steps"]}
    assert p["status"] == "succeeded", {n: (s["state"], s.get("state_reason")) for n, s in steps.items()}
    assert set(steps) == {"poison", "clean_model", "poisoned_model", "patchsearch", "defended_model", "kd_model",
                          "eval_clean", "eval_poisoned", "eval_defended", "eval_kd"}
    job_of = {n: s["jobs"][0]["id"] for n, s in steps.items()}
    ps = platform.job(job_of["patchsearch"])
    assert ps["result"]["detection_metrics"] == 1 and "removal_recall" in ps["result"]
    assert 0 < ps["result"]["scored_fraction"] <= 1 and ps["result"]["images"] == 200

    # artifacts in S3; the filtered dataset is registered with lineage; the grid is in MLflow
    arts = platform.http.get("/v1/artifacts", params={"job_id": job_of["patchsearch"]}).json()
    by_name = {a["name"]: a for a in arts}
    assert {"poison-scores", "top-patches", "patchsearch-report"} <= set(by_name)
    store = ObjectStore()
    for name in ("poison-scores", "top-patches"):
        assert store.exists(by_name[name]["uri"].split("/", 3)[3])
    (made,) = platform.events(job_of["patchsearch"], ["dataset"])
    filtered_id = made["data"]["dataset_id"]
    ds = platform.http.get(f"/v1/datasets/{filtered_id}").json()
    assert ds["id"] == filtered_id and ds["name"].endswith("-filtered")
    assert platform.job(job_of["defended_model"])["spec"]["dataset"] == filtered_id  # the next step trained on it
    lineage = platform.http.get(f"/v1/artifacts/{ds['artifact_id']}").json()["parents"]
    poisoned_ds = platform.job(job_of["patchsearch"])["spec"]["dataset"]
    poisoned_art = platform.http.get(f"/v1/datasets/{poisoned_ds}").json()["artifact_id"]
    assert poisoned_art in lineage and len(lineage) >= 2  # the input dataset and the model it was scanned with
    client = MlflowClient(tracking_uri=get_settings().MLFLOW_TRACKING_URI)
    assert "images/top-patches.png" in [f.path for f in client.list_artifacts(ps["mlflow_run_id"], "images")]
    parent = p["mlflow_run_id"]
    for name, jid in job_of.items():  # every step's run sits under the pipeline's parent run
        run = client.get_run(platform.job(jid)["mlflow_run_id"])
        assert run.data.tags.get("mlflow.parentRunId") == parent, name

    # the comparison table of the four models, from the evaluations' attack numbers
    from workers.poison_scanner.patchsearch.report import comparison_table

    evals = {n: platform.job(job_of[n])["result"] for n in steps if n.startswith("eval_")}
    assert all("attack_asr" in r and "attack_fp_patched" in r for r in evals.values()), evals
    table = comparison_table(evals)
    assert len(table.splitlines()) == 6 and "| PatchSearch-defended" in table and " - |" not in table, table

    # a dataset without a manifest: metrics skipped, with the reason, not a crash
    up = platform.http.post("/v1/datasets", data={"name": "ps-clean"}, files={"file": ("d.zip", _zip_dataset())})
    assert up.status_code in (200, 201), up.text
    spec = {"kind": "patchsearch", "experiment": "e2e-patchsearch", "checkpoint": f"job:{job_of['poisoned_model']}",
            "dataset": "ps-clean", "clusters": 4, "test_images": 12, "window": 6,
            "classifier": {"models": 1, "max_iterations": 3, "validation_images": 5}}
    job = platform.submit(spec)
    job = platform.wait_status(job["id"], TERMINAL, timeout=300)
    assert job["status"] == "succeeded", platform.diagnostics(job["id"])
    assert job["result"]["detection_metrics"] == 0 and "top5_precision" not in job["result"]
    assert "no poison_manifest.json" in _outputs(platform, job["id"])["report"]["detection"]["skipped"]

    # bad input, refused at submit with the field and the fix, nothing written
    before = platform.http.get("/v1/jobs", params={"kind": "patchsearch"}).json()
    r = platform.http.post("/v1/jobs", json={**spec, "checkpoint": f"job:{job_of['poison']}"})
    assert r.status_code == 422 and "writes no model" in r.text, r.text
    r = platform.http.post("/v1/jobs", json={**spec, "window": 16})
    assert r.status_code == 422 and "window" in r.text, r.text
    assert platform.http.get("/v1/jobs", params={"kind": "patchsearch"}).json() == before
