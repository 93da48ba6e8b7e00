"""Frozen teachers of a distill job: loaded from checkpoints, each with its own input normalisation.

Teacher and student see the SAME augmented image (SimReg §5.2 step 1, CompRess §5.6). The views are
therefore built in [0, 1] pixel space once and normalised separately for each network with the
statistics it was trained with (``meta["normalization"]``): a teacher pre-trained on other data keeps
its own input distribution while the student uses the distillation set's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from workers.common import device as dev
from workers.runtime.context import JobConfigError
from workers.vision.checkpoints import Features, FrozenEncoder, load_encoder

TeacherSource = str | Path | Mapping[str, Any]


class InputNorm:
    """``(x - mean) / std`` per channel, for [0, 1] images ``[B, 3, H, W]`` on any device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor([float(v) for v in mean]).view(1, 3, 1, 1)
        self.std = torch.tensor([float(v) for v in std]).view(1, 3, 1, 1)

    def __call__(self, x: Tensor) -> Tensor:
        if self.mean.device != x.device:
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        return (x - self.mean) / self.std


@dataclass
class Teacher:
    """One frozen teacher: ``embed(x01)`` is its feature ``f_T(v)`` of a [0, 1] view (not normalised)."""

    name: str
    encoder: FrozenEncoder
    meta: dict[str, Any]
    norm: InputNorm

    @property
    def dim(self) -> int:
        return self.encoder.out_dim

    @torch.no_grad()
    def embed(self, x01: Tensor, *, amp_dtype: torch.dtype | None = None,
              memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
        x = self.norm(x01).contiguous(memory_format=memory_format)
        with dev.autocast(x.device, amp_dtype):
            return self.encoder(x).float()


def load_teachers(sources: Sequence[TeacherSource], *, features: Features, device: torch.device,
                  memory_format: torch.memory_format = torch.contiguous_format,
                  names: Sequence[str] | None = None) -> list[Teacher]:
    """Load every teacher checkpoint (frozen, eval mode) onto ``device``.

    Raises:
        CheckpointError (a ``JobConfigError``): a source is not a model checkpoint, lacks the projector
            ``features="projection"`` needs, or does not load completely.
    """
    if not sources:
        raise JobConfigError("distillation needs at least one teacher checkpoint")
    teachers = []
    for i, source in enumerate(sources):
        name = names[i] if names else f"teachers.{i}"
        encoder, meta = load_encoder(source, features=features, device=device)
        encoder.to(memory_format=memory_format)
        norm = meta["normalization"]
        teachers.append(Teacher(name=name, encoder=encoder, meta=meta, norm=InputNorm(norm["mean"], norm["std"])))
    return teachers


def teacher_sources(ctx: Any, count: int) -> list[str]:
    """Local paths of the job's teacher checkpoints (``ctx.inputs["checkpoints"]["teachers.<i>"]``)."""
    inputs = (ctx.inputs or {}).get("checkpoints") or {}
    paths = []
    for i in range(count):
        entry = inputs.get(f"teachers.{i}")
        if not entry or not entry.get("path"):
            raise JobConfigError(f"input teachers.{i} was not provided to the job (have: {sorted(inputs) or 'none'}); "
                                 "the platform resolves the spec's teachers list into these inputs")
        paths.append(entry["path"])
    return paths
