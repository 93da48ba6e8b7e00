"""The clip-bow pipeline through REST on real processes: upload a captioned dataset -> clip-train (BoW) ->
clip-pseudo-caption (a new captioned dataset, lineage to the model and the upload) -> clip-train on the union ->
clip-eval (zero-shot + retrieval, confusion matrices as artifacts); every job has its MLflow run."""

from __future__ import annotations

from typing import Any

import pytest

from tests.clip_archive import captioned_entries, tar_bytes
from tests.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

TRAIN: dict[str, Any] = {"kind": "clip-train", "image_size": 24, "embed_dim": 32, "text_width": 32,
                         "text_layers": 1, "text_heads": 2, "context_length": 16, "batch_size": 16, "epochs": 2,
                         "warmup_steps": 2, "captions": {"bow": True, "balance": "top_freq", "top_freq": 2}}


def test_upload_train_pseudo_caption_retrain_and_evaluate(platform):
    entries = captioned_entries(72, 24)
    r = platform.http.post("/v1/datasets", data={"name": "e2e-scenes", "format": "captioned"},
                           files={"file": ("scenes.tar.gz", tar_bytes(entries))})
    assert r.status_code == 201, r.text
    upload = r.json()
    assert upload["stats"]["uncaptioned"] > 0
    platform.start_worker("clip-bow-trainer")
    pipeline = {"name": "e2e-clip-bow", "experiment": "e2e-clip", "steps": {
        "base": TRAIN | {"dataset": "e2e-scenes", "text_encoder": "bow"},
        "pseudo": {"kind": "clip-pseudo-caption", "checkpoint": "${steps.base.checkpoint}", "dataset": "e2e-scenes",
                   "top_k": 4, "output_name": "e2e-scenes-pseudo"},
        "union": TRAIN | {"dataset": "${steps.pseudo.outputs.dataset}", "epochs": 1},
        "evaluate": {"kind": "clip-eval", "checkpoint": "${steps.union.checkpoint}", "dataset": "e2e-scenes",
                     "zero_shot": {"attributes": ["shape", "colour", "class"],
                                   "templates": ["a photo of a {}.", "{}"]}},
    }}
    r = platform.http.post("/v1/pipelines", json=pipeline)
    assert r.status_code == 201, r.text
    pid = r.json()["id"]

    def done() -> dict[str, Any] | None:
        p = platform.http.get(f"/v1/pipelines/{pid}").json()
        return p if p["status"] in ("succeeded", "failed", "cancelled") else None

    p = wait_for(done, timeout=600, interval=2, what="the clip pipeline to end", on_timeout=platform.diagnostics)
    assert p["status"] == "succeeded", platform.diagnostics()  # type: ignore[index]
    jobs = {s["name"]: platform.job(s["jobs"][0]["id"]) for s in p["steps"]}  # type: ignore[index]
    assert all(j["mlflow_run_id"] for j in jobs.values())
    ds = platform.http.get("/v1/datasets/e2e-scenes-pseudo").json()
    assert ds["stats"]["format"] == "captioned"
    assert jobs["union"]["spec"]["dataset"] == ds["id"]  # the pseudo step's output, passed on by the pipeline
    train_images = sum(path.startswith("train/") for path in entries)
    train_captions = sum(b'"train/' in line for line in entries["captions.jsonl"].splitlines())
    assert ds["stats"]["pseudo_captioned"] == train_images - train_captions > 0  # test images are not pseudo-captioned
    assert jobs["pseudo"]["result"]["pseudo_captioned"] == ds["stats"]["pseudo_captioned"]
    art = platform.http.get(f"/v1/artifacts/{ds['artifact_id']}").json()
    assert art["meta"].get("format") == "captioned"
    assert upload["artifact_id"] in art["parents"] and len(art["parents"]) == 2  # the upload and the BoW model
    result = jobs["evaluate"]["result"]
    assert {"zs_shape_top1", "zs_colour_top5", "zs_class_top1", "i2t_R@1", "t2i_median_rank"} <= set(result)
    figures = platform.http.get("/v1/artifacts", params={"job_id": jobs["evaluate"]["id"], "kind": "image"}).json()
    assert {f["name"] for f in figures} == {"confusion-shape.png", "confusion-colour.png", "confusion-class.png"}
