"""Wire protocol between the supervisor and the child process.

The child prints ordinary log lines to stdout/stderr; structured events are single lines that start
with ``EVENT_PREFIX`` followed by a JSON object with a ``type`` field:

* ``progress``   ``{"done", "total", "epoch", "eta_s", "unit"}``
* ``metrics``    ``{"step", "values": {name: float}}``
* ``checkpoint`` ``{"epoch", "step", "key", "sha256", "size", "final", "critical"}``
* ``artifact``   ``{"name", "artifact_kind", "key", "sha256", "size", "meta"}``
* ``result``     ``{"values": {name: float}}`` - the job's final, headline metrics

Exit codes: ``EXIT_OK`` done; ``EXIT_PREEMPTED`` stopped on request after checkpointing (resume me);
``EXIT_CONFIG`` the job cannot run as specified (not retried); anything else is a method failure.
Under torchrun (``resources.gpus > 1``) torchrun's own exit status is 1 for ANY failing rank, so rank 0
also writes its exit code to ``RANK0_EXIT_FILE`` in the work dir, which the supervisor prefers.
"""

from __future__ import annotations

import json
from typing import Any

EVENT_PREFIX = "@@crucible "
EXIT_OK = 0
EXIT_CONFIG = 3
EXIT_PREEMPTED = 75  # EX_TEMPFAIL

JOB_FILE = "job.json"  # written by the supervisor into the child's work dir
RANK0_EXIT_FILE = "rank0.exit"  # written by rank 0 of a multi-process method: its exit code


def encode_event(event_type: str, **payload: Any) -> str:
    return EVENT_PREFIX + json.dumps({"type": event_type, **payload}, separators=(",", ":"), default=str)


def decode_line(line: str) -> dict[str, Any] | None:
    """The event carried by an output line, or None for a plain log line (or a garbled event)."""
    if not line.startswith(EVENT_PREFIX):
        return None
    try:
        event = json.loads(line[len(EVENT_PREFIX):])
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "type" in event else None
