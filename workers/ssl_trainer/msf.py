"""MSF - Mean Shift for Self-Supervised Learning (Koohpayegani, Tejankar, Pirsiavash; ICCV 2021).

The online network's prediction of one view is pulled towards the MEAN of the k nearest neighbours of
the EMA target's embedding of the other view, searched in a memory bank of past target embeddings.
The current target is written into the bank before the search, so its first neighbour is itself: with
k = 1 MSF is exactly asymmetric BYOL (``method: byol``).

Per step (ssl.md 2.2), with ``u`` the target embedding and ``q`` the online prediction:

1. online: ``q = normalize(pred(proj_o(f_o(v_online))))``
2. EMA update of the target (backbone + projection, parameters only)
3. target (no grad, train-mode BN): ``u = normalize(proj_t(f_t(v_target)))``
4. push ``u`` (and labels) into the bank M - BEFORE the search
5. ``N_i`` = top-k bank rows by cosine to ``u_i`` (includes ``u_i`` itself)
6. loss (``msf_loss``) on the gathered rows ``M[N_i]``; purity = share of ``N_i`` with ``u_i``'s label.

Shuffle-BN: the reference permutes the target batch to change which samples share a BatchNorm group
across DataParallel GPUs. On one device the whole batch is one BN group, so a permutation changes
nothing; it is not implemented. Under DDP (``resources.gpus > 1``) BatchNorm is synchronised across the
processes instead (``workers.common.distributed``) and the bank is written with the all-gathered global
batch, so a multi-process run computes what one process with the global batch would.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from workers.common.distributed import Comm
from workers.ssl_trainer.base import BankMethod, MethodSetup, StepOutput
from workers.vision.backbones import Backbone
from workers.vision.heads import MLPHead, head_dims

__all__ = ["MSF", "StepOutput", "msf_loss", "purity", "spread"]


def msf_loss(q: Tensor, neighbours: Tensor) -> Tensor:
    """Mean squared distance between each online prediction and its target's bank neighbours.

    ``L = (1/B) sum_i (1/k) sum_{j in N_i} ||q_i - m_j||^2 = (1/B) sum_i (1/k) sum_{j in N_i} (2 - 2 q_i . m_j)``
    (ssl.md 2.2, step 8; the second form holds because q_i and m_j have unit norm). Equivalently, the
    distance from ``q_i`` to the neighbours' mean up to a constant - the "mean shift" of the title.

    Args:
        q: ``[B, d]`` L2-normalised online predictions (the only input that carries gradient).
        neighbours: ``[B, k, d]`` unit-norm bank rows ``M[N_i]`` (gathered, so no ``B x K`` matrix is ever
            built); ``[B, d]`` is read as ``k = 1``, where the loss is BYOL's normalised MSE.

    Returns:
        The scalar loss, in fp32.
    """
    if neighbours.dim() == 2:
        neighbours = neighbours.unsqueeze(1)
    if neighbours.dim() != 3 or neighbours.shape[0] != q.shape[0] or neighbours.shape[2] != q.shape[1]:
        raise ValueError(f"expected q [B, d] and neighbours [B, k, d], got {tuple(q.shape)} and "
                         f"{tuple(neighbours.shape)}")
    # Elementwise product + sum rather than einsum/bmm: autocast would run a matmul in bf16/fp16, and
    # these cosines are the loss itself. B x k x d is small (that is the point of gathering).
    cos = (q.float().unsqueeze(1) * neighbours.detach().float()).sum(dim=-1)
    return (2.0 - 2.0 * cos).mean()


def purity(query_labels: Tensor, neighbour_labels: Tensor, valid: Tensor | None = None) -> Tensor:
    """Share of neighbours whose label equals the query's (monitor only; ground-truth labels never train).

    Queries with label -1 (unknown) are left out; 0 when no query has a label. ``valid`` (``[B, k]`` bool)
    restricts each row to the neighbours actually used (CMSF rows whose constraint set is short). Computed
    without a host sync (no data-dependent branch), since it runs every step.
    """
    known = (query_labels >= 0).float()
    same = (neighbour_labels == query_labels.unsqueeze(1)).float()
    if valid is None:
        per_row = same.mean(dim=1)
    else:
        w = valid.float()
        per_row = (same * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
    return (per_row * known).sum() / known.sum().clamp_min(1.0)


def spread(z: Tensor) -> Tensor:
    """Collapse monitor: mean per-dimension std of L2-normalised embeddings, times sqrt(d).

    About 1 for embeddings spread over the sphere, -> 0 when every sample maps to the same vector
    (ssl.md 7.5 item 9).
    """
    z = F.normalize(z.detach().float(), dim=1)
    return z.std(dim=0).mean() * z.shape[1] ** 0.5


class MSF(BankMethod):
    """MSF (and BYOL as ``topk=1``) on the shared skeleton: projection ``D -> 2D -> D/4``, predictor of the
    same MLP shape on the projection (reference R18: 512 -> 1024 -> 128, predictor 128 -> 1024 -> 128)."""

    def __init__(self, backbone: Backbone, *, topk: int, bank_size: int, ema_momentum: float = 0.99,
                 proj_hidden_dim: int | None = None, proj_dim: int | None = None,
                 bank_generator: torch.Generator | None = None, track_indices: bool = False,
                 comm: Comm | None = None) -> None:
        feat_dim = int(backbone.out_dim)
        hidden, out = head_dims(feat_dim, proj_hidden_dim, proj_dim)
        if not 1 <= topk <= bank_size:
            raise ValueError(f"topk={topk} must be between 1 and bank_size={bank_size}")
        super().__init__(backbone, MLPHead(feat_dim, hidden, out), MLPHead(out, hidden, out), bank_size=bank_size,
                         bank_dim=out, ema_momentum=ema_momentum, track_indices=track_indices,
                         bank_generator=bank_generator, comm=comm)
        self.topk = topk

    @classmethod
    def from_spec(cls, spec: Any, setup: MethodSetup) -> MSF:
        return cls(setup.backbone, topk=int(spec.topk or 1), bank_size=spec.bank_size,
                   ema_momentum=spec.ema_momentum, proj_hidden_dim=spec.proj_hidden_dim, proj_dim=spec.proj_dim,
                   bank_generator=torch.Generator().manual_seed(spec.seed), comm=setup.comm)

    def step(self, view_target: Tensor, view_online: Tensor, labels: Tensor | None = None,
             indices: Tensor | None = None) -> StepOutput:
        """One MSF forward (steps 1-6 of the module docstring); the caller does backward + optimizer."""
        q = self.predict(view_online)
        u = self.encode_target(view_target)
        # Write BEFORE the search: each target's nearest neighbour is itself (k = 1 == BYOL).
        self.push_global(u, labels, indices)
        _, slots = self.bank.topk_neighbours(u, self.topk)
        loss = msf_loss(q, self.bank.gather(slots))
        pur = purity(labels, self.bank.labels[slots]) if labels is not None else None
        return StepOutput(loss=loss, purity=pur, q=q.detach(), u=u, slots=slots)
