"""MoIN ("Mixture of Introvert Experts", arXiv 2410.09687; security-clip-experts.md §5) as five job kinds on the
expert-trainer worker, each its own job with a checkpoint (its product) and lineage:

1. ``embed``        - sentence embeddings of every document of a text corpus (§5.4 step 1);
2. ``cluster``      - spherical k-means of the embeddings into topics; tiny clusters merged (§5.4 step 2, §5.6);
3. ``train-expert`` - one LoRA adapter on the frozen base for one cluster (§5.4 step 3), fanned out K times;
4. ``expert-set``   - the servable expert set: base reference + centroid index + adapters + embedder (§5.2);
5. ``moin-eval``    - held-out perplexity routed / oracle / random / base / single LoRA, routing accuracy (§5.5).
"""

from __future__ import annotations

import re
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from shared.specs.common import MAX_SEED, JobSpecBase, StrictModel, validate_checkpoint_ref, validate_dataset_ref

EmbedderKind = Literal["minilm", "base-mean", "tfidf-svd"]
_BASE_REF_RE = re.compile(r"^(smollm2-135m|tiny-random|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/\S+|/\S+)$")
_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,63}$")


def validate_base_model(v: str) -> str:
    """``smollm2-135m`` (packaged), ``tiny-random`` (tests), an absolute HF model directory or ``s3://bucket/prefix``."""
    if not _BASE_REF_RE.match(v) or len(v) > 1000:
        raise ValueError("must be 'smollm2-135m', 'tiny-random', an absolute path to a Hugging Face causal-LM "
                         "directory, or s3://bucket/prefix/ of one")
    return v


class EmbedderOptions(StrictModel):
    """How documents become vectors (the router embeds queries the same way)."""

    kind: EmbedderKind = Field("minilm", description="minilm: all-MiniLM-L6-v2 (sentence-transformers); "
                                                      "base-mean: the base LM's mean-pooled last hidden state; "
                                                      "tfidf-svd: TF-IDF then truncated SVD, fitted on the corpus")
    max_length: int = Field(256, ge=8, le=4096, description="tokens per chunk; longer documents are chunked and "
                                                            "the chunk vectors averaged")
    base_model: str = Field("smollm2-135m", description="for kind base-mean")
    dim: int = Field(64, ge=2, le=1024, description="for kind tfidf-svd: SVD components")
    batch_size: int = Field(32, ge=1, le=4096)

    @field_validator("base_model")
    @classmethod
    def _base(cls, v: str) -> str:
        return validate_base_model(v)


class EmbedSpec(JobSpecBase):
    critical_keys: ClassVar[tuple[str, ...]] = ("dataset", "embedder")
    kind: Literal["embed"] = "embed"
    dataset: str = Field("builtin://multidomain", description="a text dataset: builtin://multidomain, an id or name")
    embedder: EmbedderOptions = Field(default_factory=EmbedderOptions)

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        return validate_dataset_ref(v)


class ClusterSpec(JobSpecBase):
    critical_keys: ClassVar[tuple[str, ...]] = ("embeddings", "k", "min_cluster_size", "seed", "iters", "init")
    kind: Literal["cluster"] = "cluster"
    embeddings: str = Field(description="the embed job's checkpoint: job:<id> or artifact:<id>")
    k: int = Field(8, ge=1, le=5000, description="clusters (experts) before tiny ones are merged")
    min_cluster_size: int = Field(1, ge=1, le=10**7, description="a cluster with fewer training documents is "
                                                                   "merged into its nearest neighbour (§5.6)")
    iters: int = Field(25, ge=1, le=1000)
    init: Literal["random", "kmeans++"] = "kmeans++"
    seed: int = Field(0, ge=0, le=MAX_SEED)

    @field_validator("embeddings")
    @classmethod
    def _ckpt(cls, v: str) -> str:
        return validate_checkpoint_ref(v)

    def checkpoint_inputs(self) -> dict[str, str]:
        return {"embeddings": self.embeddings}


class LoraOptions(StrictModel):
    rank: int = Field(8, ge=1, le=1024)
    alpha: int = Field(16, ge=1, le=4096, description="LoRA scaling numerator (scale = alpha / rank)")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1, max_length=32,
                                      description="names of the base's linear layers to adapt")

    @field_validator("target_modules")
    @classmethod
    def _modules(cls, v: list[str]) -> list[str]:
        bad = [m for m in v if not _MODULE_RE.match(m)]
        if bad:
            raise ValueError(f"module names must be identifiers (e.g. q_proj), got {bad[:3]}")
        return sorted(set(v))


class ExpertTraining(StrictModel):
    """The expert's share of the token budget is proportional to its cluster's size (§5.4 step 3)."""

    base_model: str = Field("smollm2-135m", description="smollm2-135m, tiny-random, an HF directory or s3:// prefix")
    lora: LoraOptions = Field(default_factory=LoraOptions)
    total_tokens: int = Field(200_000, ge=1, le=10**13, description="tokens for ALL experts together; an expert "
                                                                    "gets total_tokens * its docs / all docs")
    min_steps: int = Field(1, ge=1, le=10**7, description="an expert trains at least this many steps")
    seq_len: int = Field(128, ge=8, le=8192, description="tokens per training sequence (short contexts on CPU)")
    batch_size: int = Field(8, ge=1, le=4096)
    lr: float = Field(1e-3, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
    warmup_steps: int = Field(0, ge=0, le=10**6)
    eval_docs: int = Field(64, ge=1, le=10**6, description="held-out documents of the cluster scored for "
                                                           "perplexity (before and after training)")

    @field_validator("base_model")
    @classmethod
    def _base(cls, v: str) -> str:
        return validate_base_model(v)


class TrainExpertSpec(JobSpecBase):
    critical_keys: ClassVar[tuple[str, ...]] = ("dataset", "clustering", "cluster", "training", "seed")
    kind: Literal["train-expert"] = "train-expert"
    dataset: str = Field("builtin://multidomain", description="the corpus the clustering was made from")
    clustering: str | None = Field(None, description="the cluster job's checkpoint (job:<id>); None with "
                                                     "cluster='all'")
    cluster: int | Literal["all"] = Field(description="the cluster to train on, or 'all' (the single-LoRA "
                                                      "baseline: every training document, the whole budget)")
    training: ExpertTraining = Field(default_factory=ExpertTraining)
    seed: int = Field(0, ge=0, le=MAX_SEED)

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        return validate_dataset_ref(v)

    @field_validator("clustering")
    @classmethod
    def _ckpt(cls, v: str | None) -> str | None:
        return None if v is None else validate_checkpoint_ref(v)

    @model_validator(mode="after")
    def _needs_clustering(self) -> TrainExpertSpec:
        if self.cluster != "all" and self.clustering is None:
            raise ValueError("clustering is required to train the expert of one cluster (or use cluster: all)")
        if isinstance(self.cluster, int) and self.cluster < 0:
            raise ValueError("cluster must be >= 0")
        return self

    def checkpoint_inputs(self) -> dict[str, str]:
        return {"clustering": self.clustering} if self.clustering else {}


class ExpertSetSpec(JobSpecBase):
    critical_keys: ClassVar[tuple[str, ...]] = ("clustering", "experts", "set_name", "fallback_margin")
    kind: Literal["expert-set"] = "expert-set"
    set_name: str = Field("moin", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
                          description="the expert set's name (MLflow registered model <project>.<name>)")
    clustering: str = Field(description="the cluster job's checkpoint: its centroids are the router's index")
    experts: list[str] = Field(min_length=1, max_length=5000, description="the train-expert jobs' checkpoints, "
                                                                          "one per cluster")
    fallback_margin: float = Field(0.0, ge=0, le=2, description="queries whose cosine margin between the top two "
                                                                "centroids is below this go to the base model")

    @field_validator("clustering")
    @classmethod
    def _ckpt(cls, v: str) -> str:
        return validate_checkpoint_ref(v)

    @field_validator("experts")
    @classmethod
    def _experts(cls, v: list[str]) -> list[str]:
        out = [validate_checkpoint_ref(x) for x in v]
        if len(set(out)) != len(out):
            raise ValueError("lists the same expert twice")
        return out

    def checkpoint_inputs(self) -> dict[str, str]:
        return {"clustering": self.clustering, **{f"experts.{i}": e for i, e in enumerate(self.experts)}}


class MoinEvalSpec(JobSpecBase):
    critical_keys: ClassVar[tuple[str, ...]] = ("expert_set", "single_lora", "dataset", "seed", "max_docs")
    report_results_to_inputs: ClassVar[bool] = True
    kind: Literal["moin-eval"] = "moin-eval"
    expert_set: str = Field(description="the expert-set job's checkpoint (job:<id>)")
    single_lora: str | None = Field(None, description="baseline: a train-expert job with cluster 'all' and the "
                                                      "same total_tokens (job:<id>)")
    dataset: str = Field("builtin://multidomain", description="held-out ('test') documents of this corpus are scored")
    max_docs: int | None = Field(None, ge=1, le=10**7, description="score at most this many test documents")
    seq_len: int = Field(128, ge=8, le=8192)
    batch_size: int = Field(8, ge=1, le=4096)
    fallback_margin: float | None = Field(None, ge=0, le=2, description="default: the expert set's")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="of the random routing")

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        return validate_dataset_ref(v)

    @field_validator("expert_set", "single_lora")
    @classmethod
    def _ckpt(cls, v: str | None) -> str | None:
        return None if v is None else validate_checkpoint_ref(v)

    def checkpoint_inputs(self) -> dict[str, str]:
        out = {"expert_set": self.expert_set}
        if self.single_lora:
            out["single_lora"] = self.single_lora
        return out
