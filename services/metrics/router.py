"""``GET /metrics`` (Prometheus text format) and ``GET /metrics/queues`` (JSON, for KEDA's metrics-api scaler).

Both are unauthenticated, like every scrape target: they carry counts, not job content. The Ingress in
k8s/base routes only ``/v1``, the docs and the health endpoints, so they are reachable inside the cluster only.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.metrics import snapshot as snapshot_mod
from services.metrics.collectors import REGISTRY

router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
def prometheus_metrics() -> Response:
    # A sync handler: the snapshot's queries run in the threadpool, not on the event loop.
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


@router.get("/metrics/queues", summary="Backlog per worker kind (what the autoscaler reads)")
def queue_metrics() -> dict[str, Any]:
    """Per worker kind: broker depth, queued/dispatched/running jobs, ``demand`` (their sum: the number of workers
    the kind could use now) and the oldest waiting job's age. KEDA reads ``<worker-kind>.demand``."""
    snap = snapshot_mod.current_snapshot()
    out: dict[str, Any] = {
        kind: {"queue": q.queue, "depth": q.depth, "queued": q.queued, "dispatched": q.dispatched,
               "running": q.running, "demand": q.demand,
               "oldest_waiting_age_seconds": round(snap.oldest_waiting_age(kind), 3)}
        for kind, q in snap.queues.items()
    }
    out["_meta"] = {"depth_source": snap.depth_source, "taken_at": snap.taken_at.isoformat(), "errors": snap.errors}
    return out
