"""Prometheus metrics and the container probes.

Unit tests need nothing; the ones marked ``integration`` scrape ``/metrics`` of the real app against the test
Postgres and Redis, with the real Celery app publishing to the real queues.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import timedelta

import pytest
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select, update
from typer.testing import CliRunner

from services.metrics import collectors, install_metrics
from services.metrics import snapshot as snapshot_mod
from services.metrics.middleware import UNMATCHED
from shared.kinds import queue_for
from tests.deploy.conftest import ROOT

QUEUE = queue_for("ssl-trainer")
TINY = {"kind": "ssl-train", "dataset": "builtin://shapes", "limit_train": 256, "batch_size": 64, "bank_size": 128,
        "epochs": 1}


def latency_samples() -> dict[tuple[str, str, str], float]:
    """(method, route, status) -> observation count, read from the histogram itself (no DB-backed collectors)."""
    out = {}
    for metric in collectors.API_LATENCY.collect():
        for s in metric.samples:
            if s.name.endswith("_count"):
                out[(s.labels["method"], s.labels["route"], s.labels["status"])] = s.value
    return out


# --- unit ---------------------------------------------------------------------------------------------------------
def test_request_latency_is_labelled_by_route_template():
    app = FastAPI()
    things = APIRouter(prefix="/things")

    @things.get("/{thing_id}")
    def get_thing(thing_id: str) -> dict[str, str]:
        return {"id": thing_id}

    app.include_router(things, prefix="/v9")

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("boom")

    install_metrics(app)
    before = latency_samples()
    with TestClient(app, raise_server_exceptions=False) as c:
        for i in range(3):
            assert c.get(f"/v9/things/{i}").status_code == 200
        assert c.get("/no/such/path").status_code == 404
        assert c.get("/boom").status_code == 500
    after = latency_samples()

    def delta(key: tuple[str, str, str]) -> float:
        return after.get(key, 0) - before.get(key, 0)

    assert delta(("GET", "/v9/things/{thing_id}", "200")) == 3, "one series per route template (with prefixes)"
    assert delta(("GET", UNMATCHED, "404")) == 1
    assert delta(("GET", "/boom", "500")) == 1, "unhandled errors are counted as 500"
    assert not [k for k in after if "things" in k[1] and k[1] != "/v9/things/{thing_id}"]


def test_dashboard_queries_only_metrics_the_control_plane_exposes():
    snap = snapshot_mod.Snapshot(taken_at=snapshot_mod.utcnow())
    snap.queues = {"ssl-trainer": snapshot_mod.QueueState("ssl-trainer", QUEUE)}
    snap.workers = [snapshot_mod.WorkerState("w1", "ssl-trainer", "h", 3.0, True)]
    snap.jobs = {("queued", "ssl-train"): 1}
    for totals in (snap.attempts, snap.retries, snap.infra_failures, snap.user_failures):
        totals["ssl-train"] = 1
    families = [*collectors._job_families(snap), *collectors._queue_families(snap),
                *collectors._worker_families(snap), *collectors.API_LATENCY.collect()]
    exposed = {s.name for f in families for s in f.samples} | {"crucible_metrics_read_errors"}
    dashboard = json.loads((ROOT / "k8s" / "monitoring" / "crucible-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"\bcrucible_[a-z_]+", e)}
    assert used and not used - exposed, f"the dashboard queries metrics nobody exposes: {sorted(used - exposed)}"
    buckets = [s for f in families if f.name == "crucible_dispatch_latency_seconds" for s in f.samples]
    assert any(s.name == "crucible_dispatch_latency_seconds_bucket" for s in buckets), "histogram_quantile needs it"


# --- integration: /metrics against the real stack ---------------------------------------------------------------
def scrape(client) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(metrics, name: str, **labels: str) -> float:
    series = metrics.get(name, {})
    matches = [v for k, v in series.items() if all(dict(k).get(lk) == lv for lk, lv in labels.items())]
    assert matches, f"{name}{labels} not exposed; have {sorted(series)[:5]}"
    return sum(matches)


@pytest.fixture
def fresh_snapshots(monkeypatch):
    monkeypatch.setattr(snapshot_mod, "SNAPSHOT_TTL_SECONDS", 0.0)


@pytest.mark.integration
def test_queue_depth_follows_jobs_through_the_broker(client, auth, fresh_snapshots):
    import redis
    from kombu.simple import SimpleQueue

    from services.scheduler.dispatcher import dispatch_once
    from shared.celery_app import get_celery
    from shared.config import get_settings
    from shared.db import session_scope
    from shared.models import Job, JobStatus, Outbox, utcnow

    settings = get_settings()
    # The suite shares one database and broker: hide earlier tests' runnable rows and empty this queue's lists.
    with session_scope() as s:
        s.execute(update(Outbox).where(Outbox.published_at.is_(None)).values(published_at=utcnow(),
                                                                              last_error="hidden by test"))
        s.execute(update(Job).where(Job.status == JobStatus.DISPATCHED).values(status=JobStatus.CANCELLED))
    r = redis.Redis.from_url(settings.BROKER_URL)
    r.delete(*[QUEUE, *(f"{QUEUE}\x06\x16{p}" for p in (3, 6, 9))])

    m0 = scrape(client)
    assert value(m0, "crucible_queue_depth", queue=QUEUE, source="redis") == 0

    ids = []
    for _ in range(2):
        resp = client.post("/v1/jobs", json=TINY, headers=auth)
        assert resp.status_code == 201, resp.json()
        ids.append(resp.json()["id"])
    before_scrape = utcnow()
    m1 = scrape(client)
    assert value(m1, "crucible_queue_depth", queue=QUEUE) == 0, "submitted jobs wait in the outbox, not the broker"
    assert value(m1, "crucible_queue_demand", queue=QUEUE) - value(m0, "crucible_queue_demand", queue=QUEUE) == 2
    assert value(m1, "crucible_jobs", state="queued", kind="ssl-train") - \
        value(m0, "crucible_jobs", state="queued", kind="ssl-train") == 2
    # The age is that of the oldest waiting job of this queue (ours, or one an earlier test left queued), read
    # from a snapshot taken at most SNAPSHOT_TTL_SECONDS before the scrape: 0 would mean "nothing waits".
    with session_scope() as s:
        oldest = s.scalar(select(func.min(Job.queued_at)).where(
            Job.worker_kind == "ssl-trainer", Job.status.in_([JobStatus.QUEUED, JobStatus.DISPATCHED])))
    assert oldest is not None
    age = value(m1, "crucible_queue_oldest_waiting_age_seconds", queue=QUEUE)
    lo = (before_scrape - oldest).total_seconds() - snapshot_mod.SNAPSHOT_TTL_SECONDS - 0.5
    hi = (utcnow() - oldest).total_seconds() + 0.5
    assert age > 0 and lo <= age <= hi, (age, lo, hi)

    with session_scope() as s:
        stats = dispatch_once(s, get_celery(), settings)
    assert stats.published == 2 and stats.broker_error is None, stats
    m2 = scrape(client)
    assert value(m2, "crucible_queue_depth", queue=QUEUE) == 2
    assert value(m2, "crucible_jobs", state="dispatched", kind="ssl-train") == 2
    assert value(m2, "crucible_dispatch_latency_seconds_gcount", queue=QUEUE) >= 2
    queues = client.get("/metrics/queues").json()
    assert queues["ssl-trainer"]["depth"] == 2 and queues["ssl-trainer"]["dispatched"] == 2
    assert queues["_meta"]["depth_source"] == "redis" and not queues["_meta"]["errors"]

    # Consume the messages as a worker would (kombu, with acks) and watch the depth fall.
    app = get_celery()
    consumed = []
    with app.connection_for_read() as conn, SimpleQueue(conn, app.amqp.queues[QUEUE]) as q:
        for expected_depth in (1, 0):
            msg = q.get(timeout=10)
            consumed.append(msg.payload[0][0])  # Celery protocol 2: (args, kwargs, embed); args = (job_id, attempt)
            msg.ack()
            assert value(scrape(client), "crucible_queue_depth", queue=QUEUE) == expected_depth
    assert sorted(consumed) == sorted(ids)

    text = client.get("/metrics").text
    assert re.search(r'crucible_api_request_duration_seconds_count\{method="POST",route="/v1/jobs",status="201"\}',
                     text), "API latency is recorded by route template"


@pytest.mark.integration
def test_worker_probe_and_heartbeat_metric_follow_the_workers_table(client, fresh_snapshots):
    from services.cli.main import app as cli
    from shared.db import session_scope
    from shared.models import Worker, utcnow

    host = f"probe-test-{uuid.uuid4().hex[:8]}"
    wid = f"ssl-trainer@{host}-1"
    runner = CliRunner()
    try:
        with session_scope() as s:
            s.add(Worker(id=wid, kind="ssl-trainer", hostname=host, pid=1))
        ok = runner.invoke(cli, ["probe", "worker", "--hostname", host, "--max-age", "60"])
        assert ok.exit_code == 0 and wid in ok.output, ok.output
        ages = scrape(client)["crucible_worker_heartbeat_age_seconds"]
        assert any(dict(k).get("worker") == wid and v < 60 for k, v in ages.items())

        with session_scope() as s:
            s.execute(update(Worker).where(Worker.id == wid)
                      .values(last_heartbeat_at=utcnow() - timedelta(seconds=600)))
        stale = runner.invoke(cli, ["probe", "worker", "--hostname", host, "--max-age", "120"])
        assert stale.exit_code == 1 and "last heartbeat" in stale.output, stale.output
        assert value(scrape(client), "crucible_workers", kind="ssl-trainer", state="stale") >= 1
    finally:
        with session_scope() as s:
            s.execute(Worker.__table__.delete().where(Worker.id == wid))
    missing = runner.invoke(cli, ["probe", "worker", "--hostname", f"{host}-gone"])
    assert missing.exit_code == 1 and "no worker registered" in missing.output


@pytest.mark.integration
def test_scheduler_probe_passes_against_the_stack(stack, tmp_path, monkeypatch):
    from services.cli.main import app as cli
    from shared.config import get_settings

    # No scheduler has run in this container yet: the probe must then check the database and the broker only.
    monkeypatch.setattr(get_settings(), "SCHEDULER_ALIVE_FILE", tmp_path / "scheduler.alive")
    result = CliRunner().invoke(cli, ["probe", "scheduler"])
    assert result.exit_code == 0, result.output


@pytest.mark.integration
def test_scheduler_probe_fails_when_the_loop_stopped_cycling(stack, tmp_path, monkeypatch):
    import os

    from typer.testing import CliRunner

    from services.cli.main import app as cli
    from shared.config import get_settings

    alive = tmp_path / "scheduler.alive"
    monkeypatch.setattr(get_settings(), "SCHEDULER_ALIVE_FILE", alive)
    alive.touch()
    assert CliRunner().invoke(cli, ["probe", "scheduler", "--max-age", "60"]).exit_code == 0
    os.utime(alive, (0, 0))  # last cycle in 1970: hung
    result = CliRunner().invoke(cli, ["probe", "scheduler", "--max-age", "60"])
    assert result.exit_code == 1 and "hung" in result.output
