"""MoCo v2 - Momentum Contrast (He et al., CVPR 2020; Chen et al., "Improved Baselines", arXiv 2003.04297).

The SSL-Backdoor paper's main victim (security-clip-experts.md §1.2: ResNet-18, queue K = 65,536, key momentum
0.999, InfoNCE tau = 0.2, MLP head 512 -> 2048 -> 128 without BatchNorm). On the shared skeleton:

* query encoder ``f_q`` = the online encoder (backbone + MLP head), predictor = identity;
* key encoder ``f_k`` = the EMA target (``theta_k <- m theta_k + (1 - m) theta_q``, before the keys are computed);
* negative queue = the memory bank of past keys (FIFO, written with the global batch AFTER the loss: the
  current keys are never their own negatives).

Loss (MoCo eq. 1, InfoNCE), with ``q = normalize(f_q(x_q))``, ``k+ = normalize(f_k(x_k))`` and queue rows ``k_j``:

    L = -(1/B) sum_i log( exp(q_i.k+_i / tau) / (exp(q_i.k+_i / tau) + sum_j exp(q_i.k_j / tau)) )

= cross-entropy of the logits ``[q.k+, q.queue^T] / tau`` with label 0 (``info_nce``). Asymmetric, like the
reference ``main_moco.py`` (one query view, one key view). Shuffle-BN is not needed on one device (the whole batch
is one BN group; see ``msf.py``).

With i-CutMix (``icutmix: true``; PatchSearch §3.3, ``icutmix.py``) the query view is mixed and its logits run
over ``[keys of the batch, queue]`` so that the partner's key is a column: ``L = lam CE(l, i) + (1 - lam) CE(l,
perm[i])`` (``mixed_info_nce``). (The reference does this on MoCo v3 - in-batch keys only, symmetrised and
scaled by ``2 tau``; here the queue stays, as in MoCo v2, and the loss is not rescaled.)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.common.distributed import Comm
from workers.ssl_trainer.base import BankMethod, MethodSetup, StepOutput
from workers.ssl_trainer.icutmix import icutmix
from workers.ssl_trainer.msf import purity
from workers.vision.backbones import Backbone


def moco_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """MoCo v2's projection head: ``Linear -> ReLU -> Linear`` (no BatchNorm, unlike the BYOL/MSF heads)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


def info_nce(q: Tensor, k: Tensor, queue: Tensor, *, tau: float) -> Tensor:
    """MoCo's InfoNCE: CE of ``[q_i.k_i, q_i.queue^T] / tau`` with the positive at column 0 (fp32, no autocast).

    Args:
        q: ``[B, d]`` unit-norm queries (carry gradient); k: ``[B, d]`` unit-norm positive keys;
        queue: ``[K, d]`` unit-norm negatives.
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        q = q.float()
        l_pos = (q * k.detach().float()).sum(dim=1, keepdim=True)
        l_neg = q @ queue.detach().float().T
        logits = torch.cat([l_pos, l_neg], dim=1) / tau
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def mixed_info_nce(q: Tensor, keys: Tensor, queue: Tensor, perm: Tensor, lam: float, *, tau: float) -> Tensor:
    """i-CutMix InfoNCE: logits ``q_i . [keys; queue]^T / tau``; ``lam CE(., i) + (1 - lam) CE(., perm[i])``."""
    with torch.autocast(device_type=q.device.type, enabled=False):
        candidates = torch.cat([keys.detach().float(), queue.detach().float()], dim=0)
        logits = q.float() @ candidates.T / tau
        own = torch.arange(len(q), device=q.device)
        return lam * F.cross_entropy(logits, own) + (1.0 - lam) * F.cross_entropy(logits, perm.to(q.device))


class MoCo(BankMethod):
    """MoCo v2: query encoder = online, key encoder = EMA target, negatives = the bank (queue)."""

    def __init__(self, backbone: Backbone, *, queue_size: int, ema_momentum: float = 0.999, tau: float = 0.2,
                 proj_hidden_dim: int | None = None, proj_dim: int | None = None, use_icutmix: bool = False,
                 icutmix_alpha: float = 1.0, seed: int = 0, comm: Comm | None = None) -> None:
        feat_dim = int(backbone.out_dim)
        hidden, out = proj_hidden_dim or 4 * feat_dim, proj_dim or 128  # R18: 512 -> 2048 -> 128
        super().__init__(backbone, moco_head(feat_dim, hidden, out), nn.Identity(), bank_size=queue_size,
                         bank_dim=out, ema_momentum=ema_momentum,
                         bank_generator=torch.Generator().manual_seed(seed), comm=comm)
        self.tau = tau
        self.use_icutmix, self.icutmix_alpha = use_icutmix, icutmix_alpha
        self.mix_generator = torch.Generator().manual_seed(seed + 7)
        self._pending: tuple[Tensor, Tensor | None, Tensor | None] | None = None

    @classmethod
    def from_spec(cls, spec: Any, setup: MethodSetup) -> MoCo:
        return cls(setup.backbone, queue_size=spec.bank_size, ema_momentum=spec.ema_momentum,
                   tau=spec.temperature, proj_hidden_dim=spec.proj_hidden_dim, proj_dim=spec.proj_dim,
                   use_icutmix=spec.icutmix, icutmix_alpha=spec.icutmix_alpha, seed=spec.seed, comm=setup.comm)

    def get_extra_state(self) -> dict[str, Any]:
        return {"mix_generator": self.mix_generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.mix_generator.set_state(state["mix_generator"])

    def step(self, view_target: Tensor, view_online: Tensor, labels: Tensor | None = None,
             indices: Tensor | None = None) -> StepOutput:
        self.flush()
        extras: dict[str, Tensor] = {}
        if self.use_icutmix:
            mixed, perm, lam = icutmix(view_online, self.mix_generator, alpha=self.icutmix_alpha)
            q = self.predict(mixed)
            k = self.encode_target(view_target)
            loss = mixed_info_nce(q, k, self.bank.rows, perm, lam, tau=self.tau)
            extras["icutmix_lambda"] = torch.tensor(lam, device=q.device)
        else:
            q = self.predict(view_online)
            k = self.encode_target(view_target)
            loss = info_nce(q, k, self.bank.rows, tau=self.tau)
        pur = None
        if labels is not None:  # oracle: label agreement of each key's 5 nearest queue entries
            _, slots = self.bank.topk_neighbours(k, min(5, self.bank.size))
            pur = purity(labels, self.bank.labels[slots])
        self._pending = (k, labels, indices)  # enqueued after the optimiser step (see ISD: autograd keeps rows)
        return StepOutput(loss=loss, purity=pur, q=q.detach(), u=k, extras=extras)

    @torch.no_grad()
    def flush(self) -> None:
        if self._pending is not None:
            k, labels, indices = self._pending
            self._pending = None
            self.push_global(k, labels, indices)

    def on_step_end(self, ctx: Any, *, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> dict[str, float]:
        self.flush()
        return {}
