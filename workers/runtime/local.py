"""``LocalContext``: the ``MethodContext`` protocol for calling a training function outside the platform.

Benchmarks, notebooks and tests call e.g. ``workers.ssl_trainer.train.train(spec, dataset)`` directly.
This stand-in keeps metrics, progress and the result in memory, logs through ``logging``, and keeps
checkpoints in memory (or writes them to ``checkpoint_dir``) so a direct run can also be resumed.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from workers.runtime.context import Preempted

log = logging.getLogger("crucible.local")
SpecT = TypeVar("SpecT")


class LocalContext(Generic[SpecT]):
    """A ``MethodContext[SpecT]`` like ``JobContext``; ``resume`` is a checkpoint dict (or a path to one) to start
    from; ``workdir`` is where methods put files they upload (default: a temporary directory of their own)."""

    def __init__(self, spec: SpecT, *, inputs: dict[str, Any] | None = None, checkpoint_dir: Path | None = None,
                 resume: dict[str, Any] | Path | None = None, workdir: Path | None = None) -> None:
        self.spec = spec
        self.inputs = inputs or {}
        self.workdir = Path(workdir) if workdir else None
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self._resume = resume
        self.stop_requested = False
        self.messages: list[str] = []
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.progress_events: list[tuple[int, int, int | None]] = []
        self.checkpoints: list[dict[str, Any]] = []  # {"epoch", "step", "final", "path" | "data"}
        self.artifacts: list[dict[str, Any]] = []
        self.result: dict[str, float] | None = None
        self.outputs: dict[str, Any] = {}

    def log(self, message: str) -> None:
        self.messages.append(message)
        log.info(message)

    def progress(self, done: int, total: int, *, epoch: int | None = None, **_: Any) -> None:
        self.progress_events.append((done, total, epoch))

    def log_metrics(self, values: dict[str, float], *, step: int) -> None:
        self.metrics.append((int(step), {k: float(v) for k, v in values.items()}))

    def set_result(self, values: dict[str, float]) -> None:
        self.result = {k: float(v) for k, v in values.items()}

    def save_output(self, name: str, value: Any) -> None:
        self.outputs[str(name)] = value

    def check_preempt(self, save: Callable[[], Any] | None = None) -> None:
        if self.stop_requested:
            if save is not None:
                save()
            raise Preempted()

    def save_checkpoint(self, state: dict[str, Any], *, epoch: int, step: int, final: bool = False) -> str:
        """Serialise now (like ``JobContext``): a state dict shares storage with the live model, so
        keeping the dict itself would let later training steps rewrite an "old" checkpoint."""
        import torch

        critical = self.spec.critical_config() if hasattr(self.spec, "critical_config") else None
        payload = dict(state) | {"crucible": {"epoch": epoch, "step": step, "critical": critical}}
        record: dict[str, Any] = {"epoch": epoch, "step": step, "final": final}
        if self.checkpoint_dir is not None:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            path = self.checkpoint_dir / f"checkpoint-epoch{epoch}.pt"
            torch.save(payload, path)
            record["path"] = path
        else:
            buf = io.BytesIO()
            torch.save(payload, buf)
            record["data"] = buf.getvalue()
        self.checkpoints.append(record)
        return str(record.get("path", f"memory://epoch{epoch}"))

    def checkpoint_state(self, i: int = -1) -> dict[str, Any]:
        """The ``i``-th saved checkpoint, loaded (pass it as ``resume=`` to continue from it)."""
        import torch

        record = self.checkpoints[i]
        source = record["path"] if "path" in record else io.BytesIO(record["data"])
        state: dict[str, Any] = torch.load(source, map_location="cpu", weights_only=False)
        return state

    def load_checkpoint(self) -> dict[str, Any] | None:
        if isinstance(self._resume, Path):
            import torch

            state: dict[str, Any] = torch.load(self._resume, map_location="cpu", weights_only=False)
            return state
        return self._resume

    def save_artifact(self, path: Path, *, name: str, artifact_kind: str = "file",
                      meta: dict[str, Any] | None = None) -> str:
        self.artifacts.append({"path": Path(path), "name": name, "artifact_kind": artifact_kind, "meta": meta})
        return str(path)
