"""SimCLR (Chen, Kornblith, Norouzi, Hinton; ICML 2020): in-batch negatives, NT-Xent.

Both views go through the SAME (online) encoder ``z = normalize(g(f(x)))``; the projection head is the
``Linear -> BN -> ReLU -> Linear`` MLP. For the ``2B`` embeddings of a batch, with ``s_ij = z_i . z_j / tau`` and
``p(i)`` the other view of image ``i``, the NT-Xent loss (SimCLR eq. 1, averaged over all ``2B`` anchors) is

    L = -(1/2B) sum_i log( exp(s_{i,p(i)}) / sum_{k != i} exp(s_ik) ).

The skeleton's EMA target and bank are not used (the bank is one row). The toy backdoor of
security-clip-experts.md §1.8 that did learn the trigger used SimCLR with tau = 0.2.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.common.distributed import Comm
from workers.ssl_trainer.base import BankMethod, MethodSetup, StepOutput
from workers.vision.backbones import Backbone
from workers.vision.heads import MLPHead, head_dims


def nt_xent(z1: Tensor, z2: Tensor, *, tau: float) -> Tensor:
    """NT-Xent of two ``[B, d]`` unit-norm view embeddings (both carry gradient); fp32 outside autocast."""
    with torch.autocast(device_type=z1.device.type, enabled=False):
        z = torch.cat([z1.float(), z2.float()], dim=0)
        n = z.shape[0]
        b = n // 2
        sim = z @ z.T / tau
        sim = sim.masked_fill(torch.eye(n, dtype=torch.bool, device=z.device), float("-inf"))
        partner = torch.cat([torch.arange(b, n), torch.arange(0, b)]).to(z.device)
        return F.cross_entropy(sim, partner)


class SimCLR(BankMethod):
    """One encoder for both views; the loss never reads the (unused) target or bank."""

    def __init__(self, backbone: Backbone, *, tau: float = 0.2, proj_hidden_dim: int | None = None,
                 proj_dim: int | None = None, comm: Comm | None = None) -> None:
        feat_dim = int(backbone.out_dim)
        hidden, out = head_dims(feat_dim, proj_hidden_dim, proj_dim)
        super().__init__(backbone, MLPHead(feat_dim, hidden, out), nn.Identity(), bank_size=1, bank_dim=1,
                         ema_momentum=1.0, comm=comm)
        self.target.requires_grad_(False)
        self.tau = tau

    @classmethod
    def from_spec(cls, spec: Any, setup: MethodSetup) -> SimCLR:
        if setup.comm.distributed:  # the spec refuses it at submit; in-batch negatives are per process here
            raise ValueError("simclr runs in one process (resources.gpus <= 1)")
        return cls(setup.backbone, tau=spec.temperature, proj_hidden_dim=spec.proj_hidden_dim,
                   proj_dim=spec.proj_dim, comm=setup.comm)

    def step(self, view_target: Tensor, view_online: Tensor, labels: Tensor | None = None,
             indices: Tensor | None = None) -> StepOutput:
        z1 = F.normalize(self.online(view_target).float(), dim=1)
        z2 = F.normalize(self.online(view_online).float(), dim=1)
        loss = nt_xent(z1, z2, tau=self.tau)
        with torch.no_grad():
            pos = (z1 * z2).sum(dim=1).mean()
        return StepOutput(loss=loss, purity=None, q=z2.detach(), u=z1.detach(), extras={"positive_cos": pos})
