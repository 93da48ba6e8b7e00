"""Relay the child's output to Postgres (events, artifacts, progress) and to MLflow (metrics, tags).

Log lines come from the child's stdout, events from its event channel (protocol.py), validated on receipt:
an invalid event is logged and dropped. Everything is buffered and written in batches (``flush``), each batch
in one transaction fenced by the attempt's lease (``lifecycle.fence``): an attempt that lost its lease writes
nothing, so the next attempt can never resume from, or report, what a superseded one produced.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from shared import lifecycle
from shared.db import session_scope
from shared.lineage import link_parents
from shared.models import Artifact, Job
from workers.runtime import protocol

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
        self._outputs: dict[str, Any] = {}
        self._registrations: list[dict[str, str]] = []  # model-registry versions to create once committed
        self._progress: tuple[float, float | None] | None = None
        self._last_progress_event: dict[str, Any] | None = None
        # Lineage: checkpoints descend from the dataset they were trained on and from the previous checkpoint.
        self._dataset_artifact = inputs.get("dataset", {}).get("artifact_id") if isinstance(inputs.get("dataset"),
                                                                                              dict) else None
        self._last_checkpoint: uuid.UUID | None = None
        self._input_artifacts: set[str] = set()  # checkpoints this job consumed (teachers, models to evaluate)
        self._mlflow_warned = False
        self.invalid_events = 0
        self.dropped_events = self.dropped_artifacts = 0  # what a lost lease kept from being written
        self.lost = False  # a fenced flush found the lease gone: nothing more is written

    def resumed_from(self, artifact_id: uuid.UUID) -> None:
        self._last_checkpoint = artifact_id

    def add_lineage(self, artifact_id: str) -> None:
        self._input_artifacts.add(artifact_id)

    # --- parsing -----------------------------------------------------------------------------
    def handle_line(self, line: str) -> None:
        """A line of the child's stdout/stderr: a log line, whatever it looks like."""
        self._events.append(("log", {"line": line}))

    def handle_event(self, line: str) -> None:
        """A line of the event channel: a typed event, or dropped (with a warning) if it does not validate."""
        try:
            event = protocol.parse_event(line)
        except ValueError as e:
            self.invalid_events += 1
            if self.invalid_events <= 5:
                log.warning("job %s: dropped an invalid event (%s): %.200s", self.job_id, e, line)
            return
        if isinstance(event, protocol.Progress):
            frac = min(1.0, event.done / event.total) if event.total > 0 else 0.0
            self._progress = (frac, event.eta_s)
            self._last_progress_event = {**event.model_dump(exclude={"type"}), "fraction": round(frac, 4)}
            self._points.append(("progress", frac, event.done))
            if event.eta_s is not None:
                self._points.append(("eta_seconds", event.eta_s, event.done))
        elif isinstance(event, protocol.Metrics):
            self._points.extend((k, v, event.step) for k, v in event.values.items())
            self._events.append(("metrics", {"step": event.step, "values": event.values}))
        elif isinstance(event, protocol.Checkpoint | protocol.Artifact | protocol.Dataset):
            self._artifacts.append(event.model_dump(mode="json"))
        elif isinstance(event, protocol.Output):
            self._outputs[event.name] = event.value
            self._events.append(("output", {"name": event.name, "value": event.value}))
        elif isinstance(event, protocol.Result):
            self.result.update(event.values)
            self._points.extend((k, v, 0) for k, v in event.values.items())
            self._events.append(("result", {"values": event.values}))

    # --- flushing ----------------------------------------------------------------------------
    def flush(self) -> bool:
        """Write what accumulated in one transaction fenced by the lease; then log to MLflow.

        Returns False (and drops the batch) when the lease is gone."""
        from shared.config import get_settings

        if self.lost:
            self._drop()
            return False
        if self._last_progress_event is not None:
            self._events.append(("progress", self._last_progress_event))
            self._last_progress_event = None
        if self._events or self._artifacts or self._progress:
            settings = get_settings()
            frac, eta = self._progress if self._progress else (None, None)
            self._registrations = []  # made again by this batch's artifacts (a failed batch is retried whole)
            try:
                with session_scope() as s:
                    lifecycle.fence(s, job_id=self.job_id, attempt=self.attempt, worker_id=self.worker_id,
                                    progress=frac, eta_seconds=eta)
                    for type_, data in self._events:
                        lifecycle.add_event(s, self.job_id, self.attempt, type_, **data)
                    if self._outputs:  # the job row's named outputs (pipelines read them), in the same fence
                        job = s.get_one(Job, self.job_id)  # fence() just matched the row
                        job.outputs = {**(job.outputs or {}), **self._outputs}
                    last_ckpt = self._last_checkpoint
                    try:
                        for art in self._artifacts:
                            self._record_artifact(s, art, settings.S3_BUCKET)
                    except BaseException:
                        self._last_checkpoint = last_ckpt
                        raise
            except lifecycle.LeaseLost:
                self.lost = True
                self._drop()
                return False
            self._events.clear()
            self._artifacts.clear()
            self._outputs.clear()
            self._progress = None
        self._register_models()
        self._flush_mlflow()
        return True

    def drop(self) -> None:
        """The attempt is over without its lease: forget what is buffered (and count it)."""
        self.lost = True
        self._drop()

    def _drop(self) -> None:
        self.dropped_events += len(self._events) + (self._last_progress_event is not None)
        self.dropped_artifacts += len(self._artifacts)
        self._outputs.clear()
        self._registrations.clear()
        self._events.clear()
        self._artifacts.clear()
        self._points.clear()
        self._tags.clear()
        self._progress = None
        self._last_progress_event = None

    def _record_artifact(self, s: Any, art: dict[str, Any], bucket: str) -> None:
        job = s.get(Job, self.job_id)
        if art["type"] == "dataset":
            self._record_dataset(s, job, art, bucket)
            return
        is_ckpt = art["type"] == "checkpoint"
        meta = {k: art.get(k) for k in ("epoch", "step", "final", "critical")} if is_ckpt else art.get("meta", {})
        row = Artifact(project_id=job.project_id, kind="checkpoint" if is_ckpt else art.get("artifact_kind", "file"),
                       name=f"checkpoint-epoch{art.get('epoch')}" if is_ckpt else art.get("name", "file"),
                       bucket=bucket, key=art["key"], sha256=art.get("sha256"), size_bytes=int(art.get("size", 0)),
                       job_id=self.job_id, attempt=self.attempt, meta=meta)
        if not is_ckpt and meta.get("register_model"):
            # a versioned model (e.g. an expert set): version n of its name in the project, mirrored as version
            # of the MLflow registered model "<project>.<name>" once this transaction has committed
            from sqlalchemy import func, select

            from shared.models import Project

            name = str(meta["register_model"])
            prior = s.scalar(select(func.count()).select_from(Artifact).where(
                Artifact.project_id == job.project_id, Artifact.kind == row.kind,
                Artifact.meta["register_model"].as_string() == name)) or 0
            row.meta = {**meta, "version": prior + 1}
            project = s.get(Project, job.project_id)
            self._registrations.append({"name": f"{project.name if project else job.project_id}.{name}",
                                        "source": f"s3://{bucket}/{art['key']}", "version": str(prior + 1),
                                        "artifact_id": ""})
        s.add(row)
        s.flush()
        if self._registrations and not self._registrations[-1]["artifact_id"]:
            self._registrations[-1]["artifact_id"] = str(row.id)
        parents = [self._dataset_artifact, self._last_checkpoint, *self._input_artifacts]
        link_parents(s, row.id, [p for p in parents if p is not None])
        lifecycle.add_event(s, self.job_id, self.attempt, art["type"], artifact_id=str(row.id), uri=row.uri,
                            **({"epoch": art.get("epoch"), "final": art.get("final")} if is_ckpt else {}))
        if is_ckpt:
            self._last_checkpoint = row.id
            self._tags.update({"crucible.checkpoint_uri": row.uri, "crucible.checkpoint_artifact": str(row.id)})

    def _register_models(self) -> None:
        """Register the committed versioned artifacts in the MLflow model registry (best effort, like metrics:
        the artifact row and its version are the truth; a failure is logged)."""
        pending, self._registrations = self._registrations, []
        for reg in pending:
            try:
                v = self.tracker.register_model_version(
                    reg["name"], source=reg["source"], run_id=self.run_id,
                    tags={"crucible.artifact_id": reg["artifact_id"], "crucible.version": reg["version"],
                          "crucible.job_id": str(self.job_id)})
                log.info("job %s: registered %s version %s (crucible version %s)", self.job_id, reg["name"], v,
                         reg["version"])
            except Exception as e:
                log.warning("job %s: could not register %s in the MLflow model registry: %s", self.job_id,
                            reg["name"], e)

    def _record_dataset(self, s: Any, job: Job, art: dict[str, Any], bucket: str) -> None:
        """A dataset the job made: the next version of its name, with lineage, and its id as the named output."""
        from shared.datasets import VersionTaken, record_dataset

        meta = {**art.get("meta", {}), "format": art["format"], "made_by_job": str(self.job_id)}
        for _ in range(5):  # another writer of the same name took the version number: take the next one
            try:
                ds, row = record_dataset(s, project_id=job.project_id, name=art["name"], source="archive",
                                         bucket=bucket, key=art["key"], sha256=art["sha256"], size=int(art["size"]),
                                         stats=art.get("stats", {}), meta=meta, job_id=self.job_id,
                                         attempt=self.attempt)
                break
            except VersionTaken:
                continue
        else:
            raise RuntimeError(f"could not record dataset {art['name']!r}: its versions keep being taken")
        if row is not None:
            parents = [self._dataset_artifact, self._last_checkpoint, *self._input_artifacts]
            link_parents(s, row.id, [p for p in parents if p is not None])
        lifecycle.add_event(s, self.job_id, self.attempt, "dataset", dataset_id=str(ds.id), name=ds.name,
                            version=ds.version)
        if art.get("output"):
            job.outputs = {**(job.outputs or {}), art["output"]: str(ds.id)}

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
