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

The probe is checkpointed every epoch (weights, optimiser, RNG, history) and resumes exactly: the data order
and the crops of epoch e are functions of (seed, e), and the frozen backbone is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, get_worker_info

from shared.specs.eval import LinearProbeOptions
from workers.common import device as dev
from workers.common.guards import check_finite
from workers.common.schedule import lr_at_epoch, set_lr
from workers.common.seeding import rng_state, set_rng_state
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
        info.dataset.reseed(info.seed % (2**63 - 1))


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


def train_probe(data: ProbeData, opts: LinearProbeOptions, *, encoder: nn.Module, ctx: Any, device: torch.device,
                seed: int, state: dict[str, Any] | None = None, amp_dtype: torch.dtype | None = None,
                memory_format: torch.memory_format = torch.contiguous_format, num_workers: int = 0,
                save: Callable[[dict[str, Any], int, bool], None] | None = None) -> ProbeResult:
    """Train the probe for ``opts.epochs`` epochs (or the rest of them, from ``state``).

    Args:
        data: features/labels (tensors on any device; moved to ``device``) and, for ``augment``, the images.
        opts: the spec's ``linear`` options.
        encoder: the frozen backbone (used only with augmentation).
        ctx: progress, metrics (per epoch: ``linear_train_loss``, ``linear_train_top1``, ``linear_top1``, lr)
            and preemption.
        state: the probe part of a resume checkpoint (``probe_state`` output), or None.
        save: ``save(probe_state, epoch_done, final)`` writes a checkpoint; called after every epoch and on a
            stop request (with the last finished epoch).
    """
    torch.manual_seed(seed)
    train_x, train_y = data.train_features.to(device), data.train_labels.to(device)
    test_x, test_y = data.test_features.to(device), data.test_labels.to(device)
    probe = LinearProbe.from_features(train_x, data.num_classes).to(device)
    optimizer = torch.optim.SGD(probe.parameters(), lr=opts.lr, momentum=opts.momentum,
                                weight_decay=opts.weight_decay)
    history: list[dict[str, float]] = []
    start = 1
    if state is not None:
        probe.load_state_dict(state["probe"])
        optimizer.load_state_dict(state["optimizer"])
        history = list(state["history"])
        set_rng_state(state["rng"])
        start = int(state["epoch"]) + 1
    n = len(train_y)
    steps_per_epoch = math.ceil(n / opts.batch_size)
    total = opts.epochs * steps_per_epoch
    step = (start - 1) * steps_per_epoch

    def probe_state(epoch_done: int) -> dict[str, Any]:
        return {"probe": probe.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch_done,
                "history": history, "rng": rng_state()}

    def batches(epoch: int) -> Any:
        if data.augmented is not None:
            for _, x, y in probe_loader(data.augmented, opts.batch_size, seed=seed, epoch=epoch,
                                        num_workers=num_workers, pin_memory=device.type == "cuda"):
                x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
                with torch.no_grad(), dev.autocast(device, amp_dtype):
                    f = encoder(x)
                yield f.float(), y.to(device, non_blocking=True)
        else:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch))).to(device)
            for i in range(0, n, opts.batch_size):
                idx = order[i:i + opts.batch_size]
                yield train_x[idx], train_y[idx]

    probe.train()
    for epoch in range(start, opts.epochs + 1):
        lr = lr_at_epoch(epoch, base_lr=opts.lr, epochs=opts.epochs, schedule="step", milestones=opts.milestones,
                         decay=LR_DECAY)
        set_lr(optimizer, lr)
        loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
        for f, y in batches(epoch):
            logits = probe(f)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += loss.detach() * len(y)
            correct += (logits.detach().argmax(dim=1) == y).sum()
            seen += len(y)
            ctx.progress(step, total, epoch=epoch)
            ctx.check_preempt(None if save is None else lambda e=epoch: save(probe_state(e - 1), e - 1, False))
        train_loss = float(loss_sum) / max(1, seen)
        check_finite(train_loss, lr)
        values = {"linear_train_loss": train_loss, "linear_train_top1": float(correct) / max(1, seen),
                  "linear_top1": accuracy(probe, test_x, test_y), "lr": lr, "epoch": float(epoch)}
        history.append(values)
        ctx.log_metrics(values, step=epoch)
        if save is not None:
            save(probe_state(epoch), epoch, epoch == opts.epochs)

    if not history:
        raise ValueError("the probe trained for no epoch")
    best = max(history, key=lambda h: h["linear_top1"])
    return ProbeResult(last_top1=history[-1]["linear_top1"], best_top1=best["linear_top1"],
                       best_epoch=int(best["epoch"]), history=history, probe=probe)
