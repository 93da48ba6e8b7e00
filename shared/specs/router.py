"""``router``: one replica serving an expert set (MoIN §5): a long-running *service* job on the router workers.

A replica downloads the expert set, loads the frozen base once, holds a subset of the experts' LoRA adapters
(``experts``, or ``placement`` shard ``i`` of ``n``), announces what it holds, and answers the control plane's
``POST /v1/route`` and ``/v1/generate`` requests until it is cancelled (services/serving/, README "Router").
Run several router jobs (one per shard) to spread a large set over several workers; run two with the same
experts for redundancy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from shared.specs.common import JobSpecBase, Resources, Retries, StrictModel, validate_checkpoint_ref

SERVICE_MAX_RUNTIME_S = 30 * 24 * 3600
EXPERT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class Placement(StrictModel):
    """Shard ``shard`` of ``shards``: this replica holds the experts whose position in the set is
    ``shard`` modulo ``shards`` (the set's order), so ``shards`` replicas together hold every expert once."""

    shard: int = Field(0, ge=0, le=1023)
    shards: int = Field(1, ge=1, le=1024)

    @model_validator(mode="after")
    def _in_range(self) -> Placement:
        if self.shard >= self.shards:
            raise ValueError(f"shard must be below shards ({self.shards}), got {self.shard}")
        return self


class RouterSpec(JobSpecBase):
    # the expert-set artifact, or the checkpoint of the expert-set job that made it (it carries the same tar)
    input_artifact_kinds: ClassVar[Mapping[str, tuple[str, ...]]] = {"expert_set": ("expert-set", "checkpoint")}

    kind: Literal["router"] = "router"
    expert_set: str = Field(description="the expert set: its artifact (artifact:<id> or a bare id), or job:<id> "
                                        "of the expert-set job that made it (a pipeline's "
                                        "${steps.<expert-set step>.checkpoint})")
    experts: list[str] | None = Field(None, min_length=1, max_length=10_000,
                                      description="expert ids this replica holds; default: by placement")
    placement: Placement = Field(default_factory=Placement,
                                 description="which share of the set to hold when experts is not given")
    pinned: list[str] = Field(default_factory=list, max_length=10_000,
                              description="adapters loaded at start and never evicted (must be held)")
    memory_budget_mb: float = Field(256.0, gt=0, le=1_048_576, description="adapter cache budget (resident "
                                                                           "LoRA weights), MiB")
    adapter_cache: bool = Field(True, description="False: load the adapter for every batch (benchmark baseline)")
    batching: Literal["per-expert", "mixed", "off"] = Field(
        "per-expert", description="per-expert: homogeneous batches (set_adapter); mixed: one batch across "
                                  "experts (peft adapter_names per row); off: one request at a time")
    batch_window_ms: float = Field(5.0, ge=0, le=10_000, description="how long a batch waits to fill")
    max_batch: int = Field(8, ge=1, le=512)
    fallback_margin: float | None = Field(None, ge=0, le=2,
                                          description="route to the frozen base when the cosine margin between "
                                                      "the two nearest centroids is below this; default: the set's")
    max_new_tokens: int = Field(64, ge=1, le=4096, description="the most tokens a request may generate")
    heartbeat_s: float = Field(1.0, gt=0, le=60, description="announcement interval; the TTL is three of them")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics of the replica; 0: "
                                                             "$CRUCIBLE_ROUTER_METRICS_PORT, else any free port")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # A service runs until cancelled; a lost worker or a preemption restarts it elsewhere.
    resources: Resources = Field(default_factory=lambda: Resources(max_runtime_s=SERVICE_MAX_RUNTIME_S))
    retries: Retries = Field(default_factory=lambda: Retries(infra=100, user=2))

    @field_validator("expert_set")
    @classmethod
    def _expert_set(cls, v: str) -> str:
        return validate_checkpoint_ref(v)

    @field_validator("experts", "pinned")
    @classmethod
    def _ids(cls, v: list[str] | None) -> list[str] | None:
        import re

        if v is None:
            return v
        bad = [e for e in v if not re.fullmatch(EXPERT_ID_PATTERN, e)]
        if bad:
            raise ValueError(f"not expert ids: {bad[:5]}")
        if len(set(v)) != len(v):
            raise ValueError("lists an expert twice")
        return v

    @model_validator(mode="after")
    def _pins_are_held(self) -> RouterSpec:
        if self.experts is not None and not set(self.pinned) <= set(self.experts):
            raise ValueError(f"pinned experts {sorted(set(self.pinned) - set(self.experts))} are not in experts")
        return self

    def checkpoint_inputs(self) -> dict[str, str]:
        return {"expert_set": self.expert_set}
