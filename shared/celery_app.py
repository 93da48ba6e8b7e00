"""The Celery app: explicit queues (one per worker kind), no auto-created queues, no results.

The queues are derived from the kind registry (``shared.kinds``). Only the dispatcher publishes (``send_task``
by name, so the control plane never imports worker code); only ``crucible worker`` consumes. Messages carry
``(job_id, attempt)`` and nothing else: Postgres holds the job's truth, so a lost or duplicated message is
harmless (see shared/lifecycle.py).
"""

from __future__ import annotations

from celery import Celery
from kombu.entity import Exchange, Queue

from shared.config import Settings, get_settings
from shared.kinds import queue_for, worker_kinds

RUN_JOB_TASK = "crucible.run_job"
_exchange = Exchange("crucible", type="direct")


def declared_queues() -> list[Queue]:
    """One queue per registered worker kind (shared.kinds), bound to the direct exchange by its own name."""
    return [Queue(w.queue, _exchange, routing_key=w.queue) for w in worker_kinds()]


def pool_queues(settings: Settings) -> list[Queue]:
    """One queue per GPU pool (``CRUCIBLE_GPU_POOLS``): ``crucible.<worker kind>.<gpu class>``."""
    names = []
    for key in settings.GPU_POOLS:
        kind, _, gpu_class = key.rpartition(".")
        names.append(f"{queue_for(kind)}.{gpu_class}")
    return [Queue(n, _exchange, routing_key=n) for n in names]


def make_celery(settings: Settings | None = None) -> Celery:
    s = settings or get_settings()
    if s.BROKER_URL.startswith("sqla+"):
        # kombu hands broker_transport_options to create_engine(), so the poll interval can only be set on
        # the transport class (the default 1 s adds a second to every dispatch).
        import kombu.transport.sqlalchemy as kombu_sqla

        kombu_sqla.Transport.polling_interval = 0.2
    app = Celery("crucible", broker=s.BROKER_URL, set_as_current=False)
    queues = declared_queues() + pool_queues(s)
    app.conf.update(
        task_queues=queues,
        task_default_queue=queue_for("ssl-trainer"),
        task_default_exchange=_exchange.name,
        task_create_missing_queues=False,  # a typo in a queue name must fail loudly
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # job state lives in Postgres
        task_acks_late=False,  # the lease + reconciler handle lost workers; late acks would re-run long jobs
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        # Bounded socket operations and connection retries: a dead Redis fails a publish within seconds (the
        # outbox row waits for the next cycle) instead of blocking the dispatcher.
        broker_transport_options={"visibility_timeout": 24 * 3600, "socket_timeout": s.BROKER_TIMEOUT_SECONDS,
                                  "socket_connect_timeout": s.BROKER_TIMEOUT_SECONDS, "max_retries": 1,
                                  "connect_retries_timeout": s.BROKER_TIMEOUT_SECONDS}
        if s.BROKER_URL.startswith("redis") else {},
        worker_send_task_events=False,
    )
    return app


_app: Celery | None = None


def get_celery() -> Celery:
    """The process's Celery app, built from the settings on first use."""
    global _app
    if _app is None:
        _app = make_celery()
    return _app


def reset_celery() -> None:
    global _app
    _app = None
