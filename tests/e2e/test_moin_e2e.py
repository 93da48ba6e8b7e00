"""MoIN through REST on real processes (api, scheduler, two expert-trainer workers): a text corpus upload → the
``moin-experts`` pipeline (embed → cluster → one train-expert job per cluster, fanned out → expert-set) → the
expert set registered, versioned, and in the MLflow model registry. The K expert jobs run on two workers at once.

Tiny on purpose (tiny-random LM, TF-IDF+SVD embeddings, 3 topics of real text from builtin://multidomain)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import pytest
from mlflow import MlflowClient

from shared.config import get_settings
from tests.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

TOPICS = ("news", "pydoc", "licenses")


def corpus_jsonl(per_topic: int = 30) -> bytes:
    from workers.text.corpora import load_builtin_corpus

    c = load_builtin_corpus("multidomain")
    rows = []
    for topic in TOPICS:
        docs = [(t, s) for t, s, tp in zip(c.texts, c.splits, c.topics, strict=True) if tp == topic]
        train = [t for t, s in docs if s == "train"][:per_topic]
        test = [t for t, s in docs if s == "test"][:per_topic // 3]
        rows += [{"text": t, "topic": topic, "split": "train"} for t in train]
        rows += [{"text": t, "topic": topic, "split": "test"} for t in test]
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


def _t(s: str) -> datetime:
    return datetime.fromisoformat(s)


def test_corpus_upload_to_registered_expert_set_with_experts_trained_in_parallel(platform):
    r = platform.http.post("/v1/datasets", data={"name": "moin-corpus", "format": "text"},
                           files={"file": ("corpus.jsonl", corpus_jsonl())})
    assert r.status_code == 201, r.text
    for i in (1, 2):  # two expert-trainer workers: the fan-out's jobs train at the same time
        platform.procs.start(f"moin-worker{i}", "worker", "--kind", "expert-trainer")
    body = {"template": "moin-experts", "experiment": "e2e-moin", "params": {
        "dataset": "moin-corpus", "embedder": "tfidf-svd", "k": 3, "min_cluster_size": 5,
        "base_model": "tiny-random", "total_tokens": 60_000, "seq_len": 32, "batch_size": 4, "rank": 4,
        "set_name": "moin-e2e", "fallback_margin": 0.01}}
    r = platform.http.post("/v1/pipelines", json=body)
    assert r.status_code == 201, r.text
    pid = r.json()["id"]

    def done() -> dict[str, Any] | None:
        p = platform.http.get(f"/v1/pipelines/{pid}").json()
        return p if p["status"] in ("succeeded", "failed", "cancelled") else None

    p: Any = wait_for(done, timeout=420, interval=2, what="the moin pipeline to end", on_timeout=platform.diagnostics)
    assert p["status"] == "succeeded", (p, platform.diagnostics())
    steps = {s["name"]: s for s in p["steps"]}
    assert steps["train"]["items"] == [0, 1, 2] and len(steps["train"]["jobs"]) == 3

    # the expert jobs ran on both workers, and at least two trained at the same time
    jobs = [platform.job(j["id"]) for j in steps["train"]["jobs"]]
    workers = {e["data"].get("worker") for j in jobs for e in platform.events(j["id"], ["state"])
               if e["data"].get("status") == "running"}
    assert len(workers) == 2, workers
    spans = sorted((_t(j["started_at"]), _t(j["finished_at"])) for j in jobs)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False)), spans
    for j in jobs:
        assert j["result"]["expert_ppl"] < j["result"]["base_ppl"], j["result"]

    # the expert set: an artifact of kind expert-set, version 1, registered in MLflow as <project>.moin-e2e
    set_job = platform.job(steps["expert-set"]["jobs"][0]["id"])
    assert set_job["result"]["experts"] == 3
    (art,) = platform.http.get("/v1/artifacts", params={"job_id": set_job["id"], "kind": "expert-set"}).json()
    assert art["meta"]["version"] == 1 and art["meta"]["register_model"] == "moin-e2e"
    client = MlflowClient(tracking_uri=get_settings().MLFLOW_TRACKING_URI)
    project = client.get_run(set_job["mlflow_run_id"]).data.tags["crucible.project"]

    def registered() -> Any:
        versions = client.search_model_versions(f"name='{project}.moin-e2e'")
        return versions or None

    (version,) = wait_for(registered, timeout=30, interval=1, what="the registered model version")  # type: ignore[misc]
    assert version.tags["crucible.artifact_id"] == art["id"] and version.source.startswith("s3://")
