from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from shared.specs.sweeps import SweepSpec

SweepSubmit = SweepSpec  # the body of POST /v1/sweeps (shared/specs/sweeps.py)


class CheckpointRead(BaseModel):
    artifact_id: uuid.UUID
    uri: str
    epoch: int | None


class BestRead(BaseModel):
    trial: int
    value: float
    params: dict[str, Any]
    job_id: uuid.UUID | None
    mlflow_run_id: str | None
    checkpoint: CheckpointRead | None


class TrialRead(BaseModel):
    number: int
    state: str  # running | complete | pruned | failed
    params: dict[str, Any]
    value: float | None
    last_step: int | None
    last_value: float | None
    reason: str | None
    job_id: uuid.UUID | None
    job_status: str | None
    attempt: int | None
    progress: float
    mlflow_run_id: str | None


class SweepRead(BaseModel):
    id: uuid.UUID
    name: str
    experiment: str
    kind: str
    status: str
    status_reason: str | None
    objective: dict[str, Any]
    sampler: str
    early_stopping: str
    max_trials: int
    max_concurrency: int
    counts: dict[str, int]
    progress: float
    best: BestRead | None
    mlflow_run_id: str | None
    created_at: datetime
    finished_at: datetime | None
    definition: dict[str, Any]
    trials: list[TrialRead]
