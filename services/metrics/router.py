"""``GET /metrics`` (Prometheus text format) and ``GET /metrics/queues`` (JSON, for KEDA's metrics-api scaler).

Both are unauthenticated, like every scrape target: they carry counts, not job content. The Ingress in
k8s/base routes only ``/v1``, the docs and the health endpoints, so they are reachable inside the cluster only.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.metrics import snapshot as snapshot_mod
from services.metrics.collectors import REGISTRY

router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
def prometheus_metrics() -> Response:
    # A sync handler: the snapshot's queries run in the threadpool, not on the event loop.
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


@router.get("/metrics/queues", summary="Backlog per worker kind (what the autoscaler reads)",
            responses={503: {"description": "The job counts could not be read (database down); no numbers given"}})
def queue_metrics() -> Any:
    """Per worker kind: broker depth, queued/dispatched/running jobs, ``demand`` (their sum: the number of workers
    the kind could use now) and the oldest waiting job's age. KEDA reads ``<worker-kind>.demand``.

    Demand comes from the jobs table: when it cannot be read the answer is a 503, never a demand of 0 (KEDA
    keeps the current replica count on a failed scrape, while a 0 would scale GPU workers down to nothing)."""
    snap = snapshot_mod.current_snapshot()
    if "jobs" in snap.errors:
        return JSONResponse(status_code=503, headers={"Retry-After": "5"},
                            content={"detail": [{"type": "unavailable", "msg": "job counts unavailable: "
                                                 f"{snap.errors['jobs']}; demand is unknown, not zero"}]})
    out: dict[str, Any] = {
        kind: {"queue": q.queue, "depth": q.depth, "queued": q.queued, "dispatched": q.dispatched,
               "running": q.running, "demand": q.demand,
               "oldest_waiting_age_seconds": round(snap.oldest_waiting_age(kind), 3)}
        for kind, q in snap.queues.items()
    }
    out["_meta"] = {"depth_source": snap.depth_source, "taken_at": snap.taken_at.isoformat(), "errors": snap.errors}
    return out
