"""Fields shared by every vision training job (ssl-train, distill): data, backbone, optimisation, evaluation."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from shared.specs.common import (
    MAX_KNN_K,
    MAX_SEED,
    JobSpecBase,
    knn_problems,
    validate_dataset_ref,
    validate_knn_k,
)

Backbone = Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2"]
Stem = Literal["cifar", "imagenet"]


class VisionTrainingSpec(JobSpecBase):
    """Base of the vision training specs. Subclasses may declare method recipes: ``recipe_defaults`` returns
    values for fields the user did not set (e.g. ISD v1's lr 0.01 and step schedule), applied before validation."""

    # --- data ---
    dataset: str = Field("builtin://shapes", description="builtin://mnist|digits|shapes, a dataset id or name")
    limit_train: int | None = Field(None, ge=1, le=10**9, description="use only the first N training images")
    limit_test: int | None = Field(None, ge=1, le=10**9,
                                   description="use only the first N test images for evaluation")
    image_size: int = Field(32, ge=8, le=512)

    # --- model ---
    backbone: Backbone = "resnet18"
    stem: Stem = Field("cifar", description="cifar: 3x3 stride-1 conv, no max-pool (32-px inputs); "
                                            "imagenet: the torchvision stem")

    # --- optimisation (the LR is set once per epoch, epochs numbered from 1, as in the reference) ---
    epochs: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(256, ge=2, le=65_536)
    lr: float = Field(0.05, gt=0, le=100)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0, le=1)
    lr_schedule: Literal["cosine", "step"] = "cosine"
    lr_milestones: list[int] | None = Field(
        None, max_length=32, validate_default=True, description="step schedule epochs; default 70% and 90% of epochs")
    lr_decay: float = Field(0.2, gt=0, le=1)
    seed: int = Field(0, ge=0, le=MAX_SEED)

    # --- evaluation and checkpoints ---
    knn_every: int = Field(0, ge=0, le=10_000, description="k-NN evaluation every N epochs (0: only before and after)")
    knn_k: list[int] = Field(default_factory=lambda: [1, 20], min_length=1, max_length=8,
                             description=f"k of the k-NN evaluation (1-{MAX_KNN_K}, at most the training images)")
    checkpoint_every: int = Field(1, ge=1, le=10_000, description="epochs between checkpoints")

    # --- execution ---
    num_workers: int = Field(0, ge=0, le=64, description="data-loader worker processes")
    amp: bool = Field(True, description="mixed precision (CUDA only)")
    channels_last: bool = Field(True, description="channels-last memory format (CUDA only)")

    @classmethod
    def recipe_defaults(cls, data: dict[str, Any]) -> dict[str, Any]:
        return {}

    @model_validator(mode="before")
    @classmethod
    def _apply_recipe(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = {**cls.recipe_defaults(data), **data}
        return data

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        return validate_dataset_ref(v)

    @field_validator("knn_k")
    @classmethod
    def _knn_k(cls, v: list[int]) -> list[int]:
        return validate_knn_k(v)

    @field_validator("batch_size")
    @classmethod
    def _batch_fits(cls, v: int, info: ValidationInfo) -> int:
        limit = info.data.get("limit_train")
        if limit is not None and limit < v:
            raise ValueError(f"{v} exceeds limit_train={limit}: not even one batch could be formed")
        return v

    @field_validator("lr_milestones")
    @classmethod
    def _milestones(cls, v: list[int] | None, info: ValidationInfo) -> list[int]:
        epochs = info.data.get("epochs") or 1
        if v is None:
            return sorted({max(1, round(0.7 * epochs)), max(1, round(0.9 * epochs))})
        if any(not 1 <= m <= 10_000 for m in v) or sorted(v) != v:
            raise ValueError("milestones must be increasing epoch numbers from 1 to 10000")
        return v

    def dataset_problems(self, train_images: int) -> list[tuple[str, str]]:
        n = min(train_images, self.limit_train or train_images)
        problems = [("batch_size", f"{self.batch_size} exceeds the {n} training images available")] \
            if self.batch_size > n else []
        # only a k the user chose: the default [1, 20] is clamped on tiny datasets, as it always was
        return problems + (knn_problems(self.knn_k, n) if "knn_k" in self.model_fields_set else [])
