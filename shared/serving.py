"""The wire between the control plane (services/serving/) and router replicas (workers/router/), over Redis.

Design: **a placement table plus one request queue per replica** (README "Router").

* Every replica announces itself every ``heartbeat_s``: ``SET crucible:router:replica:<id> <Announcement> EX
  3*heartbeat_s`` and ``SADD crucible:router:set:<expert set id> <id>``. The announcement says which experts it
  holds, its state (``loading`` → ``ready`` → ``draining``) and its request queue. A replica that dies stops
  renewing and drops out of the table within three heartbeats; ``GET /v1/router/replicas`` shows the table.
* The control plane routes a query on any ready replica of the set (all of them embed and hold the centroids),
  then sends the generation to a ready replica that *holds* the chosen expert (or any one for the base
  fallback), by ``RPUSH`` on that replica's queue. Replies (a route result, streamed text, the end, or an error)
  come back on a per-request list, ``crucible:router:reply:<request id>``.
* A request carries an absolute deadline; a replica skips requests whose deadline passed. While waiting, the
  control plane polls the serving replica's announcement: if it vanished (killed, or draining) before the
  first reply, the request is sent to another replica holding the expert; after streaming began the client
  gets an error event. Nothing waits past the deadline (504), and no holder at all is a 503.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

PREFIX = "crucible:router"
REPLY_TTL_S = 120
SET_INDEX_TTL_S = 24 * 3600
TTL_HEARTBEATS = 3

ReplicaState = Literal["loading", "ready", "draining"]


def replica_key(replica_id: str) -> str:
    return f"{PREFIX}:replica:{replica_id}"


def set_index_key(expert_set_id: str) -> str:
    return f"{PREFIX}:set:{expert_set_id}"


def queue_key(replica_id: str) -> str:
    return f"{PREFIX}:queue:{replica_id}"


def reply_key(request_id: str) -> str:
    return f"{PREFIX}:reply:{request_id}"


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")  # an older or newer peer may add fields


class Announcement(_Wire):
    """What a replica holds, as the placement table lists it."""

    replica_id: str
    job_id: str
    project_id: str = ""
    expert_set: str  # the expert-set artifact id
    expert_set_name: str
    experts: list[str]  # held by this replica
    all_experts: list[str]  # in the set (the route may pick one this replica does not hold)
    state: ReplicaState
    fallback_margin: float
    context_length: int
    max_new_tokens: int
    resident: list[str] = Field(default_factory=list)  # adapters loaded right now
    queue_depth: int = 0
    metrics_url: str | None = None
    host: str = ""
    pid: int = 0
    started_at: float = 0.0
    updated_at: float = Field(default_factory=time.time)

    def holds(self, expert: str | None) -> bool:
        """Whether this replica can serve ``expert`` (``None``: the base model, which every replica has)."""
        return expert is None or expert in self.experts


class Request(_Wire):
    id: str
    op: Literal["route", "generate"]
    text: str
    # generate: the expert chosen by the route (None: the frozen base, the low-margin fallback)
    expert: str | None = None
    margin: float | None = None
    max_new_tokens: int = 0
    stream: bool = False
    deadline: float  # time.time() after which nobody waits for the answer
    sent_at: float = Field(default_factory=time.time)


class Reply(_Wire):
    """One message on a request's reply list. ``route``: the routing result; ``text``: a streamed piece;
    ``done``: the end of a generation (with the full text); ``error``: the request failed (``status`` is the
    HTTP status the control plane answers with)."""

    type: Literal["route", "text", "done", "error"]
    replica_id: str = ""
    expert: str | None = None
    margin: float | None = None
    fallback: bool = False
    text: str = ""
    tokens: int = 0
    finish: str = ""
    status: int = 200
    message: str = ""
