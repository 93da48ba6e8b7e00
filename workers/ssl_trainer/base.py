"""The skeleton every bank-based method shares (ssl.md section 1) and the interface the training loop calls.

The four reference repositories are forks of one script; what they share is made explicit here:

* online encoder ``online = Encoder(backbone, projector)`` + ``predictor`` (the trainable part);
* EMA target ``target`` = momentum copy of the online encoder (ssl.md 1.3: parameters only, updated at the
  start of every step, constant m, always in train mode);
* ``bank`` - FIFO memory bank of L2-normalised target embeddings (1.5), written with the GLOBAL batch
  (``push_global`` all-gathers under DDP so every rank holds the same bank);
* the two-view data and the k-NN evaluation live in ``train.py``; per-epoch LR, checkpoints with the config,
  resume, preemption and DDP in the shared loop (``workers.common.loop``).

A method subclasses ``BankMethod`` and implements ``step(view_target, view_online, labels, indices)``; the
loop does backward and the optimiser step, then calls the hooks. Anything a method must carry across a
resume is a buffer, a sub-module or ``extra_state`` of the method module, so ``state_dict`` round-trips it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.common.distributed import Comm, convert_sync_batchnorm
from workers.vision.backbones import Backbone
from workers.vision.bank import MemoryBank
from workers.vision.ema import ema_update, make_target
from workers.vision.heads import Encoder, MLPHead


@dataclass
class StepOutput:
    """What one training step returns to the loop (tensors: no host sync until the loop logs)."""

    loss: Tensor
    purity: Tensor | None  # oracle diagnostic: share of the used neighbours/anchors with the query's label
    q: Tensor  # online prediction (student embedding), normalised [B, d], detached
    u: Tensor  # target (teacher) embedding, normalised [B, d]
    slots: Tensor | None = None  # bank rows averaged into the target [B, k] (bank-neighbour methods)
    extras: dict[str, Tensor] = field(default_factory=dict)  # further per-step scalar metrics


@dataclass
class MethodSetup:
    """What a method may need beyond its spec; built by the trainer."""

    backbone: Backbone
    num_train: int
    num_classes: int
    # Ground truth of the training images. Only label-using variants (CMSF supervised, the labelled split
    # of semi-supervised) may train on it; everything else may use it for oracle metrics only.
    train_labels: Tensor
    train_images: np.ndarray | None = None  # uint8 N x H x W x 3 (cross-modal embeddings)
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    inputs: dict[str, Any] = field(default_factory=dict)  # the job's inputs (e.g. checkpoints)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    comm: Comm = field(default_factory=Comm)
    seed: int = 0


@dataclass
class Pushed:
    """A global batch as written into the bank (identical on every rank) and this rank's own slots."""

    u: Tensor
    labels: Tensor | None
    indices: Tensor | None
    slots: Tensor  # bank rows of the whole global batch, [world * B]
    local_slots: Tensor  # bank rows of this rank's rows, [B]


class BankMethod(nn.Module):
    """Online encoder + predictor, EMA target of the online encoder, memory bank.

    Attribute names are the checkpoint layout: ``online.backbone`` (the network evaluated and exported
    downstream), ``online.projector``, ``predictor``, ``target.{backbone,projector}``, ``bank``.
    """

    # Sub-modules whose BatchNorm is synchronised across processes under DDP (not e.g. a pseudo-label head
    # trained on one rank only).
    sync_bn_modules: tuple[str, ...] = ("online", "predictor", "target")

    def __init__(self, backbone: Backbone, projector: nn.Module, predictor: nn.Module, *, bank_size: int,
                 bank_dim: int, ema_momentum: float, track_indices: bool = False,
                 bank_generator: torch.Generator | None = None, comm: Comm | None = None) -> None:
        super().__init__()
        self.ema_momentum = ema_momentum
        self.online = Encoder(backbone, projector)
        self.predictor = predictor
        self.target = make_target(self.online)
        self.bank = MemoryBank(bank_size, bank_dim, track_indices=track_indices, generator=bank_generator)
        self.comm = comm or Comm()

    # --- the interface the loop uses ----------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: Any, setup: MethodSetup) -> BankMethod:
        """Build the method from an ``SslTrainSpec`` (registered in ``methods.METHODS``)."""
        raise NotImplementedError

    def step(self, view_target: Tensor, view_online: Tensor, labels: Tensor | None = None,
             indices: Tensor | None = None) -> StepOutput:
        raise NotImplementedError

    def forward(self, view_target: Tensor, view_online: Tensor, labels: Tensor | None = None,
                indices: Tensor | None = None) -> StepOutput:
        # DDP calls forward(); a step is the unit the gradient all-reduce wraps.
        return self.step(view_target, view_online, labels, indices)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Online encoder + predictor; weight decay applies to all of them (BN and biases too, ssl.md 1.7)."""
        return [*self.online.parameters(), *self.predictor.parameters()]

    def on_fit_start(self, ctx: Any, *, resumed: bool) -> dict[str, float]:
        """Once, before the first step of this attempt; returns metrics to log."""
        return {}

    def on_step_end(self, ctx: Any, *, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> dict[str, float]:
        """After the optimiser step (``step_in_epoch`` counts from 1); returns metrics to log with the epoch."""
        return {}

    def on_epoch_end(self, ctx: Any, *, epoch: int, last: bool) -> dict[str, float]:
        """After the last step of ``epoch``, before its checkpoint; returns metrics to log."""
        return {}

    def exported_projector(self) -> MLPHead | None:
        """The online projection head downstream jobs may read (None when the method has none, e.g. ISD-r18)."""
        proj = self.online.projector
        return proj if isinstance(proj, MLPHead) else None  # the one head type with in/hidden/out dims

    def convert_sync_batchnorm(self, device: torch.device) -> None:
        """Synchronise BN statistics across processes (call before building the optimiser)."""
        for name in self.sync_bn_modules:
            setattr(self, name, convert_sync_batchnorm(getattr(self, name), device))

    def train(self, mode: bool = True) -> BankMethod:
        super().train(mode)
        # The target always uses batch statistics, like the reference (its BN never switches to eval).
        self.target.train(True)
        return self

    # --- building blocks for step() -----------------------------------------------------------------
    def predict(self, view_online: Tensor) -> Tensor:
        """``q = normalize(pred(proj_o(f_o(x))))`` in fp32 (the only path that carries gradient)."""
        return F.normalize(self.predictor(self.online(view_online)).float(), dim=1)

    def encode_target(self, view_target: Tensor) -> Tensor:
        """EMA update, then ``u = normalize(proj_t(f_t(x)))`` without gradient (ssl.md 2.2 steps 3-4)."""
        ema_update(self.target, self.online, self.ema_momentum)
        with torch.no_grad():
            return F.normalize(self.target(view_target).float(), dim=1)

    @torch.no_grad()
    def push_global(self, u: Tensor, labels: Tensor | None = None, indices: Tensor | None = None) -> Pushed:
        """Write the GLOBAL batch (all ranks' rows, in rank order) into the bank; identity in one process."""
        c = self.comm
        u_all = c.all_gather(u)
        y_all = c.all_gather(labels) if labels is not None else None
        i_all = c.all_gather(indices) if indices is not None else None
        slots = self.bank.push(u_all, y_all, i_all)
        b = u.shape[0]
        return Pushed(u_all, y_all, i_all, slots, slots[c.rank * b:(c.rank + 1) * b])
