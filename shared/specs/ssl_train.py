"""``ssl-train``: self-supervised pre-training on the ssl-trainer worker.

Methods (see ``../shared/methods/ssl.md`` in the brief, and ``workers/ssl_trainer``):

* ``msf`` - Mean Shift (Koohpayegani et al., ICCV 2021): pull the online prediction towards the mean of
  the k nearest neighbours of the target embedding in a memory bank.
* ``byol`` - MSF with k=1 (asymmetric BYOL): the only neighbour is the target itself.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator

from shared.specs.common import JobSpecBase, validate_dataset_ref

Augmentation = Literal["weak/strong", "strong/strong", "weak/weak", "strong/weak"]
Backbone = Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2"]


class SslTrainSpec(JobSpecBase):
    """Pre-train a backbone with MSF/BYOL; evaluate it with k-NN during and after training."""

    critical_keys: ClassVar[tuple[str, ...]] = (
        "method", "dataset", "limit_train", "image_size", "backbone", "stem", "batch_size",
        "bank_size", "topk", "augmentation", "proj_hidden_dim", "proj_dim", "seed",
    )

    kind: Literal["ssl-train"] = "ssl-train"
    method: Literal["msf", "byol"] = Field("msf", description="byol = msf with topk=1")

    # --- data ---
    dataset: str = Field("builtin://shapes", description="builtin://mnist|digits|shapes, a dataset id or name")
    limit_train: int | None = Field(None, ge=1, description="use only the first N training images")
    limit_test: int | None = Field(None, ge=1, description="use only the first N test images for evaluation")
    image_size: int = Field(32, ge=8, le=512)
    augmentation: Augmentation = Field(
        "weak/strong", description="target/online views: 'weak/strong' gives the weak view to the EMA target"
    )

    # --- model ---
    backbone: Backbone = "resnet18"
    stem: Literal["cifar", "imagenet"] = Field(
        "cifar", description="cifar: 3x3 stride-1 conv, no max-pool (32-px inputs); imagenet: torchvision stem"
    )
    proj_hidden_dim: int | None = Field(None, ge=8, description="default 2x backbone width")
    proj_dim: int | None = Field(None, ge=8, description="default backbone width / 4")

    # --- optimisation ---
    epochs: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(256, ge=2, le=65_536)
    lr: float = Field(0.05, gt=0, le=100)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0, le=1)
    lr_schedule: Literal["cosine", "step"] = "cosine"
    lr_milestones: list[int] = Field(default_factory=lambda: [140, 180])
    lr_decay: float = Field(0.2, gt=0, le=1)
    seed: int = 0

    # --- method (after batch_size: the bank is checked against it) ---
    bank_size: int = Field(
        8192, ge=1, validate_default=True, description="memory bank rows K; must be a multiple of batch_size"
    )
    topk: int | None = Field(
        None, ge=1, le=1024, validate_default=True, description="neighbours averaged into the target (k); "
        "default 5 for msf, 1 for byol"
    )
    ema_momentum: float = Field(0.99, ge=0.0, le=1.0)

    # --- evaluation and checkpoints ---
    knn_every: int = Field(0, ge=0, description="k-NN evaluation every N epochs (0: only before and after)")
    knn_k: list[int] = Field(default_factory=lambda: [1, 20], min_length=1, max_length=8)
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints")

    # --- execution ---
    num_workers: int = Field(0, ge=0, le=64, description="data-loader worker processes")
    amp: bool = Field(True, description="mixed precision (CUDA only)")
    channels_last: bool = Field(True, description="channels-last memory format (CUDA only)")

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        return validate_dataset_ref(v)

    @field_validator("knn_k")
    @classmethod
    def _knn_k(cls, v: list[int]) -> list[int]:
        if any(k < 1 for k in v):
            raise ValueError("every k must be >= 1")
        return sorted(set(v))

    @field_validator("batch_size")
    @classmethod
    def _batch_fits(cls, v: int, info: ValidationInfo) -> int:
        limit = info.data.get("limit_train")
        if limit is not None and limit < v:
            raise ValueError(f"{v} exceeds limit_train={limit}: not even one batch could be formed")
        return v

    @field_validator("bank_size")
    @classmethod
    def _bank_divides(cls, v: int, info: ValidationInfo) -> int:
        batch = info.data.get("batch_size")
        if batch and v % batch:
            suggestion = max(1, round(v / batch)) * batch
            raise ValueError(f"{v} is not a multiple of batch_size={batch} (the bank is written a batch at a "
                             f"time); try {suggestion}")
        return v

    @field_validator("topk")
    @classmethod
    def _topk(cls, v: int | None, info: ValidationInfo) -> int:
        method = info.data.get("method")
        if v is None:
            return 1 if method == "byol" else 5
        if method == "byol" and v != 1:
            raise ValueError("method 'byol' is MSF with topk=1; drop topk or use method 'msf'")
        bank = info.data.get("bank_size")
        if bank is not None and v > bank:
            raise ValueError(f"{v} exceeds bank_size={bank}")
        return v

    def dataset_problems(self, train_images: int) -> list[tuple[str, str]]:
        n = min(train_images, self.limit_train or train_images)
        problems = []
        if self.batch_size > n:
            problems.append(("batch_size", f"{self.batch_size} exceeds the {n} training images available"))
        if self.bank_size > n:
            problems.append(("bank_size", f"{self.bank_size} exceeds the {n} training images: the bank would hold "
                                          f"stale copies of the same images; use at most {n // self.batch_size * self.batch_size}"))
        return problems
