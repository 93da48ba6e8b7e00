"""Linear probe with the reference protocol (ssl.md 1.9, ``eval_linear.py`` of MSF/ISD/CompRess).

* The backbone is frozen and in eval mode (BatchNorm running statistics): a probe, not fine-tuning.
* Head = ``L2-normalise -> per-dimension standardisation -> Linear``. The standardisation uses the mean and
  variance of the L2-normalised features of the (labelled) TRAIN set, computed once with the evaluation
  transform and then fixed (the reference's ``FullBatchNorm``, eps 1e-5; variance unbiased as
  ``torch.var_mean``). Test statistics never enter it.
* SGD (lr 0.01, momentum 0.9, wd 1e-4, batch 256), LR x0.1 at each milestone (15, 30), 40 epochs.
* Train-time augmentation: RandomResizedCrop (scale 0.08-1) + flip when ``augment``; otherwise the train
  features are computed once and cached (same protocol without augmentation, much faster).
* Test accuracy after every epoch; the LAST epoch is the reported number (picking the best epoch selects
  on the test set) - the best is reported too, labelled as such.

The probe runs on the shared training loop (``workers.common.loop``; ``ProbeMethod``): it is checkpointed every
epoch (weights, optimiser, RNG, history) and resumes exactly - the data order and the crops of epoch e are
functions of (seed, e), and the frozen backbone is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, get_worker_info

from shared.specs.eval import LinearProbeOptions
from workers.common import device as dev
from workers.common.context import MethodContext
from workers.common.loop import FitOutcome, LoopConfig, LoopEnv, Method, StepOutput, TrainingLoop, TrainParts
from workers.common.schedule import LrSchedule
from workers.vision.data import OneViewDataset, collated, epoch_seed

STANDARDIZE_EPS = 1e-5
LR_DECAY = 0.1  # MultiStepLR gamma of the reference probe


def feature_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """``(mean, var)`` per dimension of the L2-normalised ``features`` ``[N, D]`` (unbiased variance)."""
    z = F.normalize(features.float(), dim=1)
    var, mean = torch.var_mean(z, dim=0)
    return mean, var


class LinearProbe(nn.Module):
    """``x -> fc((normalize(x) - mean) * inv_std)`` with ``mean``/``inv_std`` fixed buffers (train statistics)."""

    mean: Tensor
    inv_std: Tensor

    def __init__(self, mean: Tensor, var: Tensor, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().float().clone())
        self.register_buffer("inv_std", torch.rsqrt(var.detach().float() + STANDARDIZE_EPS))
        self.fc = nn.Linear(mean.numel(), num_classes)

    @classmethod
    def from_features(cls, train_features: Tensor, num_classes: int) -> LinearProbe:
        """A probe whose standardisation uses these (train-set, eval-transform) features' statistics."""
        mean, var = feature_stats(train_features)
        return cls(mean, var, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        z = F.normalize(x.float(), dim=1)
        return self.fc((z - self.mean) * self.inv_std)


@dataclass
class ProbeData:
    """What the probe trains and is tested on. Features are the backbone's (eval transform); ``augmented``
    (when set) yields augmented train images that go through ``encoder`` at every step instead."""

    train_features: Tensor
    train_labels: Tensor
    test_features: Tensor
    test_labels: Tensor
    num_classes: int
    augmented: OneViewDataset | None = None


@dataclass
class ProbeResult:
    last_top1: float
    best_top1: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    probe: LinearProbe | None = None


def _reseed_worker(worker_id: int) -> None:
    info = get_worker_info()
    if info is not None:
        cast(OneViewDataset, info.dataset).reseed(info.seed % (2**63 - 1))


def probe_loader(dataset: OneViewDataset, batch_size: int, *, seed: int, epoch: int, num_workers: int = 0,
                 pin_memory: bool = False) -> DataLoader[Any]:
    """Shuffled augmented training images for one epoch, the last batch kept (a linear head has no BN);
    order and crops are functions of ``(seed, epoch)``."""
    s = epoch_seed(seed, epoch)
    dataset.reseed(s)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=False, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(s), worker_init_fn=_reseed_worker,
                      collate_fn=collated, pin_memory=pin_memory)


@torch.no_grad()
def accuracy(probe: nn.Module, features: Tensor, labels: Tensor, batch_size: int = 4096) -> float:
    correct = 0
    for i in range(0, len(features), batch_size):
        correct += int((probe(features[i:i + batch_size]).argmax(dim=1) == labels[i:i + batch_size]).sum())
    return correct / max(1, len(features))


def train_probe(data: ProbeData, opts: LinearProbeOptions, *, encoder: nn.Module, ctx: MethodContext[Any],
                device: torch.device, seed: int, amp_dtype: torch.dtype | None = None,
                memory_format: torch.memory_format = torch.contiguous_format, num_workers: int = 0,
                extra_state: Mapping[str, Any] | None = None) -> ProbeResult:
    """Train the probe for ``opts.epochs`` epochs on the training loop (or the rest of them, resuming from
    ``ctx.load_checkpoint()``).

    Args:
        data: features/labels (tensors on any device; moved to ``device``) and, for ``augment``, the images.
        opts: the spec's ``linear`` options.
        encoder: the frozen backbone (used only with augmentation, under ``amp_dtype``).
        ctx: progress, metrics (per epoch: ``linear_train_loss``, ``linear_train_top1``, ``linear_top1``, lr),
            checkpoints (every epoch and on a stop request) and preemption.
        extra_state: added to every checkpoint (the eval job's k-NN numbers and probe metadata).
    """
    method = ProbeMethod(data, opts, encoder=encoder, amp_dtype=amp_dtype, memory_format=memory_format,
                         num_workers=num_workers, seed=seed, extra_state=extra_state)
    config = LoopConfig(kind="eval", schedule=LrSchedule(opts.lr, opts.epochs, "step", tuple(opts.milestones),
                                                        LR_DECAY),
                        seed=seed, amp=False, channels_last=False, checkpoint_every=1, log_every=0,
                        epoch_prefix="linear_train_", resume_keys=("probe", "history"), metric_axis="epoch")
    TrainingLoop(method, ctx, config, device=device).fit()
    if not method.history:
        raise ValueError("the probe trained for no epoch")
    best = max(method.history, key=lambda h: h["linear_top1"])
    return ProbeResult(last_top1=method.history[-1]["linear_top1"], best_top1=best["linear_top1"],
                       best_epoch=int(best["epoch"]), history=method.history, probe=method.probe)


class ProbeMethod(Method[Any]):
    """The linear probe as a loop method: fp32 probe steps (the loop's AMP is off; only the frozen encoder of
    augmented batches runs under ``amp_dtype``), per-epoch test accuracy, no result of its own."""

    def __init__(self, data: ProbeData, opts: LinearProbeOptions, *, encoder: nn.Module, amp_dtype: torch.dtype | None,
                 memory_format: torch.memory_format, num_workers: int, seed: int,
                 extra_state: Mapping[str, Any] | None) -> None:
        self.data, self.opts, self.encoder = data, opts, encoder
        self.amp_dtype, self.memory_format, self.num_workers, self.seed = amp_dtype, memory_format, num_workers, seed
        self.extra_state = dict(extra_state or {})
        self.history: list[dict[str, float]] = []

    def build(self, env: LoopEnv[Any]) -> TrainParts:
        d, device = self.data, env.device
        self.device = device
        self.train_x, self.train_y = d.train_features.to(device), d.train_labels.to(device)
        self.test_x, self.test_y = d.test_features.to(device), d.test_labels.to(device)
        self.probe = LinearProbe.from_features(self.train_x, d.num_classes).to(device)
        optimizer = torch.optim.SGD(self.probe.parameters(), lr=self.opts.lr, momentum=self.opts.momentum,
                                    weight_decay=self.opts.weight_decay)
        return TrainParts(self.probe, optimizer, math.ceil(len(self.train_y) / self.opts.batch_size))

    def epoch_batches(self, epoch: int) -> Iterable[tuple[Tensor, Tensor]]:
        return self._augmented(epoch) if self.data.augmented is not None else self._cached(epoch)

    def _augmented(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        assert self.data.augmented is not None
        device = self.device
        for _, x, y in probe_loader(self.data.augmented, self.opts.batch_size, seed=self.seed, epoch=epoch,
                                    num_workers=self.num_workers, pin_memory=device.type == "cuda"):
            x = x.to(device, non_blocking=True).contiguous(memory_format=self.memory_format)
            with torch.no_grad(), dev.autocast(device, self.amp_dtype):
                f = self.encoder(x)
            yield f.float(), y.to(device, non_blocking=True)

    def _cached(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.train_y)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(self.seed, epoch)))
        order = order.to(self.device)
        for i in range(0, n, self.opts.batch_size):
            idx = order[i:i + self.opts.batch_size]
            yield self.train_x[idx], self.train_y[idx]

    def train_step(self, module: nn.Module, batch: tuple[Tensor, Tensor]) -> StepOutput:
        f, y = batch
        logits = module(f)
        top1 = (logits.detach().argmax(dim=1) == y).float().mean()
        return StepOutput(loss=F.cross_entropy(logits, y), metrics={"top1": top1}, weight=float(len(y)))

    def on_epoch_end(self, *, epoch: int, last: bool, summary: Mapping[str, float]) -> dict[str, float]:
        test_top1 = accuracy(self.probe, self.test_x, self.test_y)
        self.history.append({"linear_train_loss": summary["linear_train_loss"],
                             "linear_train_top1": summary["linear_train_top1"], "linear_top1": test_top1,
                             "lr": summary["lr"], "epoch": float(epoch)})
        return {"linear_top1": test_top1}

    def state_dict(self) -> dict[str, Any]:
        return {"probe": self.probe.state_dict(), "history": list(self.history), **self.extra_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.probe.load_state_dict(state["probe"])
        self.history = list(state["history"])

    def result(self, outcome: FitOutcome) -> None:
        return None  # the eval job reports k-NN and probe numbers together
