"""``crucible scheduler``: run the dispatcher and the reconciler forever (several replicas are safe:
rows are taken with ``FOR UPDATE SKIP LOCKED``)."""

from __future__ import annotations

import logging
import threading
import time

from celery import Celery

from services.scheduler.dispatcher import dispatch_once
from services.scheduler.reconciler import close_runs, reconcile_once
from services.scheduler.wakeup import Wakeup
from services.scheduler.webhooks import Courier
from services.sweeps import controller as sweep_controller
from shared.celery_app import get_celery
from shared.config import Settings, get_settings
from shared.db import check_schema, session_scope

log = logging.getLogger("crucible.scheduler")


def run_scheduler(stop: threading.Event | None = None) -> None:
    settings = get_settings()
    check_schema()
    celery = get_celery()
    tracker = None
    stop = stop or threading.Event()
    courier = Courier(settings)  # webhook POSTs run in its threads: a slow receiver never stalls a cycle
    wakeup = Wakeup(settings).start()  # LISTEN/NOTIFY on Postgres: a submission is dispatched at once
    log.info("scheduler started (interval %.1fs, queue window %d)", settings.SCHEDULER_INTERVAL_SECONDS,
             settings.QUEUE_WINDOW)
    while not stop.is_set():
        started = time.monotonic()
        try:
            with session_scope() as session:
                r = reconcile_once(session, settings)
            if r.lease_expired or r.redispatched or r.promoted or r.dependency_failed:
                log.info("reconciled: %s", r)
            if r.runs_to_close:
                if tracker is None:
                    from shared.tracking import Tracker

                    tracker = Tracker(settings)
                close_runs(tracker, r.runs_to_close)
            _sync_pipeline_runs(settings)
            sweep_controller.run_once(settings)  # trials: ask optuna, submit, report, prune, tell (never raises)
            with session_scope() as session:
                d = dispatch_once(session, celery, settings)
            if d.published:
                log.info("dispatched %d job(s): %s", d.published, dict(d.per_queue))
        except Exception:  # the database or broker blinked; the next cycle retries
            log.exception("scheduler cycle failed; retrying")
        try:
            courier.run_once()
        except Exception:
            log.exception("webhook delivery failed; the next cycle retries")
        try:
            settings.SCHEDULER_ALIVE_FILE.touch()  # the loop itself is alive, whatever the cycle's outcome
        except OSError:
            pass
        deadline = started + settings.SCHEDULER_INTERVAL_SECONDS
        while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
            if wakeup.wait(min(left, 0.25)):  # woken by a submission: dispatch now, reconcile on schedule
                _dispatch(celery, settings)
    wakeup.stop()
    courier.close()


def _dispatch(celery: Celery, settings: Settings) -> None:
    try:
        with session_scope() as session:
            d = dispatch_once(session, celery, settings)
        if d.published:
            log.info("dispatched %d job(s) on notify: %s", d.published, dict(d.per_queue))
    except Exception:
        log.exception("dispatch on notify failed; the next cycle retries")


def _sync_pipeline_runs(settings: object) -> None:
    """Pipelines' MLflow parent runs and their child links (best effort: MLflow may be down)."""
    from services.pipelines.tracking import sync_runs
    from shared.tracking import Tracker

    try:
        sync_runs(lambda: Tracker(settings))  # type: ignore[arg-type]
    except Exception as e:
        log.warning("could not sync pipelines' MLflow runs (retrying next cycle): %s", e)
