"""``patchsearch``: find and remove patch-trigger poisons from an SSL training set with a model trained on it.

PatchSearch (Tejankar et al., CVPR 2023, arXiv 2304.01482; ``../shared/methods/security-clip-experts.md`` §2).
Code: ``workers/poison_scanner/patchsearch``. The four stages and their defaults (ImageNet-100 values at 224 px;
pixel sizes scale with the image side ``S`` when left unset):

1. embed every training image with the checkpoint's backbone (L2-normalised), faiss k-means into ``clusters``;
2. Grad-CAM on the cluster-assignment head ``s_j(x) = cos(f(x), c_j)`` picks each candidate's ``window``;
3. the poison score of a candidate: paste its window into every image of the per-cluster test set (the
   members nearest their centroids) and count the test images that flip into the candidate's cluster;
4. the iterative search scores ``samples_per_iteration`` images per surviving cluster per round and prunes
   ``prune_fraction`` of the clusters with the lowest best score; then a poison-classifier ensemble trained on
   the ``classifier.topk_poisons`` best windows decides which images to remove.

**No poison found** (not in the reference, which always removes what its ensemble flags): the ensemble is
scored on its own validation set (the top-N scored images as positives, the bottom N as negatives, unpasted).
If the top-scored images share a trigger, the classifier trained on their windows recognises them (F1 near 1);
if they are ordinary images with merely the highest flip counts (a clean dataset), their windows have nothing
in common and F1 stays low. Below ``min_classifier_f1`` the job removes nothing and states why in its log,
result (``no_poison_found``, ``classifier_val_f1``) and report (``decision``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from shared.specs.common import MAX_SEED, JobSpecBase, StrictModel, validate_checkpoint_ref, validate_dataset_ref

REFERENCE_SIDE = 224  # the reference's pixel sizes are for 224-px images
# Kinds whose final checkpoint is a model checkpoint (backbone + meta) that PatchSearch can embed with.
MODEL_PRODUCERS = ("ssl-train", "distill")


def scaled(pixels_at_224: float, side: int, *, minimum: int = 1) -> int:
    """A reference pixel size at ``side`` px (60 px at 224 -> 4 px at 16)."""
    return max(minimum, round(pixels_at_224 * side / REFERENCE_SIDE))


class PoisonClassifierOptions(StrictModel):
    """§2.4: the ensemble trained on pasted top-k windows (reference defaults)."""

    topk_poisons: int = Field(20, ge=1, le=10_000, description="patch bank: the windows of the k best-scored images")
    exclude_top_fraction: float = Field(0.10, ge=0, lt=1, description="top_p: highest-scored share kept out of "
                                                                      "the negatives (likely poisons)")
    validation_images: int = Field(20, ge=1, le=10_000, description="top-N scores are validation positives, "
                                                                     "bottom-N validation negatives")
    models: int = Field(5, ge=1, le=20, description="ensemble size (logits averaged)")
    backbone: Literal["resnet10", "resnet18"] = Field("resnet10", description="ResNet [1,1,1,1] as the reference")
    max_iterations: int = Field(2000, ge=1, le=1_000_000)
    batch_size: int = Field(32, ge=2, le=4096)
    lr: float = Field(0.01, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0, le=1)
    eval_every: int = Field(20, ge=1, le=100_000, description="iterations between validation F1 checks")
    patience: int = Field(10, ge=1, le=1000, description="stop when int(100*F1) was the same for this many checks")
    paste_min: int | None = Field(None, ge=1, le=512, description="smallest pasted patch side (default 20 px at "
                                                                  "224, scaled)")
    paste_max: int | None = Field(None, ge=1, le=512, description="largest pasted side (default 79 px at 224)")
    margin: int | None = Field(None, ge=0, le=256, description="paste margin from the border (10 px at 224)")
    crop_scale: tuple[float, float] = Field((0.2, 1.0), description="RandomResizedCrop scale of the samples")

    @model_validator(mode="after")
    def _ranges(self) -> PoisonClassifierOptions:
        if self.paste_min is not None and self.paste_max is not None and self.paste_min > self.paste_max:
            raise ValueError(f"paste_min={self.paste_min} exceeds paste_max={self.paste_max}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        return self


class PatchSearchSpec(JobSpecBase):
    critical_keys: ClassVar[tuple[str, ...]] = ("checkpoint", "dataset", "clusters", "seed")

    kind: Literal["patchsearch"] = "patchsearch"
    checkpoint: str = Field(description="job:<id> (that ssl-train job's final checkpoint) or artifact:<id>: the "
                                        "model trained on the (possibly poisoned) dataset")
    dataset: str = Field(description="the dataset that model was trained on (a dataset id or name; a "
                                     "poison_manifest.json at its root enables the detection metrics)")
    image_size: int | None = Field(None, ge=8, le=512, description="default: the size the checkpoint trained at")
    # --- stage 1: clustering
    clusters: int = Field(1000, ge=2, le=100_000, description="k-means clusters l (1000 on ImageNet-100; ~50 for "
                                                              "a few thousand images)")
    kmeans_iters: int = Field(20, ge=1, le=1000)
    # --- stage 2: candidate windows and the poison score
    window: int | None = Field(None, ge=1, le=512, description="candidate window side w (default 60 px at 224, "
                                                               "scaled: ~1.2x the trigger side)")
    patches_per_image: int = Field(1, ge=1, le=8, description="windows per image (repeat_patch); each next one "
                                                              "after blanking the previous (the reference never did)")
    test_images: int = Field(1000, ge=1, le=100_000, description="per-cluster test set size s: floor(s/l) nearest "
                                                                 "members per cluster (or nearest of s clusters)")
    # --- stage 3: iterative search
    samples_per_iteration: int = Field(2, ge=1, le=1000, description="images scored per cluster per round")
    prune_fraction: float = Field(0.25, gt=0, lt=1, description="share of candidate clusters dropped per round")
    # --- stage 4: poison classifier and removal
    classifier: PoisonClassifierOptions = Field(default_factory=PoisonClassifierOptions)
    min_classifier_f1: float = Field(0.8, ge=0, le=1, description="the 'no poison found' rule: when the "
                                     "ensemble's F1 on its validation set (top-N scored images as positives, "
                                     "bottom N as negatives) is below this, no consistent trigger was found and "
                                     "nothing is removed (0: always remove what the ensemble flags, the "
                                     "reference). Default chosen on one 16-px toy (README)")
    max_removed_fraction: float = Field(1.0, gt=0, le=1, description="cap on the share of images removed: beyond "
                                        "it only the highest P(poison) are (1: no cap, the reference)")
    save_top_patches: int = Field(100, ge=1, le=1000, description="windows of the best-scored images in the grid")
    filtered_name: str | None = Field(None, max_length=128, description="name of the filtered dataset "
                                                                        "(default: <dataset name>-filtered)")
    seed: int = Field(10, ge=0, le=MAX_SEED, description="the reference's search seed")
    batch_size: int = Field(256, ge=1, le=65_536, description="inference batch size")

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint(cls, v: str) -> str:
        return validate_checkpoint_ref(v)

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        return validate_dataset_ref(v)

    @field_validator("filtered_name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        import re

        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", v):
            raise ValueError("must be 1-128 characters of letters, digits, '.', '_' or '-'")
        return v

    @model_validator(mode="after")
    def _window_fits(self) -> PatchSearchSpec:
        if self.image_size is not None:
            problem = self.image_size_problem(self.image_size)
            if problem:
                raise ValueError(problem)
        return self

    def image_size_problem(self, side: int) -> str | None:
        """Why the pixel settings do not fit ``side`` px images (None when they do)."""
        w = self.window if self.window is not None else scaled(60, side)
        if w >= side:
            return f"window={w} must be smaller than the {side}-px images"
        hi = self.classifier.paste_max
        if hi is not None and hi + 2 * (self.classifier.margin or 0) >= side:
            return f"classifier.paste_max={hi} plus twice the margin must be smaller than the {side}-px images"
        return None

    def checkpoint_inputs(self) -> dict[str, str]:
        return {"checkpoint": self.checkpoint}

    def checkpoint_problems(self, name: str, *, producer_kind: str | None,
                            producer_spec: dict[str, Any] | None) -> list[tuple[str, str]]:
        """At submit: the checkpoint must come from a job that writes model checkpoints, at a size we can use."""
        if producer_kind is None:
            return []
        if producer_kind not in MODEL_PRODUCERS:
            return [(name, f"{self.checkpoint} comes from a {producer_kind!r} job, which writes no model "
                           f"(backbone) checkpoint; pass the checkpoint of an {' or '.join(MODEL_PRODUCERS)} "
                           "job trained on this dataset")]
        size = (producer_spec or {}).get("image_size")
        if self.image_size is None and isinstance(size, int):
            problem = self.image_size_problem(size)
            if problem:
                return [("window", f"{problem} (the checkpoint trained at {size} px)")]
        return []

    def dataset_problems(self, train_images: int) -> list[tuple[str, str]]:
        if self.clusters > train_images:
            return [("clusters", f"{self.clusters} clusters exceed the {train_images} training images; use at "
                                 f"most {train_images} (about n/30 works)")]
        need = 2 * self.classifier.validation_images
        if need > train_images:
            return [("classifier.validation_images", f"{self.classifier.validation_images} top + bottom validation "
                                                     f"images need {need} training images, the dataset has "
                                                     f"{train_images}")]
        return []
