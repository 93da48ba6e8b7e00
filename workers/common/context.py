"""``MethodContext[SpecT]``: everything a method sees of the platform, as a protocol.

Two classes implement it: ``workers.runtime.context.JobContext`` (inside a job's child process: events to the
supervisor, checkpoints to the object store) and ``workers.runtime.local.LocalContext`` (direct calls from
benchmarks, notebooks and tests: everything kept in memory or on local disk). Entry points are typed against
the protocol with their spec type, e.g. ``run(ctx: MethodContext[SslTrainSpec])``: the kind registry guarantees
that a job of kind ``ssl-train`` carries an ``SslTrainSpec``, so entry points do not re-check it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

SpecT_co = TypeVar("SpecT_co", covariant=True)


@runtime_checkable
class MethodContext(Protocol[SpecT_co]):
    """The platform as one method run sees it (one instance per process; under torchrun, per rank)."""

    # Set by a SIGTERM/SIGINT handler (or a test); the training loop checkpoints and stops at the next step.
    stop_requested: bool

    @property
    def spec(self) -> SpecT_co:
        """The validated job spec."""
        ...

    @property
    def inputs(self) -> dict[str, Any]:
        """Platform-resolved inputs: ``dataset`` (reference) and ``checkpoints`` (name -> local path + meta)."""
        ...

    @property
    def workdir(self) -> Path | None:
        """A private scratch directory for files to upload (None: the method picks a temporary one)."""
        ...

    def log(self, message: str) -> None:
        """One human-readable line of the job's log."""
        ...

    def progress(self, done: int, total: int, *, epoch: int | None = None) -> None:
        """Work done so far (steps); the platform derives the ETA."""
        ...

    def log_metrics(self, values: dict[str, float], *, step: int) -> None:
        """Scalar metrics at a global step (MLflow)."""
        ...

    def set_result(self, values: dict[str, float]) -> None:
        """The run's headline numbers (stored on the job)."""
        ...

    def check_preempt(self, save: Callable[[], Any] | None = None) -> None:
        """If a stop was requested: run ``save`` (a checkpoint), then raise ``Preempted``."""
        ...

    def save_checkpoint(self, state: dict[str, Any], *, epoch: int, step: int, final: bool = False) -> str:
        """Persist ``state`` with the spec's critical config; returns where it went."""
        ...

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint to resume from, or None on a fresh start."""
        ...

    def save_artifact(self, path: Path, *, name: str, artifact_kind: str = "file",
                      meta: dict[str, Any] | None = None) -> str:
        """Upload a file produced by the run (a model, a split, a report)."""
        ...
