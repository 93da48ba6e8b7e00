"""Request and response bodies of the serving endpoints."""

from __future__ import annotations

from pydantic import Field

from shared.serving import Announcement
from shared.specs.common import StrictModel
from shared.specs.router import EXPERT_ID_PATTERN

MAX_TEXT_CHARS = 200_000


class RouteIn(StrictModel):
    expert_set: str = Field(min_length=1, max_length=200,
                            description="the expert-set artifact (id, artifact:<id>) or its name (newest version)")
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS, description="the query (route on all of it)")
    timeout_s: float = Field(30.0, gt=0, le=600, description="deadline: 504 when no answer by then")


class GenerateIn(RouteIn):
    max_new_tokens: int | None = Field(None, ge=1, le=4096, description="default and cap: the router job's")
    stream: bool = Field(False, description="Server-Sent Events: route, text pieces, done (or error)")
    expert: str | None = Field(None, pattern=EXPERT_ID_PATTERN,
                               description="skip routing and use this expert (oracle routing, debugging)")


class RouteOut(StrictModel):
    expert_set: str
    expert: str
    margin: float = Field(description="cosine margin between the two nearest centroids: the router's confidence")
    fallback: bool = Field(description="margin below the replica's fallback_margin: generation uses the base")
    replica: str
    seconds: float


class GenerateOut(StrictModel):
    expert_set: str
    expert: str | None = Field(description="the expert that generated (null: the base model, the fallback)")
    routed_to: str | None = Field(description="the expert the route chose (null when 'expert' was given)")
    margin: float | None
    fallback: bool
    text: str
    tokens: int
    finish: str = Field(description="eos | length")
    replica: str
    seconds: float


class ReplicasOut(StrictModel):
    expert_set: str
    replicas: list[Announcement]
