"""MLflow: one experiment per Crucible experiment, one run per job (all attempts log into the same run).

Only the supervisor (and, for abandoned jobs, the reconciler) talks to MLflow; methods report through the
child protocol. MLflow stores URIs of checkpoints, not the checkpoints themselves: large uploads through
the MLflow artifact proxy are a known failure mode (mlflow#8539, #7564).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from typing import Any

from shared.config import Settings, get_settings

MAX_PARAM_LEN = 6000
TERMINAL_STATUS = {"succeeded": "FINISHED", "failed": "FAILED", "cancelled": "KILLED", "pruned": "KILLED"}


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}; lists are JSON-encoded."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        value = json.dumps(data) if isinstance(data, list | tuple) else str(data)
        out[prefix.rstrip(".")] = value[:MAX_PARAM_LEN]
    return out


class Tracker:
    def __init__(self, settings: Settings | None = None) -> None:
        from mlflow import MlflowClient

        self.settings = settings or get_settings()
        _bound_http(self.settings)
        self.client = MlflowClient(tracking_uri=self.settings.MLFLOW_TRACKING_URI)

    def ping(self) -> None:
        self.client.search_experiments(max_results=1)

    def ensure_experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        try:
            return self.client.create_experiment(name, tags={"crucible.managed": "true"})
        except Exception:  # created concurrently by another worker
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def create_run(self, *, experiment_id: str, run_name: str, job_id: str, kind: str, spec: dict[str, Any],
                   project: str) -> str:
        job_url = f"{self.settings.PUBLIC_URL.rstrip('/')}/v1/jobs/{job_id}"
        run = self.client.create_run(experiment_id, run_name=run_name, tags={
            "crucible.job_id": job_id, "crucible.kind": kind, "crucible.project": project,
            "crucible.job_url": job_url,
            "mlflow.note.content": f"Crucible job [{job_id}]({job_url}) (kind `{kind}`).",
        })
        run_id = str(run.info.run_id)
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in flatten(spec).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(run_id, params=params[i:i + 100])
        return run_id

    def reopen(self, run_id: str, attempt: int) -> None:
        """Continue the same run on a new attempt (a killed attempt may have left it RUNNING or FAILED)."""
        self.client.update_run(run_id, status="RUNNING")
        self.client.set_tag(run_id, "crucible.attempt", str(attempt))

    def log_dataset(self, run_id: str, *, name: str, digest: str, source: str, source_type: str,
                    profile: dict[str, Any] | None = None) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        ds = Dataset(name=name, digest=digest[:36], source_type=source_type, source=json.dumps({"uri": source}),
                     profile=json.dumps(profile or {}))
        self.client.log_inputs(run_id, datasets=[DatasetInput(ds, tags=[InputTag("mlflow.data.context", "train")])])

    def register_model_version(self, name: str, *, source: str, run_id: str | None, tags: dict[str, str]) -> str:
        """A new version of registered model ``name`` (created on first use) pointing at ``source``; returns it."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name, tags={"crucible.managed": "true"})
        except MlflowException as e:  # it exists (the usual case after the first version)
            if "RESOURCE_ALREADY_EXISTS" not in str(getattr(e, "error_code", "")) and "already exists" not in str(e):
                raise
        version = self.client.create_model_version(name, source=source, run_id=run_id, tags=tags)
        return str(version.version)

    def log_metrics(self, run_id: str, points: Iterable[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_metric_key(k), float(v), now, int(step)) for k, v, step in points]
        for i in range(0, len(metrics), 500):
            self.client.log_batch(run_id, metrics=metrics[i:i + 500])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_image(self, run_id: str, *, bucket: str, key: str, name: str) -> None:
        """Copy a small image artifact from the object store into the run's ``images/`` artifacts (MLflow shows
        it in the UI); large files stay URIs."""
        import tempfile
        from pathlib import Path

        from shared.storage import ObjectStore

        with tempfile.TemporaryDirectory(prefix="crucible-mlflow-") as tmp:
            path = ObjectStore(self.settings).get_file(key, Path(tmp) / Path(name).name, bucket=bucket)
            self.client.log_artifact(run_id, str(path), artifact_path="images")

    def terminate(self, run_id: str, job_status: str) -> None:
        self.client.set_terminated(run_id, status=TERMINAL_STATUS.get(job_status, "FAILED"))


def _bound_http(settings: Settings) -> None:
    """MLflow's REST client waits 120 s per request and retries 7 times with exponential backoff (minutes in all)
    when the server is down; bound it so a dead MLflow is an error within seconds. MLflow reads these
    variables per request; an operator's own setting wins."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, int(settings.MLFLOW_TIMEOUT_SECONDS))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def _metric_key(name: str) -> str:
    # MLflow accepts letters, digits, _ - . space / : only.
    return "".join(c if c.isalnum() or c in "_-. /:" else "_" for c in name)
