"""Fields shared by every vision training job (ssl-train, distill): data, backbone, optimisation, evaluation."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, get_args

from pydantic import Field, ValidationInfo, field_validator, model_validator

from shared.specs.common import (
    MAX_KNN_K,
    MAX_SEED,
    JobSpecBase,
    knn_problems,
    validate_dataset_ref,
    validate_knn_k,
)

# --- the backbone registry ------------------------------------------------------------------------------
# One table, torch-free so that importing the specs stays cheap: the spec fields validate against it and the
# factory (workers/vision/backbones.py) builds from it; tests/unit/test_backbones.py asserts both agree.


class ViTArch(NamedTuple):
    """A timm ``VisionTransformer`` (CLS-token pooling, pre-norm blocks)."""

    patch_size: int
    depth: int
    heads: int
    native_size: int  # the position embedding is learnt on this grid; other sizes resample it (bicubic)
    mlp_ratio: float = 4.0


class BackboneInfo(NamedTuple):
    family: Literal["resnet", "vit"]
    feature_dim: int  # width D of the pooled feature
    min_image_size: int
    max_image_size: int
    vit: ViTArch | None = None
    note: str = ""

    @property
    def size_step(self) -> int:
        """Image sides must be a multiple of this (a ViT's patch size; 1 for a ResNet)."""
        return self.vit.patch_size if self.vit else 1


def _vit(dim: int, depth: int, heads: int, patch: int, native: int, lo: int, hi: int, note: str) -> BackboneInfo:
    return BackboneInfo("vit", dim, lo, hi, ViTArch(patch, depth, heads, native), note)


BACKBONES: dict[str, BackboneInfo] = {
    # torchvision ResNets (+ resnet10, one BasicBlock per stage: the PatchSearch poison classifier)
    "resnet10": BackboneInfo("resnet", 512, 8, 512, note="BasicBlock x [1,1,1,1]"),
    "resnet18": BackboneInfo("resnet", 512, 8, 512),
    "resnet34": BackboneInfo("resnet", 512, 8, 512),
    "resnet50": BackboneInfo("resnet", 2048, 8, 512),
    "resnet101": BackboneInfo("resnet", 2048, 8, 512),
    "resnet152": BackboneInfo("resnet", 2048, 8, 512),
    "wide_resnet50_2": BackboneInfo("resnet", 2048, 8, 512),
    # ViTs for 8-128 px on CPU: "micro" = width 64, depth 4, 4 heads (~0.2M parameters, the toy ViT of the
    # backdoor studies); "tiny" = ViT-Ti/DeiT-T widths (192, 12 blocks, 3 heads). pN = N-pixel patches.
    "vit_micro_p2": _vit(64, 4, 4, 2, 16, 8, 32, "64 tokens at 16 px"),
    "vit_micro_p4": _vit(64, 4, 4, 4, 32, 16, 64, "64 tokens at 32 px"),
    "vit_micro_p8": _vit(64, 4, 4, 8, 64, 32, 128, "64 tokens at 64 px"),
    "vit_tiny_p4": _vit(192, 12, 3, 4, 32, 16, 64, "ViT-Ti widths, 64 tokens at 32 px"),
    "vit_tiny_p8": _vit(192, 12, 3, 8, 64, 32, 128, "ViT-Ti widths, 64 tokens at 64 px"),
    # the standard ViTs (GPU): ViT-Ti/16 (DeiT-T), ViT-S/16, ViT-B/16 at 224 px
    "vit_tiny_p16": _vit(192, 12, 3, 16, 224, 64, 512, "ViT-Ti/16"),
    "vit_small_p16": _vit(384, 12, 6, 16, 224, 64, 512, "ViT-S/16"),
    "vit_base_p16": _vit(768, 12, 12, 16, 224, 64, 512, "ViT-B/16"),
}

Backbone = Literal[
    "resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
    "vit_micro_p2", "vit_micro_p4", "vit_micro_p8", "vit_tiny_p4", "vit_tiny_p8",
    "vit_tiny_p16", "vit_small_p16", "vit_base_p16",
]
if set(get_args(Backbone)) != set(BACKBONES):  # the Literal (for the JSON schema) must list the table
    raise RuntimeError(f"shared.specs.vision: Backbone lists {sorted(get_args(Backbone))}, "
                       f"the table {sorted(BACKBONES)}")
Stem = Literal["cifar", "imagenet"]


_BACKBONE_HELP = "ResNets: image_size 8-512; ViTs (timm, vit_<size>_p<patch>; sides a multiple of the patch): " + \
    ", ".join(f"{n} {i.min_image_size}-{i.max_image_size}" for n, i in BACKBONES.items() if i.vit)


def backbone_info(name: str) -> BackboneInfo:
    """The registry row of ``name``; a ValueError naming the known backbones otherwise."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}") from None


def image_size_problem(name: str, image_size: int) -> str | None:
    """Why ``image_size`` does not suit backbone ``name`` (None when it does)."""
    info = backbone_info(name)
    step = info.size_step
    if not info.min_image_size <= image_size <= info.max_image_size or image_size % step:
        sizes = f"{info.min_image_size}-{info.max_image_size} px" + (f", a multiple of its patch size {step}"
                                                                     if step > 1 else "")
        near = [n for n, i in BACKBONES.items() if i.family == info.family and i.min_image_size <= image_size
                <= i.max_image_size and image_size % i.size_step == 0]
        hint = f"; for {image_size} px try {', '.join(near)}" if near else ""
        return f"{name} takes image_size {sizes}, got {image_size}{hint}"
    return None


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
    backbone: Backbone = Field("resnet18", description=_BACKBONE_HELP)
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

    @field_validator("backbone")
    @classmethod
    def _backbone_fits(cls, v: str, info: ValidationInfo) -> str:
        size = info.data.get("image_size")
        problem = image_size_problem(v, size) if size is not None else None
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("stem")
    @classmethod
    def _stem(cls, v: str, info: ValidationInfo) -> str:
        name = info.data.get("backbone")
        if v != "cifar" and name is not None and BACKBONES[name].family != "resnet":
            raise ValueError(f"{name} is a ViT: the stem applies to ResNets only (leave it at 'cifar')")
        return v

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
