"""CMSF - Constrained Mean Shift (Tejankar, Koohpayegani, Pirsiavash, arXiv 2110.10309; Navaneet et al.,
"... Using Distant Yet Related Neighbors", ECCV 2022). Specification: ssl.md section 3.

MSF averages the k nearest bank neighbours of the target, which are close to it by construction. CMSF
searches them only among bank rows that are "probably the same class" according to extra knowledge - the
constraint set ``C_i`` - so farther, still related neighbours enter the target.

Per step (ssl.md 3.1), steps 1-5 as MSF (``msf.py``):

1. ``q = normalize(pred(proj_o(f_o(v_online))))``; 2. EMA update; 3. ``u = normalize(proj_t(f_t(v_target)))``;
4. constraint keys of the queries (pseudo-labels; before the write, from the frozen head);
5. push ``u`` into the bank BEFORE the search (the current target always satisfies its own constraint, so
   ``N_i^C`` contains ``u_i`` itself: the BYOL term), then update the constraint's caches;
6. ``N_i^C`` = k nearest rows of ``u_i`` inside ``C_i`` (``constraints.py``);
7. ``L_C = (1/B) sum_i (1/|N_i^C|) sum_{j in N_i^C} (2 - 2 q_i . m_j)`` (``constrained_loss``);
   self-supervised constraints (2q, kmeans, cross-modal): ``L = (L_C + L_MSF) / 2`` with MSF's
   unconstrained top-k; label constraints (supervised, semi-supervised): ``L = L_C``.

Deliberate differences from the reference code (ssl.md 3.9, 8.10), all noted where they are implemented:
``|C_i| < k`` never falls back to disallowed rows (the loss averages the valid neighbours; the share of
such rows is logged as ``constraint_short``); never-written bank rows satisfy no image constraint; the
2Q pool starts as unit rows; k-means epoch 1 is plain MSF by construction; resume keeps the bank pointer
(the reference reset it to 0); purity is reported for the neighbours actually used (``purity``) and for
MSF's unconstrained ones (``purity_msf``, the reference's 2Q number).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from workers.common.distributed import Comm
from workers.ssl_trainer.base import MethodSetup, StepOutput
from workers.ssl_trainer.constraints import (
    Constraint,
    CrossModalConstraint,
    KMeansConstraint,
    SupervisedConstraint,
    TwoQueueConstraint,
    cross_modal_embeddings,
)
from workers.ssl_trainer.msf import MSF, msf_loss, purity
from workers.ssl_trainer.pseudo_labels import SemiSupervisedConstraint
from workers.vision.backbones import Backbone
from workers.vision.heads import head_dims

CROSS_MODAL_INPUT = "cmsf.cross_modal_checkpoint"


def constrained_loss(q: Tensor, neighbours: Tensor, valid: Tensor) -> Tensor:
    """``L_C = (1/B) sum_i (1/|N_i^C|) sum_{j in N_i^C} (2 - 2 q_i . m_j)`` (ssl.md 3.1).

    Args:
        q: ``[B, d]`` normalised online predictions (carry the gradient).
        neighbours: ``[B, k, d]`` bank rows ``M[N_i^C]``.
        valid: ``[B, k]`` bool; False marks padding where ``C_i`` had fewer than k rows. Those entries are
            left out (every row keeps at least its own target), so with all entries valid this is exactly
            ``msf_loss``.
    """
    cos = (q.float().unsqueeze(1) * neighbours.detach().float()).sum(dim=-1)
    w = valid.float()
    per_row = ((2.0 - 2.0 * cos) * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
    return per_row.mean()


def build_constraint(spec: Any, setup: MethodSetup, *, dim: int) -> Constraint:
    """The constraint module of ``spec.cmsf.constraint`` (dim: the projection width)."""
    opts = spec.cmsf
    gen = torch.Generator().manual_seed(spec.seed + 1)
    if opts.constraint == "supervised":
        return SupervisedConstraint(setup.comm)
    if opts.constraint == "2q":
        return TwoQueueConstraint(setup.num_train, dim, topk_constraint=opts.topk_constraint, generator=gen,
                                  comm=setup.comm)
    if opts.constraint == "kmeans":
        return KMeansConstraint(setup.num_train, dim, clusters=opts.kmeans_clusters, iters=opts.kmeans_iters,
                                seed=spec.seed, generator=gen, comm=setup.comm)
    if opts.constraint == "semi-supervised":
        return SemiSupervisedConstraint(
            setup.train_labels, bank_size=spec.bank_size, dim=dim, num_classes=setup.num_classes,
            label_fraction=opts.label_fraction, confidence_threshold=opts.confidence_threshold,
            head=opts.pseudo_head, head_epochs=opts.head_epochs, seed=spec.seed, comm=setup.comm)
    if opts.constraint == "cross-modal":
        ref = (setup.inputs.get("checkpoints") or {}).get(CROSS_MODAL_INPUT) or {}
        if setup.train_images is None or setup.normalization is None:
            raise ValueError("cross-modal CMSF needs the training images (MethodSetup.train_images)")
        emb = cross_modal_embeddings(ref, setup.train_images, features=opts.cross_modal_features,
                                     device=setup.device, fallback_normalization=setup.normalization)
        setup.comm.broadcast_(emb)  # identical constraint space on every rank
        return CrossModalConstraint(emb, topk_constraint=opts.topk_constraint, comm=setup.comm)
    raise ValueError(f"unknown cmsf constraint {opts.constraint!r}")


class CMSF(MSF):
    """MSF with a constrained neighbour search; ``constraint`` holds the variant's state."""

    def __init__(self, backbone: Backbone, *, constraint: Constraint, topk: int, bank_size: int,
                 ema_momentum: float = 0.99, proj_hidden_dim: int | None = None, proj_dim: int | None = None,
                 bank_generator: torch.Generator | None = None, comm: Comm | None = None) -> None:
        super().__init__(backbone, topk=topk, bank_size=bank_size, ema_momentum=ema_momentum,
                         proj_hidden_dim=proj_hidden_dim, proj_dim=proj_dim, bank_generator=bank_generator,
                         track_indices=constraint.needs_indices, comm=comm)
        self.constraint = constraint

    @classmethod
    def from_spec(cls, spec: Any, setup: MethodSetup) -> CMSF:
        _, dim = head_dims(int(setup.backbone.out_dim), spec.proj_hidden_dim, spec.proj_dim)
        constraint = build_constraint(spec, setup, dim=dim)
        return cls(setup.backbone, constraint=constraint, topk=int(spec.topk or 1), bank_size=spec.bank_size,
                   ema_momentum=spec.ema_momentum, proj_hidden_dim=spec.proj_hidden_dim, proj_dim=spec.proj_dim,
                   bank_generator=torch.Generator().manual_seed(spec.seed), comm=setup.comm)

    def step(self, view_target: Tensor, view_online: Tensor, labels: Tensor | None = None,
             indices: Tensor | None = None) -> StepOutput:
        """One CMSF forward (steps 1-7 of the module docstring); the caller does backward + optimizer."""
        c = self.constraint
        if c.needs_indices and indices is None:
            raise ValueError(f"cmsf constraint {c.name!r} needs the dataset index of every batch row")
        q = self.predict(view_online)
        u = self.encode_target(view_target)
        keys = c.query_keys(u, labels, indices)
        pushed = self.push_global(u, labels, indices)  # BEFORE the search, as in MSF
        c.after_push(self.bank, pushed, self.comm.all_gather(keys) if keys is not None else None)

        constrained = c.neighbours(self.bank, u, indices, keys, self.topk)
        free_slots = None
        if constrained is None or c.with_msf_term:
            _, free_slots = self.bank.topk_neighbours(u, self.topk)
        if constrained is None:  # no constraint yet (k-means before its first clustering): plain MSF
            assert free_slots is not None
            slots, valid = free_slots, torch.ones_like(free_slots, dtype=torch.bool)
        else:
            slots, valid = constrained.slots, constrained.valid
        loss_c = constrained_loss(q, self.bank.gather(slots), valid)
        loss = loss_c
        if c.with_msf_term:
            assert free_slots is not None
            loss = 0.5 * (loss_c + msf_loss(q, self.bank.gather(free_slots)))

        extras = {"loss_constrained": loss_c.detach(),
                  "constraint_short": (valid.sum(dim=1) < self.topk).float().mean(), **c.step_metrics}
        pur = None
        if labels is not None:
            pur = purity(labels, self.bank.labels[slots], valid)
            if free_slots is not None:
                extras["purity_msf"] = purity(labels, self.bank.labels[free_slots])
        return StepOutput(loss=loss, purity=pur, q=q.detach(), u=u, slots=slots, extras=extras)

    def on_fit_start(self, ctx: Any, *, resumed: bool) -> dict[str, float]:
        return self.constraint.on_fit_start(ctx, resumed=resumed)

    def on_step_end(self, ctx: Any, *, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> dict[str, float]:
        return self.constraint.on_step_end(ctx, epoch=epoch, step_in_epoch=step_in_epoch,
                                           steps_per_epoch=steps_per_epoch)

    def on_epoch_end(self, ctx: Any, *, epoch: int, last: bool) -> dict[str, float]:
        return self.constraint.on_epoch_end(ctx, epoch=epoch, last=last)
