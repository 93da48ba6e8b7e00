"""Learning-rate schedules: the reference code's per-epoch cosine and step decay (ssl.md 1.7, epochs numbered
from 1), and the same curves evaluated per step (with an optional linear warm-up) for methods that need them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

ScheduleKind = Literal["cosine", "step", "constant"]


def lr_at_epoch(epoch: int, *, base_lr: float, epochs: int, schedule: str = "cosine",
                milestones: Sequence[int] = (), decay: float = 0.2, warmup_epochs: int = 0) -> float:
    """LR used for the whole of ``epoch`` (1-based).

    * warm-up (``warmup_epochs`` W > 0): ``lr0 * e / (W + 1)`` for e <= W, then the schedule over the
      remaining ``E - W`` epochs (W = 0, the reference's setting, changes nothing);
    * cosine:   ``lr0 * 0.5 * (1 + cos(pi * (e - 1) / E))`` - starts at lr0, never reaches 0;
    * step:     ``lr0 * decay ** (number of milestones strictly below e)``;
    * constant: ``lr0``.
    """
    if epoch < 1:
        raise ValueError(f"epochs are numbered from 1, got {epoch}")
    return _curve(float(epoch - 1), epoch, base_lr=base_lr, epochs=epochs, schedule=schedule,
                  milestones=milestones, decay=decay, warmup_epochs=warmup_epochs)


def _curve(progress_epochs: float, epoch: int, *, base_lr: float, epochs: int, schedule: str,
           milestones: Sequence[int], decay: float, warmup_epochs: int = 0) -> float:
    if warmup_epochs > 0:
        if epoch <= warmup_epochs:
            return base_lr * epoch / (warmup_epochs + 1)
        if schedule == "cosine":  # the cosine runs over the epochs after the warm-up
            progress_epochs, epochs = progress_epochs - warmup_epochs, max(1, epochs - warmup_epochs)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress_epochs / epochs))
    if schedule == "step":
        return base_lr * decay ** sum(1 for m in milestones if m < epoch)
    if schedule == "constant":
        return base_lr
    raise ValueError(f"unknown lr schedule {schedule!r}; use 'cosine', 'step' or 'constant'")


@dataclass(frozen=True)
class LrSchedule:
    """An LR curve over a run of ``epochs`` epochs.

    ``per_step=False`` (the reference): the LR changes once per epoch, ``lr_at_epoch``. ``per_step=True``: the
    cosine is evaluated at the fractional epoch of every step (the step schedule still changes at epoch
    boundaries). ``warmup_steps``: linear ramp from ``base_lr / warmup_steps`` up to the curve over the first
    steps of the run (global steps, counted from 1).
    """

    base_lr: float
    epochs: int
    kind: ScheduleKind = "cosine"
    milestones: Sequence[int] = field(default_factory=tuple)
    decay: float = 0.2
    per_step: bool = False
    warmup_steps: int = 0
    warmup_epochs: int = 0  # the recipes' per-epoch warm-up (see ``lr_at_epoch``)

    def at(self, epoch: int, step_in_epoch: int = 1, steps_per_epoch: int = 1) -> float:
        """LR of step ``step_in_epoch`` (1-based) of ``epoch`` (1-based)."""
        if epoch < 1 or step_in_epoch < 1:
            raise ValueError(f"epochs and steps are numbered from 1, got epoch {epoch}, step {step_in_epoch}")
        progress = (epoch - 1) + ((step_in_epoch - 1) / steps_per_epoch if self.per_step else 0.0)
        lr = _curve(progress, epoch, base_lr=self.base_lr, epochs=self.epochs, schedule=self.kind,
                    milestones=self.milestones, decay=self.decay, warmup_epochs=self.warmup_epochs)
        global_step = (epoch - 1) * steps_per_epoch + step_in_epoch
        if self.warmup_steps and global_step <= self.warmup_steps:
            lr *= global_step / self.warmup_steps
        return lr

    @property
    def changes_per_step(self) -> bool:
        """Whether the LR must be set before every step (else once per epoch)."""
        return self.per_step or self.warmup_steps > 0


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
