"""``distill``: knowledge distillation from frozen teachers on the distiller worker.

* ``simreg``   - SimReg (BMVC 2021): regress the L2-normalised teacher feature from the student through a deep
  MLP head that is discarded after training; the same weakly augmented image goes to teacher and student;
  several teachers get independent heads and the losses are averaged (the paper's multi-teacher variant).
* ``compress`` - CompRess (NeurIPS 2020): match the teacher's similarity distribution over a memory bank of
  teacher features (KL, temperature 0.04); the KD backdoor defense calls it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from shared.specs.common import StrictModel, validate_checkpoint_ref
from shared.specs.vision import VisionTrainingSpec


class CompressOptions(StrictModel):
    variant: Literal["1q", "2q"] = Field("1q", description="1q: student scored against the teacher's anchors; "
                                                           "2q: against a bank of its own EMA features")
    temperature: float = Field(0.04, gt=0, le=10)
    student_ema: float = Field(0.999, ge=0, le=1, description="EMA of the student that fills its bank (2q)")


_RECIPES: dict[str, dict[str, Any]] = {
    "simreg": {"lr": 0.05, "lr_schedule": "cosine"},
    "compress": {"lr": 0.01, "lr_schedule": "step"},
}


class DistillSpec(VisionTrainingSpec):
    """Train a student backbone from frozen teachers (earlier jobs' checkpoints)."""

    critical_keys: ClassVar[tuple[str, ...]] = (
        "method", "teachers", "teacher_features", "dataset", "limit_train", "image_size", "backbone", "stem",
        "head", "batch_size", "bank_size", "compress", "seed",
    )

    kind: Literal["distill"] = "distill"
    method: Literal["simreg", "compress"] = "simreg"
    teachers: list[str] = Field(min_length=1, max_length=8, description="job:<id> or artifact:<id> per teacher; "
                                "simreg gives each teacher its own head, compress takes one")
    teacher_features: Literal["backbone", "projection"] = Field(
        "backbone", description="regress the teacher's pooled backbone feature or its projection output")
    head: Literal["mlp", "linear"] = Field(
        "mlp", description="simreg student head: 4-layer MLP (paper) or a single linear map (the ablation)")
    bank_size: int = Field(4096, ge=1, le=2**24, validate_default=True,
                           description="compress: teacher-feature bank rows")
    compress: CompressOptions | None = None

    @classmethod
    def recipe_defaults(cls, data: dict[str, Any]) -> dict[str, Any]:
        method = data.get("method", "simreg")  # not validated yet: it may be any JSON value
        return dict(_RECIPES.get(method, {})) if isinstance(method, str) else {}

    @field_validator("teachers")
    @classmethod
    def _teachers(cls, v: list[str]) -> list[str]:
        refs = [validate_checkpoint_ref(t) for t in v]
        if len(set(refs)) != len(refs):
            raise ValueError("lists the same teacher twice")
        return refs

    @field_validator("bank_size")
    @classmethod
    def _bank_divides(cls, v: int, info: ValidationInfo) -> int:
        batch = info.data.get("batch_size")
        if info.data.get("method") == "compress" and batch and v % batch:
            raise ValueError(f"{v} is not a multiple of batch_size={batch}; try {max(1, round(v / batch)) * batch}")
        return v

    @model_validator(mode="after")
    def _method_options(self) -> DistillSpec:
        if self.method == "compress":
            if len(self.teachers) != 1:
                raise ValueError("compress distils exactly one teacher; use simreg for several")
            self.compress = self.compress or CompressOptions()
        elif self.compress is not None:
            raise ValueError("compress options given but method is not 'compress'")
        gpus = self.resources.gpus
        if gpus > 1 and self.batch_size % gpus:
            better = max(gpus, round(self.batch_size / gpus) * gpus)
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of resources.gpus={gpus} (it is the "
                             f"global batch, split evenly over the processes); try batch_size={better}")
        return self

    def checkpoint_inputs(self) -> dict[str, str]:
        return {f"teachers.{i}": ref for i, ref in enumerate(self.teachers)}

    def dataset_problems(self, train_images: int) -> list[tuple[str, str]]:
        problems = super().dataset_problems(train_images)
        n = min(train_images, self.limit_train or train_images)
        if self.method == "compress" and self.bank_size > n:
            problems.append(("bank_size", f"{self.bank_size} exceeds the {n} training images"))
        return problems
