from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field, model_validator

from shared.specs.common import StrictModel


class PipelineSubmit(StrictModel):
    """Either ``steps`` (step name → job spec with references, plus ``foreach``/``after``/``cache``) or a
    ``template`` name; ``params`` fill ``${params.<p>}``."""

    name: str | None = Field(None, max_length=150, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    experiment: str = Field("default", description="default experiment of the steps' jobs")
    template: str | None = Field(None, description="a template from GET /v1/pipeline-templates")
    params: dict[str, Any] = Field(default_factory=dict)
    steps: dict[str, dict[str, Any]] | None = Field(
        None, description="step name -> job spec; fields may use ${params.p}, ${steps.<s>.checkpoint}, "
                          "${steps.<s>.outputs.<name>} and, with foreach, ${item}")

    @model_validator(mode="after")
    def _one_source(self) -> PipelineSubmit:
        if (self.template is None) == (self.steps is None):
            raise ValueError("give either `steps` or `template` (with `params`)")
        return self


class StepJobRead(BaseModel):
    id: uuid.UUID
    status: str
    status_reason: str | None
    progress: float
    item_index: int | None
    cached: bool
    mlflow_run_id: str | None


class StepRead(BaseModel):
    name: str
    kind: str
    state: str
    reason: str | None
    parents: list[str]
    foreach: bool
    items: list[Any] | None
    progress: float
    jobs: list[StepJobRead]


class PipelineRead(BaseModel):
    id: uuid.UUID
    name: str
    experiment: str
    template: str | None
    params: dict[str, Any]
    status: str
    status_reason: str | None
    progress: float
    retries: int
    mlflow_run_id: str | None
    created_at: datetime
    finished_at: datetime | None
    steps: list[StepRead]


class TemplateRead(BaseModel):
    name: str
    description: str
    params: dict[str, Any]
    steps: dict[str, Any]
    file: str
