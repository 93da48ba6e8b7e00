"""Relay the child's output to Postgres (events, artifacts, progress, lease) and to MLflow (metrics, tags)."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from shared import lifecycle
from shared.db import session_scope
from shared.lineage import link_parents
from shared.models import Artifact, Job
from workers.runtime.protocol import decode_line

log = logging.getLogger("crucible.supervisor")


class EventRelay:
    def __init__(self, job_id: uuid.UUID, attempt: int, *, run_id: str | None, tracker: Any, worker_id: str,
                 inputs: dict[str, Any]) -> None:
        self.job_id, self.attempt, self.run_id = job_id, attempt, run_id
        self.tracker, self.worker_id = tracker, worker_id
        self.result: dict[str, float] = {}
        self._events: list[tuple[str, dict[str, Any]]] = []
        self._artifacts: list[dict[str, Any]] = []
        self._points: list[tuple[str, float, int]] = []
        self._tags: dict[str, str] = {}
        self._progress: tuple[float, float | None] | None = None
        self._last_progress_event: dict[str, Any] | None = None
        # Lineage: checkpoints descend from the dataset they were trained on and from the previous checkpoint.
        self._dataset_artifact = inputs.get("dataset", {}).get("artifact_id") if isinstance(inputs.get("dataset"),
                                                                                              dict) else None
        self._last_checkpoint: uuid.UUID | None = None
        self._input_artifacts: set[str] = set()  # checkpoints this job consumed (teachers, models to evaluate)
        self._mlflow_warned = False

    def resumed_from(self, artifact_id: uuid.UUID) -> None:
        self._last_checkpoint = artifact_id

    def add_lineage(self, artifact_id: str) -> None:
        self._input_artifacts.add(artifact_id)

    # --- parsing -----------------------------------------------------------------------------
    def handle_line(self, line: str) -> None:
        event = decode_line(line)
        if event is None:
            self._events.append(("log", {"line": line}))
            return
        kind = event.pop("type")
        if kind == "progress":
            done, total = float(event.get("done", 0)), float(event.get("total") or 0)
            frac = min(1.0, done / total) if total > 0 else 0.0
            self._progress = (frac, event.get("eta_s"))
            self._last_progress_event = {**event, "fraction": round(frac, 4)}
            self._points.append(("progress", frac, int(done)))
            if event.get("eta_s") is not None:
                self._points.append(("eta_seconds", float(event["eta_s"]), int(done)))
        elif kind == "metrics":
            step = int(event.get("step", 0))
            values = event.get("values", {})
            self._points.extend((k, float(v), step) for k, v in values.items())
            self._events.append(("metrics", {"step": step, "values": values}))
        elif kind in ("checkpoint", "artifact"):
            self._artifacts.append({"type": kind, **event})
        elif kind == "result":
            values = {k: float(v) for k, v in event.get("values", {}).items()}
            self.result.update(values)
            self._points.extend((k, v, 0) for k, v in values.items())
            self._events.append(("result", {"values": values}))
        else:
            self._events.append((kind, event))

    # --- flushing ----------------------------------------------------------------------------
    def flush(self, *, lease_s: float) -> lifecycle.LeaseState:
        """Write what accumulated and renew the lease, in one transaction; then log to MLflow."""
        from shared.config import get_settings

        settings = get_settings()
        with session_scope() as s:
            if self._last_progress_event is not None:
                self._events.append(("progress", self._last_progress_event))
                self._last_progress_event = None
            for type_, data in self._events:
                lifecycle.add_event(s, self.job_id, self.attempt, type_, **data)
            self._events.clear()
            for art in self._artifacts:
                self._record_artifact(s, art, settings.S3_BUCKET)
            self._artifacts.clear()
            frac, eta = self._progress if self._progress else (None, None)
            lease = lifecycle.renew_lease(s, job_id=self.job_id, attempt=self.attempt, worker_id=self.worker_id,
                                          lease_s=lease_s, progress=frac, eta_seconds=eta)
        self._flush_mlflow()
        return lease

    def _record_artifact(self, s: Any, art: dict[str, Any], bucket: str) -> None:
        job = s.get(Job, self.job_id)
        is_ckpt = art["type"] == "checkpoint"
        meta = {k: art.get(k) for k in ("epoch", "step", "final", "critical")} if is_ckpt else art.get("meta", {})
        row = Artifact(project_id=job.project_id, kind="checkpoint" if is_ckpt else art.get("artifact_kind", "file"),
                       name=f"checkpoint-epoch{art.get('epoch')}" if is_ckpt else art.get("name", "file"),
                       bucket=bucket, key=art["key"], sha256=art.get("sha256"), size_bytes=int(art.get("size", 0)),
                       job_id=self.job_id, attempt=self.attempt, meta=meta)
        s.add(row)
        s.flush()
        link_parents(s, row.id, [self._dataset_artifact, self._last_checkpoint, *self._input_artifacts])
        lifecycle.add_event(s, self.job_id, self.attempt, art["type"], artifact_id=str(row.id), uri=row.uri,
                            **({"epoch": art.get("epoch"), "final": art.get("final")} if is_ckpt else {}))
        if is_ckpt:
            self._last_checkpoint = row.id
            self._tags.update({"crucible.checkpoint_uri": row.uri, "crucible.checkpoint_artifact": str(row.id)})

    def _flush_mlflow(self) -> None:
        if self.run_id is None or (not self._points and not self._tags):
            return
        points, tags = self._points, self._tags
        self._points, self._tags = [], {}
        try:
            if points:
                self.tracker.log_metrics(self.run_id, points)
            if tags:
                self.tracker.set_tags(self.run_id, tags)
        except Exception as e:  # tracking must not kill training; the job row and events still have it all
            if not self._mlflow_warned:
                log.warning("MLflow logging failed for job %s (continuing): %s", self.job_id, e)
                self._mlflow_warned = True

    def close_run(self, job_status: str) -> None:
        if self.run_id is None:
            return
        for attempt in range(3):
            try:
                self.tracker.terminate(self.run_id, job_status)
                return
            except Exception as e:
                log.warning("could not close MLflow run %s (try %d): %s", self.run_id, attempt + 1, e)
                time.sleep(1 + attempt)
