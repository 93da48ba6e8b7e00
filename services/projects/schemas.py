from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class ProjectRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: uuid.UUID
    name: str
    created_at: datetime


class ExperimentCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", examples=["msf-shapes"])
    description: str | None = Field(None, max_length=2000)


class ExperimentRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: uuid.UUID
    name: str
    description: str | None
    mlflow_experiment_id: str | None
    created_at: datetime


class KeyRead(BaseModel):
    """An API key as listings show it: never the secret, only its first 12 characters."""

    model_config = ConfigDict(from_attributes=True)
    id: uuid.UUID
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None = Field(None, description="updated at most once a minute")
    expires_at: datetime | None
    revoked_at: datetime | None
