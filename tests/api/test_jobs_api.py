"""POST/GET /v1/jobs, cancel, events: validation, idempotency, isolation, dependencies. Real Postgres."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import func, select

from shared.db import session_scope
from shared.models import Job, JobEvent, Outbox

pytestmark = pytest.mark.integration

TINY = {"kind": "ssl-train", "dataset": "builtin://shapes", "limit_train": 256, "batch_size": 64, "bank_size": 128,
        "epochs": 1}


def _project_counts(headers: dict[str, str]) -> tuple[int, int, int]:
    from services.projects.service import hash_key
    from shared.models import ApiKey

    token = headers["Authorization"].split(" ", 1)[1]
    with session_scope() as s:
        pid = s.scalar(select(ApiKey.project_id).where(ApiKey.key_hash == hash_key(token)))
        jobs = s.scalar(select(func.count()).select_from(Job).where(Job.project_id == pid))
        outbox = s.scalar(select(func.count()).select_from(Outbox).join(Job).where(Job.project_id == pid))
        events = s.scalar(select(func.count()).select_from(JobEvent).join(Job).where(Job.project_id == pid))
    return jobs, outbox, events


def test_submit_writes_job_outbox_and_event_together(client, auth):
    r = client.post("/v1/jobs", json={**TINY, "name": "first", "experiment": "exp-a", "priority": 5}, headers=auth)
    assert r.status_code == 201, r.json()
    job = r.json()
    assert job["status"] == "queued" and job["attempt"] == 1 and job["priority"] == 5
    assert job["spec"]["topk"] == 5 and job["inputs"]["dataset"]["stats"]["train"] == 5000
    assert _project_counts(auth) == (1, 1, 2)  # job, its outbox row, submitted + queued events
    with session_scope() as s:
        ob = s.scalars(select(Outbox).where(Outbox.job_id == uuid.UUID(job["id"]))).one()
        assert ob.queue == "crucible.ssl-trainer" and ob.attempt == 1 and ob.published_at is None
    exps = client.get("/v1/experiments", headers=auth).json()
    assert [e["name"] for e in exps] == ["exp-a"]


@pytest.mark.parametrize("patch,loc_tail,needle", [
    ({"bogus": 1}, "bogus", "Extra inputs"),
    ({"bank_size": 100}, "bank_size", "multiple of batch_size"),
    ({"dataset": "builtin://cifar"}, "dataset", "unknown builtin dataset"),
    ({"epochs": 0}, "epochs", "greater than or equal to 1"),
    ({"method": "byol", "topk": 5}, "topk", "topk=1"),
    ({"resources": {"gpus": 1, "tpus": 2}}, "tpus", "Extra inputs"),
    ({"limit_train": 32}, "batch_size", "limit_train"),
    ({"kind": "no-such-kind"}, "kind", "unknown job kind 'no-such-kind'; one of: ssl-train"),
])
def test_bad_specs_get_422_naming_the_field_and_write_nothing(client, auth, patch, loc_tail, needle):
    r = client.post("/v1/jobs", json={**TINY, **patch}, headers=auth)
    assert r.status_code == 422, r.json()
    details = r.json()["detail"]
    assert any(d["loc"][-1] == loc_tail and needle in d["msg"] for d in details), details
    assert _project_counts(auth) == (0, 0, 0)


def test_bank_larger_than_dataset_is_rejected_with_a_fix(client, auth):
    r = client.post("/v1/jobs", json={**TINY, "dataset": "builtin://digits", "limit_train": None,
                                      "bank_size": 4096}, headers=auth)
    assert r.status_code == 422
    (d,) = r.json()["detail"]
    assert d["loc"] == ["body", "bank_size"] and "1437 training images" in d["msg"] and "at most 1408" in d["msg"]
    assert _project_counts(auth) == (0, 0, 0)


def test_unknown_dataset_and_parent_are_404_and_failed_parent_is_409(client, auth):
    r = client.post("/v1/jobs", json={**TINY, "dataset": "no-such-dataset"}, headers=auth)
    assert r.status_code == 404 and r.json()["detail"][0]["loc"] == ["body", "dataset"]
    r = client.post("/v1/jobs", json={**TINY, "depends_on": [str(uuid.uuid4())]}, headers=auth)
    assert r.status_code == 404 and r.json()["detail"][0]["loc"] == ["body", "depends_on", 0]
    parent = client.post("/v1/jobs", json=TINY, headers=auth).json()
    client.post(f"/v1/jobs/{parent['id']}/cancel", headers=auth)
    r = client.post("/v1/jobs", json={**TINY, "depends_on": [parent["id"]]}, headers=auth)
    assert r.status_code == 409 and "cancelled" in r.json()["detail"][0]["msg"]
    assert _project_counts(auth)[0] == 1  # only the parent


def test_idempotency_key_replays_and_conflicts(client, auth):
    h = {**auth, "Idempotency-Key": "run-42"}
    first = client.post("/v1/jobs", json=TINY, headers=h)
    again = client.post("/v1/jobs", json=TINY, headers=h)
    assert first.status_code == 201 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    other = client.post("/v1/jobs", json={**TINY, "epochs": 2}, headers=h)
    assert other.status_code == 409 and other.json()["detail"][0]["loc"] == ["header", "idempotency-key"]
    assert _project_counts(auth)[0] == 1


def test_projects_are_isolated(client, auth):
    from tests.conftest import new_project_key

    job = client.post("/v1/jobs", json=TINY, headers=auth).json()
    _, other_token = new_project_key("other")
    other = {"Authorization": f"Bearer {other_token}"}
    for method, path in [("GET", f"/v1/jobs/{job['id']}"), ("POST", f"/v1/jobs/{job['id']}/cancel"),
                         ("GET", f"/v1/jobs/{job['id']}/events")]:
        assert client.request(method, path, headers=other).status_code == 404
    assert client.get("/v1/jobs", headers=other).json()["total"] == 0
    assert client.post("/v1/jobs", json={**TINY, "depends_on": [job["id"]]}, headers=other).status_code == 404
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth).json()["status"] == "queued"


def test_authentication_is_required(client, auth):
    assert client.get("/v1/jobs").status_code == 401
    r = client.get("/v1/jobs", headers={"Authorization": "Bearer crk_not-a-real-key"})
    assert r.status_code == 401 and "crucible keys create" in r.json()["detail"][0]["msg"]


def test_list_filters_and_paginates(client, auth):
    ids = [client.post("/v1/jobs", json={**TINY, "experiment": f"e{i % 2}"}, headers=auth).json()["id"]
           for i in range(5)]
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=auth)
    page = client.get("/v1/jobs", params={"limit": 2, "offset": 0}, headers=auth).json()
    assert page["total"] == 5 and len(page["items"]) == 2
    assert client.get("/v1/jobs", params={"status": "cancelled"}, headers=auth).json()["total"] == 1
    assert client.get("/v1/jobs", params={"experiment": "e1"}, headers=auth).json()["total"] == 2
    assert client.get("/v1/jobs", params={"kind": "distill"}, headers=auth).json()["total"] == 0
    assert client.get("/v1/jobs", params={"status": "nonsense"}, headers=auth).status_code == 422


def test_cancel_queued_job_and_cancel_twice(client, auth):
    job = client.post("/v1/jobs", json=TINY, headers=auth).json()
    r = client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    r = client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
    assert r.status_code == 409
    types = [e["type"] for e in client.get(f"/v1/jobs/{job['id']}/events", headers=auth).json()]
    assert types == ["submitted", "state", "state"]


def test_events_stream_as_server_sent_events_until_the_job_ends(client, auth):
    job = client.post("/v1/jobs", json=TINY, headers=auth).json()
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
    with client.stream("GET", f"/v1/jobs/{job['id']}/events", params={"follow": "true"}, headers=auth) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        body = "".join(r.iter_text())
    assert body.count("event: state") == 2 and body.rstrip().endswith("data: {}")
    first_id = int(body.split("id: ", 1)[1].split("\n", 1)[0])
    with client.stream("GET", f"/v1/jobs/{job['id']}/events", params={"follow": "true"},
                       headers={**auth, "Last-Event-ID": str(first_id)}) as r:
        resumed = "".join(r.iter_text())
    assert f"id: {first_id}\n" not in resumed and "event: state" in resumed


def test_dependencies_wait_then_run_or_fail(client, auth):
    from services.scheduler.reconciler import reconcile_once
    from shared import lifecycle
    from shared.config import get_settings

    parent = client.post("/v1/jobs", json=TINY, headers=auth).json()
    child = client.post("/v1/jobs", json={**TINY, "depends_on": [parent["id"]]}, headers=auth).json()
    doomed_parent = client.post("/v1/jobs", json=TINY, headers=auth).json()
    doomed = client.post("/v1/jobs", json={**TINY, "depends_on": [doomed_parent["id"], parent["id"]]},
                         headers=auth).json()
    assert child["status"] == "pending" and child["depends_on"] == [parent["id"]]
    with session_scope() as s:  # parent runs and succeeds; the other parent fails
        for pid, outcome in ((parent["id"], lifecycle.SUCCEEDED), (doomed_parent["id"], lifecycle.CONFIG_ERROR)):
            assert lifecycle.claim(s, job_id=uuid.UUID(pid), attempt=1, worker_id="w", lease_s=60) is not None
            lifecycle.finish_attempt(s, job_id=uuid.UUID(pid), attempt=1, worker_id="w", outcome=outcome)
    with session_scope() as s:
        reconcile_once(s, get_settings())
    assert client.get(f"/v1/jobs/{child['id']}", headers=auth).json()["status"] == "queued"
    failed = client.get(f"/v1/jobs/{doomed['id']}", headers=auth).json()
    assert failed["status"] == "failed" and doomed_parent["id"] in failed["status_reason"]

