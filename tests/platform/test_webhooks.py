"""Webhook delivery against local HTTP receivers (one that answers, one that fails, one that hangs), with the
deliveries written by the real state machine in real Postgres."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import uuid
from concurrent.futures import wait
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import select, update

from services.scheduler.dispatcher import dispatch_once
from services.scheduler.webhooks import Courier
from shared import lifecycle
from shared.config import get_settings
from shared.db import session_scope
from shared.models import Job, Outbox, WebhookDelivery, utcnow

pytestmark = pytest.mark.integration

TINY = {"kind": "ssl-train", "dataset": "builtin://shapes", "limit_train": 256, "batch_size": 64, "bank_size": 128,
        "epochs": 1}


class Receiver:
    """An HTTP server on a free local port that records each POST and answers ``code`` after ``delay`` s."""

    def __init__(self, code: int = 200, delay: float = 0.0) -> None:
        self.hits: list[tuple[dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.hits.append((dict(self.headers), body))
                time.sleep(delay)
                self.send_response(code)
                self.end_headers()
                self.wfile.write(b"ok" if code < 300 else b"receiver broke")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _submit(client, auth) -> uuid.UUID:
    r = client.post("/v1/jobs", json=TINY, headers=auth)
    assert r.status_code == 201, r.json()
    return uuid.UUID(r.json()["id"])


def _hook(client, auth, url, **body) -> dict:
    r = client.post("/v1/webhooks", json={"url": url, **body}, headers=auth)
    assert r.status_code == 201, r.json()
    return r.json()


def _deliveries(client, auth, hook_id) -> list[dict]:
    r = client.get(f"/v1/webhooks/{hook_id}/deliveries", headers=auth)
    assert r.status_code == 200, r.json()
    return r.json()


def _only_ours(hook_ids) -> None:
    """Tests share one database (schemathesis registers webhooks too): park other tests' pending deliveries."""
    ours = [uuid.UUID(str(h)) for h in hook_ids]
    with session_scope() as s:
        s.execute(update(WebhookDelivery)
                  .where(WebhookDelivery.status == "pending", WebhookDelivery.webhook_id.not_in(ours))
                  .values(status="failed", last_error="hidden by test"))


def test_a_job_that_ends_is_posted_signed_once(client, auth):
    rx = Receiver()
    courier = Courier(get_settings())
    try:
        hook = _hook(client, auth, rx.url, events=["job.succeeded"])
        assert len(hook["secret"]) == 64
        assert "secret" not in client.get("/v1/webhooks", headers=auth).json()[0]
        job_id = _submit(client, auth)
        with session_scope() as s:  # a terminal change that rolls back leaves no delivery behind
            lifecycle.claim(s, job_id=job_id, attempt=1, worker_id="w", lease_s=60)
        with pytest.raises(RuntimeError), session_scope() as s:
            lifecycle.finish_attempt(s, job_id=job_id, attempt=1, worker_id="w", outcome="succeeded")
            raise RuntimeError("rolled back")
        assert _deliveries(client, auth, hook["id"]) == []
        with session_scope() as s:
            lifecycle.finish_attempt(s, job_id=job_id, attempt=1, worker_id="w", outcome="succeeded")
        [pending] = _deliveries(client, auth, hook["id"])
        _only_ours([hook["id"]])
        assert pending["status"] == "pending" and pending["event"] == "job.succeeded"

        done, _ = wait(courier.run_once(), timeout=10)
        assert [f.result() for f in done] == ["delivered"]
        [(headers, body)] = rx.hits
        expected = "sha256=" + hmac.new(hook["secret"].encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["X-Crucible-Signature"], expected)
        assert headers["X-Crucible-Event"] == "job.succeeded" and headers["X-Crucible-Delivery"] == pending["id"]
        payload = json.loads(body)
        assert payload["job_id"] == str(job_id) and payload["status"] == "succeeded"
        [d] = _deliveries(client, auth, hook["id"])
        assert d["status"] == "delivered" and d["attempts"] == 1 and d["delivered_at"]
        assert courier.run_once() == [] and len(rx.hits) == 1  # delivered once, not again

        other = _submit(client, auth)  # job.cancelled is not among this hook's events
        with session_scope() as s:
            lifecycle.cancel(s, s.get(Job, other))
        assert len(_deliveries(client, auth, hook["id"])) == 1
    finally:
        courier.close()
        rx.close()


def test_failing_and_hanging_receivers_are_retried_then_failed_without_blocking_dispatch(client, auth):
    settings = get_settings().model_copy(update={"WEBHOOK_TIMEOUT_SECONDS": 0.5, "WEBHOOK_MAX_ATTEMPTS": 3,
                                                 "QUEUE_WINDOW": 10_000})  # other tests' jobs hold no window
    broken, hanging = Receiver(code=500), Receiver(delay=3.0)
    courier = Courier(settings)
    try:
        hooks = [_hook(client, auth, broken.url)["id"], _hook(client, auth, hanging.url)["id"]]
        with session_scope() as s:
            lifecycle.cancel(s, s.get(Job, _submit(client, auth)))
        waiting = _submit(client, auth)
        with session_scope() as s:  # tests share one database: only this job is left for the dispatcher
            s.execute(update(Outbox).where(Outbox.published_at.is_(None), Outbox.job_id != waiting)
                      .values(published_at=utcnow(), last_error="hidden by test"))
        _only_ours(hooks)
        sent: list[str] = []

        class Broker:
            def send_task(self, name, args, queue, retry):
                sent.append(args[0])

        for attempt in (1, 2, 3):
            started = time.monotonic()
            futures = courier.run_once()  # one scheduler cycle: webhooks, then dispatch
            assert len(futures) == 2 and time.monotonic() - started < 2.0  # did not wait for the hanging POST
            if attempt == 1:
                with session_scope() as s:
                    assert dispatch_once(s, Broker(), settings).published == 1
                # dispatch went ahead while the hanging POST is still open (the 500 one may have finished)
                assert sent == [str(waiting)] and any(not f.done() for f in futures)
            wait(futures, timeout=10)
            rows = [_deliveries(client, auth, h)[0] for h in hooks]
            assert [r["attempts"] for r in rows] == [attempt, attempt]
            assert "HTTP 500" in rows[0]["last_error"] and "Timeout" in rows[1]["last_error"]
            if attempt < 3:
                assert all(r["status"] == "pending" for r in rows)
                with session_scope() as s:  # backed off: 2^attempts s with jitter; not due yet
                    for d in s.scalars(select(WebhookDelivery).where(WebhookDelivery.webhook_id.in_(hooks))):
                        wait_s = (d.next_attempt_at - utcnow()).total_seconds()
                        assert 0.5 * 2 ** attempt - 1 < wait_s <= 2 ** attempt
                    assert courier.run_once() == []
                    s.execute(update(WebhookDelivery).where(WebhookDelivery.webhook_id.in_(hooks))
                              .values(next_attempt_at=utcnow() - timedelta(seconds=1)))
        assert all(r["status"] == "failed" for r in rows)
        assert len(broken.hits) == 3 and len(hanging.hits) == 3
        assert courier.run_once() == []  # given up: never sent again
    finally:
        courier.close()
        broken.close()
        hanging.close()


def test_webhooks_are_project_scoped_and_urls_validated(client, auth):
    from tests.conftest import new_project_key

    hook = _hook(client, auth, "https://hooks.example.com/x", events=["pipeline.failed"])
    other = {"Authorization": f"Bearer {new_project_key()[1]}"}
    assert client.get("/v1/webhooks", headers=other).json() == []
    assert client.delete(f"/v1/webhooks/{hook['id']}", headers=other).status_code == 404
    assert client.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=other).status_code == 404
    for bad in ("ftp://hooks.example.com/x", "not a url", "https://" + "a" * 2100, "http:///nohost"):
        r = client.post("/v1/webhooks", json={"url": bad}, headers=auth)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "url", (bad, r.json())
    r = client.post("/v1/webhooks", json={"url": "https://x.example", "events": ["job.exploded"]}, headers=auth)
    assert r.status_code == 422 and "events" in r.json()["detail"][0]["loc"]
    assert [h["id"] for h in client.get("/v1/webhooks", headers=auth).json()] == [hook["id"]]
    assert client.delete(f"/v1/webhooks/{hook['id']}", headers=auth).status_code == 204
    assert client.get("/v1/webhooks", headers=auth).json() == []
    assert client.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=auth).status_code == 404


def test_hooks_to_internal_addresses_are_refused_where_private_targets_are_not_allowed(client, auth, monkeypatch):
    """SSRF: in prod (or with CRUCIBLE_WEBHOOK_ALLOW_PRIVATE=false) a project cannot make the scheduler call the
    cloud metadata endpoint, loopback or cluster-internal services - not at registration, not at delivery."""
    from shared.config import reset_settings

    rx = Receiver()
    hook = _hook(client, auth, rx.url)  # registered while private targets were allowed (test env)
    monkeypatch.setenv("CRUCIBLE_WEBHOOK_ALLOW_PRIVATE", "false")
    reset_settings()
    courier = Courier(get_settings())
    try:
        for bad in ("http://127.0.0.1:9/x", "http://10.1.2.3/x", "http://169.254.169.254/latest/meta-data",
                    "http://[::1]/x", "http://[::ffff:127.0.0.1]/x", "http://localhost:8000/x", "http://0.0.0.0/x"):
            r = client.post("/v1/webhooks", json={"url": bad}, headers=auth)
            assert r.status_code == 422, (bad, r.json())
            assert r.json()["detail"][0]["loc"][-1] == "url" and "ALLOW_PRIVATE" in r.json()["detail"][0]["msg"]
        _only_ours([hook["id"]])
        with session_scope() as s:
            lifecycle.cancel(s, s.get(Job, _submit(client, auth)))
        wait(courier.run_once(), timeout=10)
        row = _deliveries(client, auth, hook["id"])[0]
        assert rx.hits == [] and row["status"] == "pending" and "127.0.0.1" in row["last_error"]
    finally:
        courier.close()
        rx.close()
        monkeypatch.delenv("CRUCIBLE_WEBHOOK_ALLOW_PRIVATE")
        reset_settings()


def test_pipelines_that_end_are_notified(client, auth):
    from services.scheduler.reconciler import reconcile_once

    rx = Receiver()
    courier = Courier(get_settings())
    try:
        hook = _hook(client, auth, rx.url, events=["pipeline.failed", "pipeline.cancelled"])
        one = {"name": "p1", "steps": {"train": TINY}}
        r = client.post("/v1/pipelines", json=one, headers=auth)
        assert r.status_code == 201, r.json()
        failing = r.json()
        job_id = uuid.UUID(failing["steps"][0]["jobs"][0]["id"])
        with session_scope() as s:  # its only job fails; the reconciler settles the pipeline as failed
            lifecycle.claim(s, job_id=job_id, attempt=1, worker_id="w", lease_s=60)
        with session_scope() as s:
            lifecycle.finish_attempt(s, job_id=job_id, attempt=1, worker_id="w", outcome="config_error",
                                     reason="bad spec")
        with session_scope() as s:
            reconcile_once(s, get_settings())
        r = client.post("/v1/pipelines", json=one, headers=auth)
        cancelled = r.json()
        assert client.post(f"/v1/pipelines/{cancelled['id']}/cancel", headers=auth).status_code == 202
        _only_ours([hook["id"]])
        wait(courier.run_once(), timeout=10)
        got = sorted((h["X-Crucible-Event"], json.loads(b)["pipeline_id"]) for h, b in rx.hits)
        assert got == [("pipeline.cancelled", cancelled["id"]), ("pipeline.failed", failing["id"])]
        assert {d["status"] for d in _deliveries(client, auth, hook["id"])} == {"delivered"}
    finally:
        courier.close()
        rx.close()


def test_cli_adds_lists_and_removes_webhooks(client, auth, monkeypatch):
    from typer.testing import CliRunner

    import services.cli.webhooks as cli_webhooks
    from services.cli.client import Client
    from services.cli.main import app as cli

    def api_client() -> Client:  # the CLI's client, over the in-process app
        c = Client("http://testserver", auth["Authorization"][7:])
        c.http = client
        client.headers.update(auth)
        return c

    monkeypatch.setattr(cli_webhooks, "Client", api_client)
    try:
        r = CliRunner().invoke(cli, ["webhooks", "add", "https://hooks.example.com/cli", "-e", "job.failed"])
        assert r.exit_code == 0 and "secret: " in r.output, r.output
        hook_id = r.output.split()[1]
        r = CliRunner().invoke(cli, ["webhooks", "list"])
        assert r.exit_code == 0 and hook_id in r.output and "job.failed" in r.output
        assert CliRunner().invoke(cli, ["webhooks", "rm", hook_id]).exit_code == 0
        r = CliRunner().invoke(cli, ["webhooks", "add", "ftp://nope"])
        assert r.exit_code == 1 and "error:" in r.output and "http" in r.output
    finally:
        for k in auth:
            client.headers.pop(k, None)


def test_the_scheduler_loop_delivers(client, auth):
    from services.scheduler.loop import run_scheduler
    from tests.conftest import wait_for

    rx = Receiver()
    stop = threading.Event()
    loop = threading.Thread(target=run_scheduler, args=(stop,), daemon=True)
    try:
        hook = _hook(client, auth, rx.url, events=["job.cancelled"])
        with session_scope() as s:
            lifecycle.cancel(s, s.get(Job, _submit(client, auth)))
        _only_ours([hook["id"]])
        with session_scope() as s:
            # tests share one database: leave other tests' queued jobs off the broker
            s.execute(update(Outbox).where(Outbox.published_at.is_(None))
                      .values(published_at=utcnow(), last_error="hidden by test"))
        loop.start()
        wait_for(lambda: rx.hits, timeout=20, what="the scheduler loop to POST the webhook")
        assert rx.hits[0][0]["X-Crucible-Event"] == "job.cancelled"
    finally:
        stop.set()
        rx.close()
    loop.join(timeout=10)
    assert not loop.is_alive()  # the loop stops when asked, its webhook threads with it


def test_finished_deliveries_past_retention_are_deleted_and_pending_ones_kept(client, auth):
    from services.scheduler.webhooks import prune_deliveries

    hook = _hook(client, auth, "http://127.0.0.1:9/unused")
    old, recent = utcnow() - timedelta(days=31), utcnow() - timedelta(days=29)
    rows = {"old-delivered": ("delivered", old), "old-failed": ("failed", old), "old-pending": ("pending", old),
            "recent-delivered": ("delivered", recent)}
    ids = {}
    with session_scope() as s:
        for name, (status, created) in rows.items():
            d = WebhookDelivery(webhook_id=uuid.UUID(hook["id"]), event="job.succeeded", payload={"n": name},
                                status=status, created_at=created,
                                next_attempt_at=utcnow() + timedelta(days=1))  # not due: the courier leaves it
            s.add(d)
            s.flush()
            ids[name] = d.id
    settings = get_settings().model_copy(update={"WEBHOOK_RETENTION_DAYS": 30.0})
    while prune_deliveries(settings, batch=1):  # batches until nothing is left to delete
        pass
    with session_scope() as s:
        left = {n for n, i in ids.items() if s.get(WebhookDelivery, i) is not None}
    assert left == {"old-pending", "recent-delivered"}
    kept = get_settings().model_copy(update={"WEBHOOK_RETENTION_DAYS": 0.0})
    assert prune_deliveries(kept) == 0  # 0 keeps everything
