"""Per-epoch learning-rate schedules of the reference code (ssl.md 1.7); epochs are numbered from 1."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def lr_at_epoch(epoch: int, *, base_lr: float, epochs: int, schedule: str = "cosine",
                milestones: Sequence[int] = (), decay: float = 0.2, warmup_epochs: int = 0) -> float:
    """LR used for the whole of ``epoch`` (1-based).

    * warm-up (``warmup_epochs`` W > 0): ``lr0 * e / (W + 1)`` for e <= W, then the schedule over the
      remaining ``E - W`` epochs (W = 0, the reference's setting, changes nothing);
    * cosine: ``lr0 * 0.5 * (1 + cos(pi * (e - 1) / E))`` - starts at lr0, never reaches 0;
    * step:   ``lr0 * decay ** (number of milestones strictly below e)``.
    """
    if epoch < 1:
        raise ValueError(f"epochs are numbered from 1, got {epoch}")
    if warmup_epochs > 0:
        if epoch <= warmup_epochs:
            return base_lr * epoch / (warmup_epochs + 1)
        if schedule == "cosine":
            epoch, epochs = epoch - warmup_epochs, max(1, epochs - warmup_epochs)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / epochs))
    if schedule == "step":
        return base_lr * decay ** sum(1 for m in milestones if m < epoch)
    raise ValueError(f"unknown lr schedule {schedule!r}; use 'cosine' or 'step'")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
