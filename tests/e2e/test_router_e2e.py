"""The router end to end: an expert set registered as an artifact, router service jobs on two real router workers
(Celery → supervisor → replica child), ``POST /v1/route`` and ``/v1/generate`` (JSON and SSE) over HTTP; a replica
killed mid-load, an expert set that does not fit its base, unknown sets and too-long prompts."""

from __future__ import annotations

import json
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services import localstack
from tests import router_set
from tests.conftest import Procs, new_project_key, wait_for
from tests.e2e.conftest import processes_of_job, sigkill
from tests.stack import wait_http

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def _register(project: str, directory: Path, name: str) -> str:
    """Upload an expert-set directory as an ``expert-set`` artifact of ``project`` (what the expert-set job does)."""
    from sqlalchemy import select

    from shared.db import session_scope
    from shared.models import Artifact, Project
    from shared.storage import ObjectStore
    from workers.text import expert_set as es

    tar = es.pack(directory, directory.parent / f"{directory.name}.tar")
    obj = ObjectStore().put_file(tar)
    with session_scope() as s:
        pid = s.scalars(select(Project.id).where(Project.name == project)).one()
        art = Artifact(project_id=pid, kind=es.ARTIFACT_KIND, name=name, bucket=obj.bucket, key=obj.key,
                       sha256=obj.sha256, size_bytes=obj.size, meta={})
        s.add(art)
        s.flush()
        return str(art.id)


class Router:
    def __init__(self, procs: Procs, url: str, token: str) -> None:
        self.procs, self.url = procs, url
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)

    def submit(self, **spec: Any) -> str:
        r = self.http.post("/v1/jobs", json={"kind": "router", "experiment": "serving", "heartbeat_s": 0.5, **spec})
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    def table(self, expert_set: str) -> list[dict[str, Any]]:
        r = self.http.get("/v1/router/replicas", params={"expert_set": expert_set})
        assert r.status_code == 200, r.text
        return list(r.json()["replicas"])

    def wait_state(self, expert_set: str, job: str, state: str, timeout: float = 180) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            return next((a for a in self.table(expert_set) if a["job_id"] == job and a["state"] == state), None)

        return wait_for(check, timeout=timeout, interval=0.3, what=f"replica of job {job} to be {state}",  # type: ignore[return-value]
                        on_timeout=self.diagnostics)

    def diagnostics(self) -> str:
        return "\n".join(f"--- {n} ---\n{self.procs.log(n)[-3000:]}" for n in self.procs.procs)


@pytest.fixture(scope="module")
def router(stack: Any, mlflow_ready: Any) -> Iterator[tuple[Router, str, str]]:
    procs = Procs(Path(tempfile.mkdtemp(prefix="crucible-router-e2e-")))
    port = localstack.free_port()
    procs.start("api", "api", "--port", str(port))
    procs.start("scheduler", "scheduler")
    procs.start("worker-a", "worker", "--kind", "router")
    project, token = new_project_key("router")
    r = Router(procs, f"http://127.0.0.1:{port}", token)
    try:
        wait_http(f"{r.url}/healthz", timeout=60)
        yield r, project, token
    finally:
        procs.stop_all()


def _sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_router_serves_over_http_and_survives_a_replica_killed_mid_load(router: Any, tmp_path: Path) -> None:
    r, project, token = router
    set_id = _register(project, router_set.build(tmp_path / "set", n_experts=3), "tiny-set")
    a = r.submit(expert_set=f"artifact:{set_id}", experts=["e0", "e1"], pinned=["e0"], name="replica-a")
    ready = r.wait_state(set_id, a, "ready")
    assert ready["experts"] == ["e0", "e1"] and "e0" in ready["resident"]

    # route: the nearest centroid, with its margin; by artifact id or by name
    routed = r.http.post("/v1/route", json={"expert_set": "tiny-set", "text": router_set.topic_text(1)})
    assert routed.status_code == 200, routed.text
    assert routed.json()["expert"] == "e1" and routed.json()["margin"] > 0
    assert routed.json()["expert_set"] == set_id

    # generate, routed: e1 is held by replica a
    gen = r.http.post("/v1/generate", json={"expert_set": set_id, "text": router_set.topic_text(1),
                                            "max_new_tokens": 6})
    assert gen.status_code == 200, gen.text
    body = gen.json()
    assert body["expert"] == body["routed_to"] == "e1" and body["tokens"] == 6
    assert body["replica"] == ready["replica_id"]

    # streaming: route, text pieces, done (whose text is the pieces)
    with r.http.stream("POST", "/v1/generate", json={"expert_set": set_id, "text": "hello", "expert": "e0",
                                                      "max_new_tokens": 5, "stream": True}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = _sse(resp.read().decode())
    kinds = [e for e, _ in events]
    assert kinds[0] == "route" and kinds[-1] == "done" and "text" in kinds
    assert "".join(d["text"] for e, d in events if e == "text") == events[-1][1]["text"]

    # bad input: a prompt longer than the context, an unknown expert, unknown sets, no key, another project
    long = r.http.post("/v1/generate", json={"expert_set": set_id, "text": "z" * 600, "expert": "e0"})
    assert long.status_code == 422 and "context is 512 tokens" in long.text
    assert long.json()["detail"][0]["loc"] == ["body", "text"]
    bad_expert = r.http.post("/v1/generate", json={"expert_set": set_id, "text": "x", "expert": "e7"})
    assert bad_expert.status_code == 422 and "expert 'e7' is not in the expert set" in bad_expert.text
    for unknown in (str(uuid.uuid4()), "no-such-set"):
        miss = r.http.post("/v1/route", json={"expert_set": unknown, "text": "x"})
        assert miss.status_code == 404 and "unknown expert set" in miss.text
    assert httpx.post(f"{r.url}/v1/route", json={"expert_set": set_id, "text": "x"}).status_code == 401
    _, other = new_project_key("router-other")
    foreign = httpx.post(f"{r.url}/v1/route", json={"expert_set": set_id, "text": "x"},
                         headers={"Authorization": f"Bearer {other}"})
    assert foreign.status_code == 404

    # an expert set whose adapter was trained on another base: its replica refuses it, naming the expert, and
    # replica a keeps serving
    r.procs.start("worker-b", "worker", "--kind", "router")
    bad_id = _register(project, _mismatched(tmp_path / "bad-set"), "bad-set")
    c = r.submit(expert_set=f"artifact:{bad_id}", name="replica-bad")
    job = wait_for(lambda: (j := r.http.get(f"/v1/jobs/{c}").json())["status"] in ("failed", "cancelled") and j,
                   timeout=120, what="the mismatched set's router job to fail", on_timeout=r.diagnostics)
    reason = job["status_reason"]  # type: ignore[index]
    assert "expert 'e1'" in reason and "does not have" in reason, job
    ok = r.http.post("/v1/route", json={"expert_set": set_id, "text": router_set.topic_text(0)})
    assert ok.status_code == 200 and ok.json()["expert"] == "e0"
    localstack.stop(r.procs.procs.pop("worker-b"), timeout=20)

    # a replica of e1 and e2 on a worker whose replicas stay "loading" long enough to be killed mid-load
    r.procs.start("worker-c", "worker", "--kind", "router", env={"CRUCIBLE_ROUTER_LOAD_DELAY_S": "60"})
    b = r.submit(expert_set=set_id, experts=["e1", "e2"], name="replica-b")
    mid = r.wait_state(set_id, b, "loading")
    loading = r.http.post("/v1/generate", json={"expert_set": set_id, "text": "x", "expert": "e2"})
    assert loading.status_code == 503 and "still loading" in loading.text and "Retry-After" in loading.headers
    pids = processes_of_job(b)
    assert pids, r.diagnostics()
    for pid in pids:
        sigkill(pid)
    wait_for(lambda: all(x["replica_id"] != mid["replica_id"] for x in r.table(set_id)), timeout=20,
             what="the killed replica's entry to lapse")
    gone = r.http.post("/v1/generate", json={"expert_set": set_id, "text": "x", "expert": "e2", "timeout_s": 10})
    assert gone.status_code == 503 and "serves expert 'e2'" in gone.text
    again = r.http.post("/v1/generate", json={"expert_set": set_id, "text": "still there?", "expert": "e1",
                                              "max_new_tokens": 3})
    assert again.status_code == 200 and again.json()["replica"] == ready["replica_id"]

    # cancel: the replicas withdraw and the jobs end cancelled
    for job_id in (a, b):
        r.http.post(f"/v1/jobs/{job_id}/cancel")
    wait_for(lambda: r.http.get(f"/v1/jobs/{a}").json()["status"] == "cancelled", timeout=60, what="a cancelled",
             on_timeout=r.diagnostics)
    assert all(x["job_id"] != a for x in r.table(set_id))
    after = r.http.post("/v1/route", json={"expert_set": set_id, "text": "x", "timeout_s": 5})
    assert after.status_code == 503 and "no ready router replica" in after.text


def _mismatched(directory: Path) -> Path:
    """The tiny set with expert e1's adapter replaced by one trained on a GPT-2 (other layer names)."""
    import shutil

    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    router_set.build(directory, n_experts=2, name="bad-set")
    gpt2 = get_peft_model(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                                     vocab_size=258)),
                          LoraConfig(r=4, target_modules=["c_attn"]))
    shutil.rmtree(directory / "adapters" / "e1")
    gpt2.save_pretrained(str(directory / "adapters" / "e1"))
    return directory
