"""Prometheus metrics of the control plane: job-path state read from Postgres/Redis, and API latency.

``install_metrics(app)`` adds the ``/metrics`` and ``/metrics/queues`` routes and the request-latency
middleware; services/api/app.py calls it once.
"""

from __future__ import annotations

from fastapi import FastAPI


def install_metrics(app: FastAPI) -> None:
    from services.metrics.middleware import RequestLatencyMiddleware
    from services.metrics.router import router

    app.add_middleware(RequestLatencyMiddleware)
    app.include_router(router)
