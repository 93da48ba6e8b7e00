"""MoIN through REST on real processes (api, scheduler, two expert-trainer workers, a router worker): a text corpus
upload → the ``moin-experts`` pipeline (embed → cluster → one train-expert job per cluster, fanned out → expert-set)
→ the expert set registered, versioned, and in the MLflow model registry → a router replica serving that very set
(``POST /v1/route`` and ``/v1/generate`` over HTTP). The K expert jobs run on two workers at once.

Tiny on purpose (tiny-random LM, 3 topics of real text from builtin://multidomain). The embedder is the packaged
all-MiniLM-L6-v2: at 30 documents per topic TF-IDF+SVD does not find the topics (purity ~0.5), MiniLM does, so the
router's held-out accuracy is something the test can demand."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import httpx
import pytest
import torch
from mlflow import MlflowClient

from shared.config import get_settings
from tests.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

TOPICS = ("news", "pydoc", "licenses")


def corpus_rows(per_topic: int = 30) -> list[dict[str, str]]:
    from workers.text.corpora import load_builtin_corpus

    c = load_builtin_corpus("multidomain")
    rows = []
    for topic in TOPICS:
        docs = [(t, s) for t, s, tp in zip(c.texts, c.splits, c.topics, strict=True) if tp == topic]
        train = [t for t, s in docs if s == "train"][:per_topic]
        test = [t for t, s in docs if s == "test"][:per_topic // 3]
        rows += [{"text": t, "topic": topic, "split": "train"} for t in train]
        rows += [{"text": t, "topic": topic, "split": "test"} for t in test]
    return rows


def corpus_jsonl(per_topic: int = 30) -> bytes:
    return ("\n".join(json.dumps(r) for r in corpus_rows(per_topic)) + "\n").encode()


def _t(s: str) -> datetime:
    return datetime.fromisoformat(s)


def test_corpus_upload_to_registered_expert_set_with_experts_trained_in_parallel(platform, tmp_path):
    r = platform.http.post("/v1/datasets", data={"name": "moin-corpus", "format": "text"},
                           files={"file": ("corpus.jsonl", corpus_jsonl())})
    assert r.status_code == 201, r.text
    for i in (1, 2):  # two expert-trainer workers: the fan-out's jobs train at the same time
        platform.procs.start(f"moin-worker{i}", "worker", "--kind", "expert-trainer")
    body = {"template": "moin-experts", "experiment": "e2e-moin", "params": {
        "dataset": "moin-corpus", "embedder": "minilm", "k": 3, "min_cluster_size": 5,
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

    # the set serves: a router replica loads it straight from the expert-set job (job:<id>, as a pipeline's next
    # step would), and held-out documents are routed and answered over HTTP
    platform.procs.start("moin-router", "worker", "--kind", "router")
    r = platform.http.post("/v1/jobs", json={"kind": "router", "experiment": "e2e-moin", "heartbeat_s": 0.5,
                                             "expert_set": f"job:{set_job['id']}", "name": "moin-replica"})
    assert r.status_code == 201, r.text
    replica_job = r.json()["id"]

    def ready() -> dict[str, Any] | None:
        table = platform.http.get("/v1/router/replicas", params={"expert_set": "moin-e2e"}).json()["replicas"]
        return next((x for x in table if x["job_id"] == replica_job and x["state"] == "ready"), None)

    replica: Any = wait_for(ready, timeout=180, interval=0.5, what="the router replica of the pipeline's set",
                            on_timeout=platform.diagnostics)
    assert len(replica["experts"]) == 3
    # the router's choice for every held-out document is the cluster step's own nearest centroid for it (same
    # embedder, same centroids, reloaded from the set): the contract that makes routing mean anything
    (ckpt,) = platform.http.get("/v1/artifacts", params={"job_id": steps["cluster"]["jobs"][0]["id"],
                                                         "kind": "checkpoint"}).json()
    url = platform.http.get(f"/v1/artifacts/{ckpt['id']}").json()["download_url"]  # presigned, as a researcher would
    (tmp_path / "clusters.pt").write_bytes(httpx.get(url, timeout=30).raise_for_status().content)
    expected = torch.load(tmp_path / "clusters.pt", weights_only=False)["test_assignments"]  # held-out, corpus order
    held_out = [row for row in corpus_rows() if row["split"] == "test"]
    assert len(expected) == len(held_out)
    routed = []
    for row in held_out:
        out = platform.http.post("/v1/route", json={"expert_set": art["id"], "text": row["text"]})
        assert out.status_code == 200, out.text
        assert out.json()["margin"] >= 0 and out.json()["expert_set"] == art["id"]
        routed.append(out.json()["expert"])
    assert routed == [f"e{c}" for c in expected], (routed, expected)  # the expert-set job names cluster c "e<c>"
    assert len(set(routed)) >= 2, routed  # three real topics: held-out text does not all land on one expert
    gen = platform.http.post("/v1/generate", json={"expert_set": "moin-e2e", "text": held_out[0]["text"][:200],
                                                   "max_new_tokens": 4})
    assert gen.status_code == 200, gen.text
    assert gen.json()["routed_to"] == routed[0] and gen.json()["tokens"] == 4
    assert gen.json()["replica"] == replica["replica_id"]
    platform.http.post(f"/v1/jobs/{replica_job}/cancel")
    wait_for(lambda: platform.http.get(f"/v1/jobs/{replica_job}").json()["status"] == "cancelled", timeout=60,
             what="the replica cancelled", on_timeout=platform.diagnostics)
