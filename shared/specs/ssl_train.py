"""``ssl-train``: self-supervised pre-training on the ssl-trainer worker.

Methods (``../shared/methods/ssl.md`` in the brief; code in ``workers/ssl_trainer``):

* ``msf``  - Mean Shift (ICCV 2021): pull the online prediction towards the mean of the k nearest neighbours
  of the target embedding in a memory bank (bank written before the search).
* ``byol`` - MSF with k=1 (asymmetric BYOL): the only neighbour is the target itself.
* ``cmsf`` - Constrained Mean Shift (ECCV 2022): the neighbours are searched only among bank entries allowed
  by a constraint (``cmsf.constraint``): previous-epoch views (2q), k-means clusters, labels, confident
  pseudo-labels, or another model's embedding space (cross-modal).
* ``isd``  - Iterative Similarity Distillation (ICCV 2021): the student matches the EMA teacher's soft
  similarity distribution over the bank (bank written after the similarities). Recipes ``r18`` and ``plus``.
* ``moco`` - MoCo v2: InfoNCE of the query against its momentum key and a queue of past keys (the bank,
  ``bank_size`` = K); ``temperature`` 0.2; optional i-CutMix of the query views (``icutmix``, PatchSearch).
* ``simclr`` - SimCLR: NT-Xent with in-batch negatives (``temperature``); no bank.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from shared.specs.common import StrictModel, validate_checkpoint_ref
from shared.specs.recipes import AugmentOptions, family_of, resolve_augment, schedule_defaults
from shared.specs.vision import VisionTrainingSpec

Augmentation = Literal["weak/strong", "strong/strong", "weak/weak", "strong/weak"]
Constraint = Literal["2q", "kmeans", "supervised", "semi-supervised", "cross-modal"]


class CmsfOptions(StrictModel):
    """How CMSF restricts the neighbour search (ssl.md §3)."""

    constraint: Constraint = "2q"
    topk_constraint: int = Field(5, ge=1, le=4096, description="k': size of the constraint set (2q, cross-modal)")
    kmeans_clusters: int = Field(100, ge=2, le=1_000_000,
                                 description="clusters for 'kmeans' (50k on ImageNet; scale to data)")
    kmeans_iters: int = Field(20, ge=1, le=1000)
    label_fraction: float = Field(0.1, gt=0, le=1, description="labelled share for 'semi-supervised' (0.01, 0.1)")
    confidence_threshold: float = Field(0.85, gt=0, le=1, description="pseudo-labels below it constrain nothing")
    pseudo_head: Literal["linear", "mlp"] = "mlp"
    head_epochs: int = Field(10, ge=1, le=200, description="epochs of each pseudo-label head re-training")
    cross_modal_checkpoint: str | None = Field(
        None, description="for 'cross-modal': job:<id> or artifact:<id> of the model whose embeddings constrain")
    cross_modal_features: Literal["backbone", "projection"] = Field(
        "backbone", description="for 'cross-modal': that model's pooled backbone features, or its projection "
                                "head on top (needs a checkpoint that exports 'projector')")

    @field_validator("cross_modal_checkpoint")
    @classmethod
    def _ref(cls, v: str | None) -> str | None:
        return None if v is None else validate_checkpoint_ref(v)

    @model_validator(mode="after")
    def _cross_modal_needs_model(self) -> CmsfOptions:
        if self.constraint == "cross-modal" and self.cross_modal_checkpoint is None:
            raise ValueError("constraint 'cross-modal' needs cross_modal_checkpoint (job:<id> or artifact:<id>)")
        return self


class IsdOptions(StrictModel):
    """ISD temperatures and heads; unset values come from the recipe (ssl.md §4.3)."""

    recipe: Literal["r18", "plus"] = "plus"
    temperature_student: float | None = Field(None, gt=0, le=10, description="r18: 0.02, plus: 0.1")
    temperature_teacher: float | None = Field(None, gt=0, le=10, description="r18: 0.02, plus: 0.01")

    @model_validator(mode="after")
    def _recipe(self) -> IsdOptions:
        t_s, t_t = (0.02, 0.02) if self.recipe == "r18" else (0.1, 0.01)
        self.temperature_student = self.temperature_student or t_s
        self.temperature_teacher = self.temperature_teacher or t_t
        return self


# ISD recipes also change the shared optimisation fields unless the user set them (ssl.md §4.3, §6).
_ISD_RECIPES: dict[str, dict[str, Any]] = {
    "r18": {"lr": 0.01, "lr_schedule": "step", "ema_momentum": 0.999, "augmentation": "strong/strong"},
    "plus": {"lr": 0.05, "lr_schedule": "cosine", "ema_momentum": 0.99, "augmentation": "weak/strong"},
}


class SslTrainSpec(VisionTrainingSpec):
    """Pre-train a backbone with MSF, BYOL, CMSF or ISD; evaluate it with k-NN during and after training."""

    critical_keys: ClassVar[tuple[str, ...]] = (
        "method", "dataset", "limit_train", "image_size", "backbone", "stem", "batch_size", "bank_size", "topk",
        "augmentation", "augment", "proj_hidden_dim", "proj_dim", "seed", "cmsf", "isd",
        "temperature", "icutmix", "icutmix_alpha",
    )

    kind: Literal["ssl-train"] = "ssl-train"
    method: Literal["msf", "byol", "cmsf", "isd", "moco", "simclr"] = Field(
        "msf", description="byol = msf with topk=1; moco = MoCo v2 (queue = bank); simclr = in-batch negatives")
    augmentation: Augmentation = Field(
        "weak/strong", description="target/online views: 'weak/strong' gives the weak view to the EMA target")
    augment: AugmentOptions = Field(
        default_factory=AugmentOptions,
        description="the views' recipe (crop, flips, colour, blur): the dataset family's preset "
                    "(shared/specs/recipes.py), field by field overridable; resolved at validation")
    warmup_epochs: int = Field(
        0, ge=0, validate_default=True,
        description="linear LR warm-up epochs before the schedule (default from the dataset family's preset)")
    proj_hidden_dim: int | None = Field(None, ge=8, le=16_384, description="default 2x backbone width")
    proj_dim: int | None = Field(None, ge=8, le=16_384, description="default backbone width / 4")

    # --- method (after batch_size: the bank is checked against it) ---
    bank_size: int = Field(
        8192, ge=1, le=2**24, validate_default=True,
        description="memory bank rows K; must be a multiple of batch_size")
    topk: int | None = Field(
        None, ge=1, le=1024, validate_default=True,
        description="neighbours averaged into the target (k); default 5 for msf/cmsf, 1 for byol; unused by isd")
    ema_momentum: float = Field(0.99, ge=0.0, le=1.0)
    cmsf: CmsfOptions | None = Field(None, description="CMSF options (method 'cmsf'; defaults when omitted)")
    isd: IsdOptions | None = Field(None, description="ISD options (method 'isd'; defaults when omitted)")
    temperature: float = Field(0.2, gt=0, le=10, description="InfoNCE / NT-Xent temperature (moco, simclr)")
    icutmix: bool = Field(False, description="i-CutMix of the query views (PatchSearch; method 'moco' only)")
    icutmix_alpha: float = Field(1.0, gt=0, le=100, description="lam ~ Beta(alpha, alpha), folded to >= 0.5")

    @classmethod
    def recipe_defaults(cls, data: dict[str, Any]) -> dict[str, Any]:
        # The dataset family's schedule (epochs, warm-up, image size), then the method's recipe on top.
        defaults = schedule_defaults(family_of(data))
        if data.get("method") == "isd":  # not validated yet: any JSON value may be here
            isd = data.get("isd") or {}
            recipe = isd.get("recipe", "plus") if isinstance(isd, dict) else "plus"
            defaults |= _ISD_RECIPES.get(recipe, {}) if isinstance(recipe, str) else {}
        return defaults

    @model_validator(mode="before")
    @classmethod
    def _legacy_color_jitter(cls, data: Any) -> Any:
        # Specs written before the augment block set a top-level color_jitter; it now lives in augment.
        if isinstance(data, dict) and "color_jitter" in data:
            data = dict(data)
            jitter = data.pop("color_jitter")
            augment = data.get("augment") or {}
            if isinstance(augment, dict):
                if augment.get("color_jitter") not in (None, jitter):
                    raise ValueError("color_jitter is set twice (top level and augment.color_jitter); keep "
                                     "augment.color_jitter")
                data["augment"] = {**augment, "color_jitter": jitter}
        return data

    @property
    def color_jitter(self) -> list[float]:
        """The strong views' ColorJitter of the resolved recipe (``augment.color_jitter``)."""
        return list(self.augment.color_jitter or [])

    @field_validator("warmup_epochs")
    @classmethod
    def _warmup(cls, v: int, info: ValidationInfo) -> int:
        epochs = info.data.get("epochs")
        if epochs is not None and v >= epochs:
            raise ValueError(f"{v} warm-up epochs leave none of the {epochs} epochs for the schedule")
        return v

    @field_validator("bank_size")
    @classmethod
    def _bank_divides(cls, v: int, info: ValidationInfo) -> int:
        batch = info.data.get("batch_size")
        if info.data.get("method") == "simclr":
            return v  # no bank
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
            return 1 if method in ("byol", "isd") else 5
        if method == "byol" and v != 1:
            raise ValueError("method 'byol' is MSF with topk=1; drop topk or use method 'msf'")
        bank = info.data.get("bank_size")
        if bank is not None and v > bank:
            raise ValueError(f"{v} exceeds bank_size={bank}")
        return v

    @model_validator(mode="after")
    def _resolve_augment(self) -> SslTrainSpec:
        family = family_of({"augment": self.augment, "dataset": self.dataset})
        self.augment = resolve_augment(self.augment, family=family, image_size=self.image_size)
        return self

    @model_validator(mode="after")
    def _method_options(self) -> SslTrainSpec:
        if self.method == "cmsf" and self.cmsf is None:
            self.cmsf = CmsfOptions()
        if self.method == "isd" and self.isd is None:
            self.isd = IsdOptions()
        if self.cmsf is not None and self.method != "cmsf":
            raise ValueError("cmsf options given but method is not 'cmsf'")
        if self.isd is not None and self.method != "isd":
            raise ValueError("isd options given but method is not 'isd'")
        if self.icutmix and self.method != "moco":
            raise ValueError(f"icutmix is implemented for method 'moco' (PatchSearch retrains MoCo), not "
                             f"{self.method!r}; set method: moco or drop icutmix")
        if self.method == "simclr" and self.resources.gpus > 1:
            raise ValueError("method 'simclr' draws its negatives from one process's batch; use resources.gpus <= 1 "
                             "or method 'moco'")
        if self.cmsf is not None and self.cmsf.topk_constraint < (self.topk or 1) and \
                self.cmsf.constraint in ("2q", "cross-modal"):
            raise ValueError(f"cmsf.topk_constraint={self.cmsf.topk_constraint} must be >= topk={self.topk}: the "
                             "neighbours are chosen inside the constraint set")
        gpus = self.resources.gpus
        if gpus > 1 and self.batch_size % gpus:
            better = max(gpus, round(self.batch_size / gpus) * gpus)
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of resources.gpus={gpus} (it is the "
                             f"global batch, split evenly over the processes); try batch_size={better} (and a "
                             "bank_size that is a multiple of it)")
        return self

    def checkpoint_inputs(self) -> dict[str, str]:
        if self.cmsf is not None and self.cmsf.cross_modal_checkpoint:
            return {"cmsf.cross_modal_checkpoint": self.cmsf.cross_modal_checkpoint}
        return {}

    def dataset_problems(self, train_images: int) -> list[tuple[str, str]]:
        problems = super().dataset_problems(train_images)
        n = min(train_images, self.limit_train or train_images)
        if self.bank_size > n and self.method != "simclr":
            problems.append(("bank_size", f"{self.bank_size} exceeds the {n} training images: the bank would hold "
                                          "stale copies of the same images; use at most "
                                          f"{n // self.batch_size * self.batch_size}"))
        if self.cmsf is not None and self.cmsf.constraint == "kmeans" and self.cmsf.kmeans_clusters > n:
            problems.append(("cmsf.kmeans_clusters", f"{self.cmsf.kmeans_clusters} clusters for {n} training images; "
                                                     f"use at most {n} (a few times the class count works well)"))
        return problems
