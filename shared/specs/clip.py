"""CLIP-style training on (bag-of-words) captions: ``clip-train``, ``clip-pseudo-caption``, ``clip-eval``.

Re-implementation of "A Fistful of Words" (Tejankar et al., arXiv 2112.13884; methods file section 4). No
official code exists, so the hyper-parameters below are our defaults for small CPU runs, not the paper's
(which are marked [R]/[M] there: ResNet-50, width 768, SGD lr 0.003, batch 512, fixed temperature 0.02).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from shared.specs.common import MAX_SEED, JobSpecBase, StrictModel, validate_checkpoint_ref, validate_dataset_ref

Balance = Literal["none", "top_freq", "subsample", "metaclip"]
DEFAULT_TEMPLATES = ["a photo of a {}."]


class CaptionOps(StrictModel):
    """The caption operators (workers/clip_bow/captions.py), applied per caption and resampled every epoch.

    ``bow``: a BoW caption = ``RmStopNalpha`` -> ``Dedupe`` -> ``Shuffle`` (section 4.3), applied to a share
    ``bow_fraction`` (r) of the captions, the others stay full. ``balance`` (word balancing, BoW captions only):
    ``top_freq`` drops the ``top_freq`` most frequent corpus words (``RmTopFreq(t)``, the faithful default);
    ``subsample`` keeps word w with probability ``min(1, sqrt(theta / f(w)))`` (word2vec; f = relative frequency);
    ``metaclip`` keeps it with probability ``min(1, t / count(w))`` (MetaCLIP's balancing, t = ``metaclip_t``).
    ``keep``: keep the first n words afterwards (``Keep(n)``: n random words after the shuffle).
    """

    bow: bool = False
    bow_fraction: float = Field(1.0, ge=0, le=1, description="share r of captions turned into BoW")
    balance: Balance = "none"
    top_freq: int = Field(3, ge=0, le=10_000, description="t of RmTopFreq(t)")
    subsample_theta: float = Field(1e-2, gt=0, le=1, description="theta of word2vec-style subsampling")
    metaclip_t: int = Field(200, ge=1, le=10**9, description="t of MetaCLIP balancing, keep p = t / count")
    keep: int | None = Field(None, ge=1, le=512, description="Keep(n)")

    @model_validator(mode="after")
    def _balance_needs_bow(self) -> CaptionOps:
        if self.balance != "none" and not self.bow:
            raise ValueError("balance applies to BoW captions: set bow: true (or balance: none)")
        return self


class ZeroShotOptions(StrictModel):
    """Class-name prompts: every template is filled with the class name, sent through the training caption
    operators (deterministically: no shuffle, no random drop) unless ``transform_prompts`` is False, encoded,
    L2-normalised, averaged per class and renormalised (the ensemble)."""

    templates: list[str] = Field(default_factory=lambda: list(DEFAULT_TEMPLATES), min_length=1, max_length=100)
    attributes: list[str] = Field(default_factory=lambda: ["shape", "colour"], min_length=1, max_length=16,
                                  description="label dimensions to classify (builtin://scenes: shape, colour, "
                                              "size, position, texture, count; an upload: class)")
    transform_prompts: bool = True

    @field_validator("templates")
    @classmethod
    def _one_slot(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if t.count("{}") != 1]
        if bad:
            raise ValueError(f"every template needs exactly one '{{}}' for the class name; got {bad[0][:80]!r}")
        return v


class ClipDataFields(StrictModel):
    dataset: str = Field("builtin://scenes", description="builtin://scenes or a dataset uploaded with "
                                                         "format=captioned (or made by clip-pseudo-caption)")
    limit_train: int | None = Field(None, ge=1, le=10**9)
    limit_test: int | None = Field(None, ge=1, le=10**9)

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        v = validate_dataset_ref(v)
        if v.startswith("builtin://") and v != "builtin://scenes":
            raise ValueError(f"{v} has no captions: use builtin://scenes or a dataset uploaded with format=captioned")
        return v


class ClipTrainSpec(JobSpecBase, ClipDataFields):
    critical_keys: ClassVar[tuple[str, ...]] = (
        "dataset", "limit_train", "captioned_fraction", "image_size", "image_encoder", "text_encoder", "embed_dim",
        "text_width", "text_layers", "context_length", "captions", "epochs", "batch_size", "accum_freq", "lr",
        "seed")

    kind: Literal["clip-train"] = "clip-train"
    captioned_fraction: float = Field(1.0, gt=0, le=1, description="use the captions of only this share of the "
                                                                   "captioned images (the rest count as uncaptioned)")
    image_size: int = Field(32, ge=16, le=256)
    image_encoder: str = Field("convnet", description="'convnet' (4 conv layers, for CPU runs) or a backbone of "
                                                      "the registry (resnet18, vit_micro_p4, ...)")
    text_encoder: Literal["bow", "transformer"] = Field(
        "transformer", description="bow: nn.EmbeddingBag mean of word embeddings (order-free); transformer: "
                                   "open_clip's Transformer blocks with positions, mean-pooled (section 4.2)")
    embed_dim: int = Field(128, ge=8, le=4096)
    text_width: int = Field(128, ge=8, le=4096)
    text_layers: int = Field(2, ge=1, le=48)
    text_heads: int = Field(4, ge=1, le=64)
    context_length: int = Field(32, ge=4, le=512)
    captions: CaptionOps = Field(default_factory=CaptionOps)
    zero_shot: ZeroShotOptions = Field(default_factory=ZeroShotOptions)
    epochs: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(256, ge=2, le=65_536, description="global batch (split over processes)")
    accum_freq: int = Field(1, ge=1, le=64, description="micro-batches per step; >1 caches their features so the "
                                                        "contrastive loss sees batch_size * accum_freq pairs")
    lr: float = Field(1e-3, gt=0, le=10)
    weight_decay: float = Field(0.1, ge=0, le=10, description="AdamW; none on gains, biases and logit scale")
    warmup_steps: int = Field(50, ge=0, le=10**7)
    temperature_init: float = Field(0.07, gt=0, le=1, description="logit scale starts at 1/temperature_init")
    max_logit_scale: float = Field(100.0, gt=1, le=1000, description="logit scale clamped to this after every step")
    amp: bool = True
    seed: int = Field(0, ge=0, le=MAX_SEED)
    checkpoint_every: int = Field(1, ge=1, le=10_000)
    eval_every: int = Field(0, ge=0, le=10_000)

    @model_validator(mode="after")
    def _divisible(self) -> ClipTrainSpec:
        if self.batch_size % self.accum_freq:
            fit = self.batch_size // self.accum_freq * self.accum_freq or self.accum_freq
            raise ValueError(f"batch_size={self.batch_size} is not a multiple of accum_freq={self.accum_freq}; "
                             f"try batch_size={fit}")
        if self.text_width % self.text_heads:
            raise ValueError(f"text_width={self.text_width} is not a multiple of text_heads={self.text_heads}")
        return self

    def dataset_problems(self, train_images: int) -> list[tuple[str, str]]:
        n = min(train_images, self.limit_train or train_images)
        if n * self.captioned_fraction < self.batch_size:
            return [("batch_size", f"batch_size={self.batch_size} exceeds the ~{int(n * self.captioned_fraction)} "
                                   "captioned training images; lower it")]
        return []


class ClipPseudoCaptionSpec(JobSpecBase, ClipDataFields):
    """Pseudo-BoW captions (section 4.4): rank the base vocabulary for every uncaptioned image with a BoW-trained
    model and write its top-k words as its caption; the result is a new captioned dataset."""

    critical_keys: ClassVar[tuple[str, ...]] = ("checkpoint", "dataset", "top_k", "threshold", "captioned_fraction")

    kind: Literal["clip-pseudo-caption"] = "clip-pseudo-caption"
    checkpoint: str = Field(description="job:<id> of a clip-train job (a BoW model) or artifact:<id>")
    captioned_fraction: float = Field(1.0, gt=0, le=1, description="as in the clip-train job: the captions of "
                                                                   "the others are treated as missing")
    top_k: int = Field(5, ge=1, le=100)
    threshold: float | None = Field(None, ge=-1, le=1, description="keep only words with cosine above it")
    output_name: str = Field("pseudo-captioned", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
                             description="name of the dataset written (a new version if it exists)")

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint(cls, v: str) -> str:
        return validate_checkpoint_ref(v)

    def checkpoint_inputs(self) -> dict[str, str]:
        return {"checkpoint": self.checkpoint}


ClipProtocol = Literal["zero-shot", "retrieval"]
CLIP_PROTOCOLS: tuple[ClipProtocol, ...] = ("retrieval", "zero-shot")


class ClipEvalSpec(JobSpecBase, ClipDataFields):
    """Zero-shot classification (top-1/top-5 per attribute) and image<->text retrieval (R@1/5/10, median rank)
    of a clip-train checkpoint on the test split. A kind of its own on the clip-bow-trainer worker: the ``eval``
    kind runs on the ssl-trainer worker, which does not carry the text towers."""

    critical_keys: ClassVar[tuple[str, ...]] = ("checkpoint", "dataset", "protocols", "zero_shot")
    report_results_to_inputs: ClassVar[bool] = True

    kind: Literal["clip-eval"] = "clip-eval"
    checkpoint: str = Field(description="job:<id> of a clip-train job or artifact:<id>")
    protocols: list[ClipProtocol] = Field(default_factory=lambda: list(CLIP_PROTOCOLS), min_length=1,
                                          max_length=2)
    zero_shot: ZeroShotOptions = Field(default_factory=ZeroShotOptions)

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint(cls, v: str) -> str:
        return validate_checkpoint_ref(v)

    @field_validator("protocols")
    @classmethod
    def _protocols(cls, v: list[str]) -> list[str]:
        return sorted(set(v))

    def checkpoint_inputs(self) -> dict[str, str]:
        return {"checkpoint": self.checkpoint}
