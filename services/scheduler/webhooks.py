"""Webhook delivery: the scheduler's courier for ``webhook_deliveries`` rows (see shared/webhooks.py).

Each cycle ``Courier.run_once`` takes a few due rows with ``FOR UPDATE SKIP LOCKED`` in one short transaction,
leases them (``next_attempt_at`` pushed past the POST's timeout, ``attempts + 1``) and hands them to a small
thread pool; it never waits for a POST. So a receiver that fails, hangs or drips its answer costs the scheduler
nothing: dispatch and reconcile run every cycle. Each thread POSTs once and records the outcome in its own
transaction: 2xx is delivered; anything else is retried after 2^attempts s (with jitter, capped) until
``WEBHOOK_MAX_ATTEMPTS``, then the row is failed with its last error. A scheduler that dies mid-POST leaves a
lease that expires, and another replica retries the row.

Finished rows (delivered or failed) older than ``WEBHOOK_RETENTION_DAYS`` are deleted a batch at a time, at most
every ``PRUNE_EVERY_S`` per scheduler, so the table stays the size of the recent history.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta

import httpx
from sqlalchemy import delete, select, update

from shared.config import Settings
from shared.db import session_scope
from shared.models import Webhook, WebhookDelivery, utcnow
from shared.webhooks import DELIVERY_HEADER, EVENT_HEADER, SIGNATURE_HEADER, UnsafeTarget, check_target, sign

log = logging.getLogger(__name__)
MAX_ERROR_CHARS = 500


@dataclass(frozen=True)
class _Send:
    id: uuid.UUID
    attempt: int  # the attempt this lease is for: the outcome is recorded only if the row is still on it
    url: str
    secret: str
    event: str
    body: bytes


PRUNE_EVERY_S = 300.0
PRUNE_BATCH = 1000


def prune_deliveries(settings: Settings, *, batch: int = PRUNE_BATCH) -> int:
    """Delete up to ``batch`` delivered/failed deliveries created before the retention window; returns how many.
    Pending rows are kept whatever their age: they are still owed to a receiver."""
    if settings.WEBHOOK_RETENTION_DAYS <= 0:
        return 0
    cutoff = utcnow() - timedelta(days=settings.WEBHOOK_RETENTION_DAYS)
    with session_scope() as s:
        old = (select(WebhookDelivery.id).where(WebhookDelivery.status.in_(("delivered", "failed")),
                                                WebhookDelivery.created_at < cutoff).limit(batch))
        result = s.execute(delete(WebhookDelivery).where(WebhookDelivery.id.in_(old))
                           .execution_options(synchronize_session=False))
        return int(result.rowcount or 0)  # type: ignore[attr-defined]


def backoff_seconds(attempts: int, settings: Settings) -> float:
    """Wait after the ``attempts``-th failure: 2^attempts s, capped, times a jitter in [0.5, 1]."""
    return min(settings.WEBHOOK_BACKOFF_CAP_SECONDS, 2.0 ** attempts) * random.uniform(0.5, 1.0)


class Courier:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.workers = max(1, settings.WEBHOOK_BATCH)
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="webhook")
        self._in_flight = 0
        self._lock = threading.Lock()
        self._pruned_at = 0.0

    def run_once(self) -> list[Future[str]]:
        """Lease due deliveries (no more than the pool has room for) and start their POSTs; returns at once.
        Every ``PRUNE_EVERY_S`` it also deletes a batch of finished deliveries past their retention."""
        if time.monotonic() - self._pruned_at >= PRUNE_EVERY_S:
            self._pruned_at = time.monotonic()
            if (n := prune_deliveries(self.settings)):
                log.info("deleted %d webhook deliveries older than %g days", n, self.settings.WEBHOOK_RETENTION_DAYS)
        with self._lock:
            room = self.workers - self._in_flight
        if room <= 0:
            return []
        sends = self._lease(room)
        futures = []
        for s in sends:
            with self._lock:
                self._in_flight += 1
            futures.append(self._pool.submit(self._deliver, s))
        return futures

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _lease(self, limit: int) -> list[_Send]:
        now = utcnow()
        lease = timedelta(seconds=self.settings.WEBHOOK_TIMEOUT_SECONDS * 2 + 5)
        with session_scope() as session:
            rows = session.execute(
                select(WebhookDelivery, Webhook)
                .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
                .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
                .order_by(WebhookDelivery.next_attempt_at)
                .limit(limit)
                .with_for_update(of=WebhookDelivery, skip_locked=True)
            ).all()
            sends = []
            for d, hook in rows:
                d.attempts += 1
                d.next_attempt_at = now + lease
                body = json.dumps({**d.payload, "delivery_id": str(d.id)}, sort_keys=True).encode()
                sends.append(_Send(d.id, d.attempts, hook.url, hook.secret, d.event, body))
        return sends

    def _deliver(self, s: _Send) -> str:
        try:
            error = self._post(s)
            self._record(s, error)
            return error or "delivered"
        except Exception as e:  # the database blinked: the lease expires and the row is retried
            log.warning("webhook delivery %s: could not record the outcome: %s", s.id, e)
            return f"unrecorded: {e}"
        finally:
            with self._lock:
                self._in_flight -= 1

    def _post(self, s: _Send) -> str | None:
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(s.secret, s.body),
                   EVENT_HEADER: s.event, DELIVERY_HEADER: str(s.id), "User-Agent": "crucible-webhooks"}
        try:
            check_target(s.url, allow_private=self.settings.webhooks_may_reach_private)
        except UnsafeTarget as e:  # the name resolves elsewhere now than when the hook was registered
            return str(e)[:MAX_ERROR_CHARS]
        try:
            r = httpx.post(s.url, content=s.body, headers=headers, timeout=self.settings.WEBHOOK_TIMEOUT_SECONDS,
                           follow_redirects=False)
        except httpx.HTTPError as e:
            return f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS] or type(e).__name__
        if 200 <= r.status_code < 300:
            return None
        return f"HTTP {r.status_code}: {r.text[:200]}"[:MAX_ERROR_CHARS]

    def _record(self, s: _Send, error: str | None) -> None:
        now = utcnow()
        values: dict[str, object]
        if error is None:
            values = {"status": "delivered", "delivered_at": now, "last_error": None}
        elif s.attempt >= self.settings.WEBHOOK_MAX_ATTEMPTS:
            values = {"status": "failed", "last_error": error}
            log.warning("webhook delivery %s failed after %d attempts: %s", s.id, s.attempt, error)
        else:
            values = {"last_error": error,
                      "next_attempt_at": now + timedelta(seconds=backoff_seconds(s.attempt, self.settings))}
        with session_scope() as session:
            # Guarded: a lease that expired and was taken again belongs to the newer attempt.
            session.execute(update(WebhookDelivery)
                            .where(WebhookDelivery.id == s.id, WebhookDelivery.attempts == s.attempt,
                                   WebhookDelivery.status == "pending")
                            .values(**values).execution_options(synchronize_session=False))
