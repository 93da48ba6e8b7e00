from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from shared.models import JobStatus
from shared.specs import JobSpec

# The body of POST /v1/jobs: the discriminated union (on `kind`) over every job kind registered in shared.kinds,
# derived by shared.specs. An unregistered kind is a 422 naming `kind` and listing the known kinds.
JobSubmit = JobSpec


class JobRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str | None
    kind: str
    worker_kind: str
    experiment_id: uuid.UUID
    status: JobStatus
    status_reason: str | None
    # Why a pending or queued job has not started (services/scheduler/quotas.py): quota, capacity, dependencies.
    wait_reason: str | None = None
    priority: int
    attempt: int
    infra_failures: int
    user_failures: int
    cancel_requested: bool
    progress: float
    eta_seconds: float | None
    result: dict[str, Any]
    spec: dict[str, Any]
    inputs: dict[str, Any]
    depends_on: list[uuid.UUID] = []
    mlflow_run_id: str | None
    created_at: datetime
    queued_at: datetime | None
    dispatched_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None


class JobsPage(BaseModel):
    items: list[JobRead]
    total: int
    limit: int
    offset: int


class EventRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    attempt: int
    ts: datetime
    type: str
    data: dict[str, Any]
