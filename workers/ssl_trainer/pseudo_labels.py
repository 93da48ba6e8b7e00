"""Semi-supervised CMSF ("CMSF-Pseudo", ssl.md 3.5): constraint = confident pseudo-labels.

* A labelled split (``labelled_split``): ``label_fraction`` of every class, drawn from the run's seed,
  kept in the checkpoint, logged as metrics and saved as a JSON artifact on a fresh start (ssl.md 8.12:
  the split must be explicit). Only these images' ground truth is ever used for training.
* Pseudo-labeller: a head on the target embedding (``mlp``: d -> 2d (BN, ReLU) -> classes; ``linear``),
  frozen (eval mode, no grad) during the CMSF step. Per query: labelled images take their true label,
  unlabelled ones ``argmax softmax(head(u))`` if its probability reaches ``confidence_threshold``, else -1:
  the row has no constraint (plain MSF neighbours) and its bank row matches nobody.
* ``C_ij = [key_i = key_j]`` on the keys stored with the bank rows; L = L_C only.
* The head is re-trained twice per epoch (mid-epoch and at the end) with cross-entropy on the cached
  target embeddings of labelled images, for ``head_epochs`` epochs with a fresh SGD (lr 0.01, momentum 0.9,
  wd 1e-4, batch 256). Rank 0 trains, then broadcasts the head.
* Oracle metrics (pseudo-label accuracy, confident share on unlabelled rows) read hidden ground truth and
  go to the metrics channel only.

Difference from the reference: the labelled cache keeps each labelled image's LATEST target embedding
(``[n_labelled, d]``) instead of a 128k FIFO, so it never holds stale duplicates and its size is known.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.common.distributed import Comm
from workers.ssl_trainer.base import Pushed
from workers.ssl_trainer.constraints import Constraint, Neighbours, label_neighbours
from workers.vision.bank import MemoryBank
from workers.vision.heads import MLPHead

HEAD_LR, HEAD_MOMENTUM, HEAD_WD, HEAD_BATCH = 0.01, 0.9, 1e-4, 256


def labelled_split(labels: Tensor, fraction: float, seed: int) -> Tensor:
    """Boolean ``[N]`` mask: ``max(1, round(fraction * n_c))`` random images of every class ``c``.

    Stratified so that small subsets still cover every class (the reference's ImageNet 1 %/10 % lists are
    per-class too). A pure function of (labels, fraction, seed).
    """
    g = torch.Generator().manual_seed(seed + 7_777)
    labels = labels.cpu()
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in torch.unique(labels).tolist():
        members = (labels == c).nonzero().flatten()
        take = max(1, round(fraction * len(members)))
        mask[members[torch.randperm(len(members), generator=g)[:take]]] = True
    return mask


def make_head(kind: str, dim: int, num_classes: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(dim, num_classes)
    if kind == "mlp":
        return MLPHead(dim, 2 * dim, num_classes)
    raise ValueError(f"unknown pseudo_head {kind!r}; use 'mlp' or 'linear'")


def train_head(head: nn.Module, feats: Tensor, labels: Tensor, *, epochs: int, seed: int) -> float:
    """Cross-entropy on cached features with a fresh SGD; returns the head's accuracy on them afterwards."""
    head.train()
    head.requires_grad_(True)
    opt = torch.optim.SGD(head.parameters(), lr=HEAD_LR, momentum=HEAD_MOMENTUM, weight_decay=HEAD_WD)
    g = torch.Generator().manual_seed(seed)
    n = len(feats)
    bs = min(HEAD_BATCH, n)  # drop the ragged tail: BatchNorm needs more than one row per batch
    with torch.enable_grad(), torch.autocast(device_type=feats.device.type, enabled=False):
        for _ in range(epochs):
            perm = torch.randperm(n, generator=g).to(feats.device)
            for start in range(0, n - bs + 1, bs):
                idx = perm[start:start + bs]
                loss = F.cross_entropy(head(feats[idx].float()), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    head.eval()
    head.requires_grad_(False)
    with torch.no_grad():
        return float((head(feats.float()).argmax(1) == labels).float().mean())


class SemiSupervisedConstraint(Constraint):
    """Confident pseudo-label constraint; see the module docstring."""

    name = "semi-supervised"
    with_msf_term = False
    labelled: Tensor
    cache: Tensor
    cache_seen: Tensor
    cache_labels: Tensor
    cache_pos: Tensor
    slot_keys: Tensor

    def __init__(self, train_labels: Tensor, *, bank_size: int, dim: int, num_classes: int, label_fraction: float,
                 confidence_threshold: float, head: str, head_epochs: int, seed: int,
                 comm: Comm | None = None) -> None:
        super().__init__(comm)
        self.threshold, self.head_epochs, self.seed = confidence_threshold, head_epochs, seed
        self.label_fraction = label_fraction
        labelled = labelled_split(train_labels, label_fraction, seed)
        members = labelled.nonzero().flatten()
        pos = torch.full((len(labelled),), -1, dtype=torch.long)
        pos[members] = torch.arange(len(members))
        self.register_buffer("labelled", labelled)
        self.register_buffer("cache_pos", pos)  # dataset index -> row of the labelled cache (-1: unlabelled)
        self.register_buffer("cache", torch.zeros(len(members), dim))
        self.register_buffer("cache_seen", torch.zeros(len(members), dtype=torch.bool))
        self.register_buffer("cache_labels", train_labels.cpu()[members].clone())
        self.register_buffer("slot_keys", torch.full((bank_size,), -1, dtype=torch.long))  # key of each bank row
        self.head = make_head(head, dim, num_classes)
        self.head.requires_grad_(False)
        self.head.eval()

    def train(self, mode: bool = True) -> SemiSupervisedConstraint:
        super().train(mode)
        self.head.eval()  # frozen during CMSF steps; only train_head switches it to train mode
        return self

    def query_keys(self, u: Tensor, labels: Tensor | None, indices: Tensor | None) -> Tensor | None:
        if labels is None or indices is None:
            raise ValueError("cmsf constraint 'semi-supervised' needs labels and dataset indices with every batch")
        with torch.no_grad(), torch.autocast(device_type=u.device.type, enabled=False):
            prob = F.softmax(self.head(u.float()), dim=1)
        conf, pred = prob.max(dim=1)
        is_labelled = self.labelled[indices]
        confident = conf >= self.threshold
        # Ground truth enters ONLY through is_labelled rows; the rest is the head's own prediction.
        keys = torch.where(is_labelled, labels, torch.where(confident, pred, torch.full_like(pred, -1)))
        unlabelled = (~is_labelled).float()
        conf_unl = (confident & ~is_labelled).float()
        self.step_metrics = {  # oracle metrics: monitoring only
            "pseudo_confident_fraction": conf_unl.sum() / unlabelled.sum().clamp_min(1.0),
            "pseudo_accuracy": ((pred == labels).float() * conf_unl).sum() / conf_unl.sum().clamp_min(1.0),
        }
        return keys

    def after_push(self, bank: MemoryBank, pushed: Pushed, keys: Tensor | None) -> None:
        assert keys is not None and pushed.indices is not None
        self.slot_keys[pushed.slots] = keys
        pos = self.cache_pos[pushed.indices]
        hit = pos >= 0
        self.cache[pos[hit]] = pushed.u[hit].float()
        self.cache_seen[pos[hit]] = True

    def neighbours(self, bank: MemoryBank, u: Tensor, indices: Tensor | None, keys: Tensor | None,
                   k: int) -> Neighbours | None:
        assert keys is not None
        return label_neighbours(bank, u, k, keys, lambda s, e: self.slot_keys[s:e])

    # --- hooks ----------------------------------------------------------------------------------------
    def on_fit_start(self, ctx: Any, *, resumed: bool) -> dict[str, float]:
        count = int(self.labelled.sum())
        if not resumed and self.comm.is_main and hasattr(ctx, "save_artifact"):
            idx = self.labelled.nonzero().flatten().tolist()
            base = getattr(ctx, "workdir", None) or tempfile.mkdtemp(prefix="crucible-split-")
            path = Path(base) / "labelled-split.json"
            path.write_text(json.dumps({"label_fraction": self.label_fraction, "seed": self.seed,
                                        "stratified": True, "count": count, "indices": idx}))
            ctx.save_artifact(path, name="labelled-split.json", artifact_kind="file",
                              meta={"label_fraction": self.label_fraction, "seed": self.seed, "count": count})
        ctx.log(f"semi-supervised: {count} labelled images ({count / len(self.labelled):.1%}, seed {self.seed})")
        return {"labelled_count": float(count), "labelled_fraction": count / len(self.labelled)}

    def on_step_end(self, ctx: Any, *, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> dict[str, float]:
        if steps_per_epoch >= 2 and step_in_epoch == steps_per_epoch // 2:
            return self._retrain(epoch, phase=1)
        return {}

    def on_epoch_end(self, ctx: Any, *, epoch: int, last: bool) -> dict[str, float]:
        # After the last epoch nothing would use the head any more.
        return {} if last else self._retrain(epoch, phase=2)

    def _retrain(self, epoch: int, *, phase: int) -> dict[str, float]:
        t0 = time.perf_counter()
        seen = int(self.cache_seen.sum())
        out = {"pseudo_head_cached": float(seen)}
        if self.comm.is_main and seen >= 2:
            out["pseudo_head_train_accuracy"] = train_head(
                self.head, self.cache[self.cache_seen], self.cache_labels[self.cache_seen],
                epochs=self.head_epochs, seed=self.seed * 1_000 + 2 * epoch + phase)
        self.comm.broadcast_module_(self.head)
        return out | {"pseudo_head_time_s": time.perf_counter() - t0}
