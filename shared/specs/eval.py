"""``eval``: evaluate any checkpoint's backbone - k-NN and the reference linear-probe protocol (ssl.md §1.9)."""

from __future__ import annotations

from typing import ClassVar, Literal, get_args

from pydantic import Field, field_validator

from shared.specs.common import (
    MAX_SEED,
    JobSpecBase,
    StrictModel,
    knn_problems,
    validate_checkpoint_ref,
    validate_dataset_ref,
    validate_knn_k,
)


class LinearProbeOptions(StrictModel):
    """L2-normalise → standardise (train-set statistics) → linear; SGD, step LR (reference: 40 epochs, ×0.1 at
    15 and 30). The backbone is frozen and in eval mode: this is a probe, not fine-tuning."""

    epochs: int = Field(40, ge=1, le=1000)
    lr: float = Field(0.01, gt=0, le=100)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0, le=1)
    batch_size: int = Field(256, ge=1, le=65_536)
    milestones: list[int] = Field(default_factory=lambda: [15, 30], max_length=32)
    augment: bool = Field(True, description="RandomResizedCrop + flip on training images (reference); "
                                            "False: features are computed once and cached (fast)")


class AttackOptions(StrictModel):
    """Protocol ``attack`` (workers/evaluator/attack.py): backdoor metrics on a dataset made by a poison job;
    ``block``: the ViT test-time blocking defense (attention-gradient rollout) with its random-block control."""

    probe_includes_poisons: bool | None = Field(
        None, description="train the probe on the poisoned images too (the ViT-backdoor threat model: the head is "
                          "trained on poisoned labelled data). Default: yes for a badnets-mode dataset, no for "
                          "ssl mode (the victim's labelled data is clean)")
    block: bool = Field(False, description="mask the most-attended window and classify again (ViT backbones)")
    block_size: int | None = Field(None, ge=1, le=512, description="window side; default the trigger's side")
    block_fill: Literal["black", "mean"] = Field("black", description="black: 0 in pixel space (the reference); "
                                                                      "mean: the image's mean colour")
    discard_ratio: float = Field(0.9, ge=0, lt=1, description="rollout: share of the lowest attention entries zeroed")
    heatmaps: int = Field(8, ge=0, le=64, description="patched images whose rollout maps are saved as an image")


Protocol = Literal["knn", "linear", "attack"]
PROTOCOLS: tuple[Protocol, ...] = ("knn", "linear")  # the default; "attack" needs a poisoned dataset


class EvalSpec(JobSpecBase):
    critical_keys: ClassVar[tuple[str, ...]] = ("checkpoint", "dataset", "protocols", "train_fraction", "seed")
    report_results_to_inputs: ClassVar[bool] = True

    kind: Literal["eval"] = "eval"
    checkpoint: str = Field(description="job:<id> (that job's final checkpoint) or artifact:<id>")
    dataset: str = Field("builtin://shapes", description="builtin://mnist|digits|shapes, a dataset id or name")
    limit_train: int | None = Field(None, ge=1, le=10**9)
    limit_test: int | None = Field(None, ge=1, le=10**9)
    image_size: int | None = Field(None, ge=8, le=512, description="default: the size the checkpoint trained at")
    train_fraction: float = Field(1.0, gt=0, le=1, description="labelled share used (0.01, 0.1 for semi-sup. "
                                                               "evaluation): k-NN database and probe training")
    protocols: list[Protocol] = Field(default_factory=lambda: list(PROTOCOLS), min_length=1,
                                      max_length=len(get_args(Protocol)))
    knn_k: list[int] = Field(default_factory=lambda: [1, 20], min_length=1, max_length=8,
                             description="unweighted majority vote (reference); weighted k=200 is reported too")
    linear: LinearProbeOptions = Field(default_factory=LinearProbeOptions)
    attack: AttackOptions = Field(default_factory=AttackOptions)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    num_workers: int = Field(0, ge=0, le=64)

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint(cls, v: str) -> str:
        return validate_checkpoint_ref(v)

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        return validate_dataset_ref(v)

    @field_validator("knn_k")
    @classmethod
    def _knn_k(cls, v: list[int]) -> list[int]:
        return validate_knn_k(v)

    @field_validator("protocols")
    @classmethod
    def _protocols(cls, v: list[str]) -> list[str]:
        return sorted(set(v))

    @field_validator("linear")
    @classmethod
    def _milestones(cls, v: LinearProbeOptions) -> LinearProbeOptions:
        if any(not 1 <= m <= 1000 for m in v.milestones) or sorted(v.milestones) != v.milestones:
            raise ValueError("linear.milestones must be increasing epoch numbers from 1 to 1000")
        return v

    def checkpoint_inputs(self) -> dict[str, str]:
        return {"checkpoint": self.checkpoint}

    def dataset_problems(self, train_images: int) -> list[tuple[str, str]]:
        n = min(train_images, self.limit_train or train_images)
        if "knn" not in self.protocols or "knn_k" not in self.model_fields_set:
            return []  # the default [1, 20] is clamped on tiny datasets
        return knn_problems(self.knn_k, max(1, int(n * self.train_fraction)))
