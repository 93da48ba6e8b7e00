"""Wire protocol between the supervisor and the child process.

Two channels, so that nothing the method prints can pass for an event:

* **stdout/stderr** carry log lines only (whatever the method, torch or a library prints);
* **the event channel** - a FIFO ``EVENTS_FIFO`` in the job's work dir, created by the supervisor before the
  child starts and opened for writing by rank 0 only - carries one JSON event per line. A path (not an
  inherited fd) so that it reaches rank 0 under torchrun and a pre-started (warm) child alike.

Every event is a typed model below (``Event``, discriminated by ``type``); the supervisor validates each line
on receipt (``parse_event``) and drops what does not validate, so a malformed event is logged, never a crash.

Exit codes: ``EXIT_OK`` done; ``EXIT_PREEMPTED`` stopped on request after checkpointing (resume me);
``EXIT_CONFIG`` the job cannot run as specified (not retried); anything else is a method failure.
Under torchrun (``resources.gpus > 1``) torchrun's own exit status is 1 for ANY failing rank, so rank 0
also writes its exit code to ``RANK0_EXIT_FILE`` in the work dir, which the supervisor prefers.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from shared.specs.common import DATASET_NAME_PATTERN

EVENT_PREFIX = "@@crucible "  # kept on channel lines so a captured channel reads like the old log format
EXIT_OK = 0
EXIT_CONFIG = 3
EXIT_PREEMPTED = 75  # EX_TEMPFAIL

JOB_FILE = "job.json"  # written by the supervisor into the child's work dir
EVENTS_FIFO = "events.fifo"  # the event channel (see above)
RANK0_EXIT_FILE = "rank0.exit"  # written by rank 0 of a multi-process method: its exit code
# A warm child is started before its job is known, with this placeholder as CRUCIBLE_JOB_ID; it overwrites it in
# place once the job arrives, so /proc/PID/environ names the job as it does for a cold child (child.py).
JOB_ID_PLACEHOLDER = "warm-child-waiting-for-its-job-00000"  # as long as a UUID
MAX_EVENT_BYTES = 1 << 20  # a longer line is not an event we sent; it is dropped
_NAME = Annotated[str, Field(min_length=1, max_length=200)]


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _finite_values(v: dict[str, float]) -> dict[str, float]:
    # NaN/inf cannot be stored as MLflow metrics nor compared; the finite-loss guard reports them as a failure.
    return {k: float(x) for k, x in v.items() if math.isfinite(float(x))}


class Progress(_Event):
    type: Literal["progress"] = "progress"
    done: int = Field(ge=0)
    total: int = Field(ge=0)
    epoch: int | None = None
    eta_s: float | None = Field(None, ge=0)
    unit: str = Field("step", max_length=32)


class Metrics(_Event):
    type: Literal["metrics"] = "metrics"
    step: int = Field(ge=0)
    values: dict[_NAME, float] = Field(max_length=1000)

    _finite = field_validator("values")(_finite_values)


class Checkpoint(_Event):
    type: Literal["checkpoint"] = "checkpoint"
    epoch: int
    step: int
    key: str = Field(min_length=1, max_length=1024)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    final: bool = False
    critical: dict[str, Any] = Field(default_factory=dict)


class Artifact(_Event):
    type: Literal["artifact"] = "artifact"
    name: _NAME
    artifact_kind: str = Field("file", max_length=32)
    key: str = Field(min_length=1, max_length=1024)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    meta: dict[str, Any] = Field(default_factory=dict)


class Dataset(_Event):
    """A dataset the job made (``ctx.save_dataset``): stored as an archive, recorded by the supervisor as the next
    version of ``name`` in the job's project; with ``output`` its id becomes that named output."""

    type: Literal["dataset"] = "dataset"
    name: str = Field(pattern=DATASET_NAME_PATTERN)
    format: str = Field("images", min_length=1, max_length=32)
    key: str = Field(min_length=1, max_length=1024)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    stats: dict[str, Any] = Field(default_factory=dict)
    meta: dict[str, Any] = Field(default_factory=dict)
    output: _NAME | None = None


class Output(_Event):
    """A named JSON value the job produced (``ctx.save_output``), e.g. the list a pipeline step fans out over."""

    type: Literal["output"] = "output"
    name: _NAME
    value: Any


class Result(_Event):
    type: Literal["result"] = "result"
    values: dict[_NAME, float] = Field(max_length=1000)

    _finite = field_validator("values")(_finite_values)


Event = Annotated[Progress | Metrics | Checkpoint | Artifact | Dataset | Output | Result, Field(discriminator="type")]
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


def encode(event: _Event) -> str:
    return EVENT_PREFIX + event.model_dump_json()


def encode_event(event_type: str, **payload: Any) -> str:
    """Validate and encode an event given as keywords (raises ``pydantic.ValidationError`` for a bad one)."""
    return encode(EVENT_ADAPTER.validate_python({"type": event_type, **payload}))


def parse_event(line: str) -> Event:
    """The typed event of a channel line; raises ``ValueError`` (incl. ``ValidationError``) for anything else."""
    if len(line) > MAX_EVENT_BYTES:
        raise ValueError(f"event line of {len(line)} bytes exceeds {MAX_EVENT_BYTES}")
    body = line.removeprefix(EVENT_PREFIX)
    return EVENT_ADAPTER.validate_python(json.loads(body))


def decode_line(line: str) -> dict[str, Any] | None:
    """The event carried by a line as a plain dict, or None for a log line or an invalid event."""
    if not line.startswith(EVENT_PREFIX):
        return None
    try:
        return parse_event(line).model_dump(mode="json")
    except ValueError:
        return None
