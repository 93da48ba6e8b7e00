"""ISD - Iterative Similarity Distillation (Tejankar, Koohpayegani, Pillai, Favaro, Pirsiavash; ICCV 2021).

A "soft MoCo": the student matches the EMA teacher's soft similarity distribution of a query over random
anchors - the memory bank of past teacher embeddings - instead of a one-hot positive. The two views of an
image are never compared directly. Specification: ssl.md section 4.

Per step (ssl.md 4.2):

1. student ``s = normalize(pred(proj_s(f_s(v_online))))`` (``proj`` only in the "plus" recipe);
2. EMA update, then teacher (no grad, train-mode BN) ``t = normalize(proj_t(f_t(v_target)))``;
3. anchors ``A`` = the bank as it is BEFORE this batch is written (the opposite of MSF's order: enqueuing
   first would put the other view of the same image among the anchors and change the method);
4. ``p^t_i = softmax_j(t_i . a_j / tau_t)``, ``p^s_i = softmax_j(s_i . a_j / tau_s)``;
5. ``L = (1/B) sum_i KL(p^t_i || p^s_i) = (1/B) sum_i sum_j p^t_ij (log p^t_ij - log p^s_ij)`` (``isd_loss``);
6. write ``t`` into the bank. The reference writes between the forward and the backward and therefore
   keeps a full copy of the bank for autograd; we write in ``on_step_end`` (right after the optimiser
   step), which changes nothing mathematically - the bank is a constant of the loss - and saves a K x d copy.

Recipes (ssl.md 4.3): ``r18`` - no projection, bank of D-dim backbone features, predictor
``Linear(D, D, no bias) -> BN -> ReLU -> Linear(D, D)``, tau 0.02/0.02, m 0.999, step LR, strong/strong;
``plus`` - projection ``D -> 2D -> D/4`` and the MLP predictor, tau_t 0.01 (sharp teacher), tau_s 0.1,
m 0.99, cosine LR, weak/strong. The spec applies each recipe's optimisation defaults.

Monitoring: collapse is a zero-loss state here too (equal embeddings make both distributions uniform), so
the teacher-distribution entropy is logged next to its maximum ``log K`` (``teacher_entropy_ratio``; it
should fall well below 1) along with the spread of the embeddings. Purity = label agreement of the
teacher's top-5 anchors (oracle). The bank starts as random unit ROWS (ISD v1 normalised columns).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.common.distributed import Comm
from workers.ssl_trainer.base import BankMethod, MethodSetup, StepOutput
from workers.ssl_trainer.msf import purity
from workers.vision.backbones import Backbone
from workers.vision.heads import MLPHead, head_dims

PURITY_ANCHORS = 5


def isd_loss(s: Tensor, t: Tensor, anchors: Tensor, *, tau_s: float, tau_t: float) -> tuple[Tensor, Tensor]:
    """``(1/B) sum_i KL(p^t_i || p^s_i)`` over the anchors (ssl.md 4.2 step 6), and ``log p^t`` ``[B, K]``.

    Equals ``F.kl_div(log_softmax(s A^T / tau_s), softmax(t A^T / tau_t), reduction="batchmean")``; written
    with both log-softmaxes so that ``p log p`` is exact where ``p`` underflows. fp32 outside autocast:
    with tau = 0.01 the logits span +-100. Builds ``B x K`` logits - inherent to ISD (every anchor is in the
    loss); at B = 256 and K = 128k that is 128 MB per matrix.
    """
    with torch.autocast(device_type=s.device.type, enabled=False):
        a = anchors.detach().float()
        log_ps = F.log_softmax(s.float() @ a.T / tau_s, dim=1)
        with torch.no_grad():
            log_pt = F.log_softmax(t.detach().float() @ a.T / tau_t, dim=1)
        loss = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1).mean()
    return loss, log_pt


def isd_r18_predictor(dim: int) -> nn.Sequential:
    """ISD v1 predictor: ``Linear(D, D, bias=False) -> BatchNorm1d -> ReLU -> Linear(D, D)``."""
    return nn.Sequential(nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
                         nn.Linear(dim, dim))


class ISD(BankMethod):
    """Student = online encoder + predictor; teacher = EMA of the online encoder; anchors = the bank."""

    def __init__(self, backbone: Backbone, *, recipe: str, bank_size: int, ema_momentum: float,
                 temperature_student: float, temperature_teacher: float, proj_hidden_dim: int | None = None,
                 proj_dim: int | None = None, bank_generator: torch.Generator | None = None,
                 comm: Comm | None = None) -> None:
        feat_dim = int(backbone.out_dim)
        projector: nn.Module
        predictor: nn.Module
        if recipe == "r18":
            projector, predictor, dim = nn.Identity(), isd_r18_predictor(feat_dim), feat_dim
        elif recipe == "plus":
            hidden, dim = head_dims(feat_dim, proj_hidden_dim, proj_dim)
            projector, predictor = MLPHead(feat_dim, hidden, dim), MLPHead(dim, hidden, dim)
        else:
            raise ValueError(f"unknown ISD recipe {recipe!r}; use 'r18' or 'plus'")
        super().__init__(backbone, projector, predictor, bank_size=bank_size, bank_dim=dim,
                         ema_momentum=ema_momentum, bank_generator=bank_generator, comm=comm)
        self.recipe = recipe
        self.tau_s, self.tau_t = temperature_student, temperature_teacher
        self._pending: tuple[Tensor, Tensor | None, Tensor | None] | None = None

    @classmethod
    def from_spec(cls, spec: Any, setup: MethodSetup) -> ISD:
        opts = spec.isd
        return cls(setup.backbone, recipe=opts.recipe, bank_size=spec.bank_size, ema_momentum=spec.ema_momentum,
                   temperature_student=float(opts.temperature_student),
                   temperature_teacher=float(opts.temperature_teacher), proj_hidden_dim=spec.proj_hidden_dim,
                   proj_dim=spec.proj_dim, bank_generator=torch.Generator().manual_seed(spec.seed),
                   comm=setup.comm)

    def step(self, view_target: Tensor, view_online: Tensor, labels: Tensor | None = None,
             indices: Tensor | None = None) -> StepOutput:
        """Steps 1-5 of the module docstring; the teacher embeddings are written by ``on_step_end``."""
        self.flush()  # a caller that skipped on_step_end still gets "write after the similarities"
        s = self.predict(view_online)
        t = self.encode_target(view_target)
        loss, log_pt = isd_loss(s, t, self.bank.rows, tau_s=self.tau_s, tau_t=self.tau_t)
        self._pending = (t, labels, indices)
        with torch.no_grad():
            entropy = -(log_pt.exp() * log_pt).sum(dim=1).mean()
            extras = {"teacher_entropy": entropy, "teacher_entropy_ratio": entropy / math.log(self.bank.size)}
            pur = None
            if labels is not None:
                top = log_pt.topk(min(PURITY_ANCHORS, self.bank.size), dim=1).indices
                pur = purity(labels, self.bank.labels[top])
        return StepOutput(loss=loss, purity=pur, q=s.detach(), u=t, extras=extras)

    @torch.no_grad()
    def flush(self) -> None:
        """Write the last step's teacher embeddings (the global batch) into the bank."""
        if self._pending is not None:
            t, labels, indices = self._pending
            self._pending = None
            self.push_global(t, labels, indices)

    def on_step_end(self, ctx: Any, *, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> dict[str, float]:
        self.flush()
        return {}
