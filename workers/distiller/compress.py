"""CompRess - Self-Supervised Learning by Compressing Representations
(Koohpayegani, Tejankar, Pirsiavash; NeurIPS 2020).

The student learns to reproduce the teacher's SIMILARITY DISTRIBUTION over a set of anchors - past
teacher features kept in a memory bank - rather than the teacher's feature itself (ssl.md 5.6)::

    t = normalize(f_T(v)),  s = normalize(student feature of the same view v)
    p_T = softmax(t . A_T^T / tau)                             # A_T: teacher bank, K rows
    1q:  p_S = softmax(normalize(W s_raw) . A_T^T / tau)       # W: Linear(d_S, d_T), teacher's anchors
    2q:  p_S = softmax(s . A_S^T / tau)                        # A_S: bank of an EMA copy of the student
    L   = (1/B) sum_i KL(p_T,i || p_S,i) = (1/B) sum_i sum_j p_T,ij (log p_T,ij - log p_S,ij)

Banks are written AFTER the similarities are computed (ssl.md 1.5, 8.1): the current batch is never
one of its own anchors. tau = 0.04 for both sides. In 2q the EMA student (alpha = 0.999, parameters
only) runs with BatchNorm in train mode, like the reference's key encoder. Under DDP every rank writes the
GLOBAL batch (all ranks' rows, all-gathered in rank order), so the banks stay identical on every rank, as in
one process holding the whole batch.

``compress_kl`` and ``CompressLoss`` are the reusable pieces: the poison-scanner's KD backdoor defense
distils a possibly-poisoned teacher with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.common.distributed import Comm
from workers.distiller import StepOutput
from workers.vision.backbones import Backbone
from workers.vision.bank import MemoryBank
from workers.vision.ema import ema_update, make_target


def compress_kl(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """``(1/B) sum_i KL(softmax(teacher_logits_i) || softmax(student_logits_i))``, in fp32.

    The logits are similarities divided by the temperature. No gradient flows into the teacher side.
    Equals ``F.kl_div(log_softmax(student), softmax(teacher), reduction="batchmean")`` of the reference.
    """
    log_pt = F.log_softmax(teacher_logits.detach().float(), dim=1)
    log_ps = F.log_softmax(student_logits.float(), dim=1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(dim=1).mean()


@dataclass
class CompressOutput:
    loss: Tensor
    teacher_logits: Tensor  # [B, K] t . A_T / tau, with the banks as they were BEFORE this batch's write
    student_logits: Tensor  # [B, K]


class CompressLoss(nn.Module):
    """The CompRess objective with its memory bank(s) (and, for 1q, the student-to-teacher linear map).

    Args:
        teacher_dim: teacher feature width ``d_T``.
        student_dim: student feature width ``d_S``.
        bank_size: anchors K (rows of each bank); must be a multiple of the (global) batch size.
        temperature: tau of both softmaxes (0.04 in the paper).
        variant: ``"1q"`` - the student is mapped to ``d_T`` by a trainable ``Linear`` (``self.project``, put
            its parameters in the optimiser) and scored against the teacher's anchors; ``"2q"`` - scored
            against its own bank, filled with the EMA student's features (pass them as ``student_key``).
        generator: seeds the random initial bank rows.
        comm: the process group (several processes: the banks are written with the all-gathered batch).

    Example::

        crit = CompressLoss(2048, 512, bank_size=4096, variant="1q")
        opt = SGD([*student.parameters(), *crit.parameters()], lr=0.01)
        loss = crit(teacher(x), student(x)).loss
    """

    def __init__(self, teacher_dim: int, student_dim: int, *, bank_size: int, temperature: float = 0.04,
                 variant: str = "1q", generator: torch.Generator | None = None, comm: Comm | None = None) -> None:
        super().__init__()
        self.comm = comm or Comm()
        if variant not in ("1q", "2q"):
            raise ValueError(f"variant must be '1q' or '2q', got {variant!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.variant, self.temperature = variant, float(temperature)
        self.teacher_bank = MemoryBank(bank_size, teacher_dim, generator=generator)
        if variant == "1q":
            self.project: nn.Linear | None = nn.Linear(student_dim, teacher_dim)
            self.student_bank: MemoryBank | None = None
        else:
            self.project = None
            self.student_bank = MemoryBank(bank_size, student_dim, generator=generator)

    def similarities(self, x: Tensor, bank: MemoryBank) -> Tensor:
        """``normalize(x) . A^T / tau`` against every bank row, ``[B, K]``, in fp32 (outside autocast)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            # When x carries a gradient, autograd keeps the anchors for the backward pass; the bank is then
            # overwritten in place by push(), so the product must see a snapshot of the rows.
            anchors = bank.rows.clone() if x.requires_grad else bank.rows
            return F.normalize(x.float(), dim=1) @ anchors.T / self.temperature

    def forward(self, teacher_feats: Tensor, student_feats: Tensor, student_key: Tensor | None = None
                ) -> CompressOutput:
        """Loss of one batch, then the bank writes.

        Args:
            teacher_feats: ``[B, d_T]`` teacher features (no grad needed).
            student_feats: ``[B, d_S]`` student features (carry the gradient).
            student_key: ``[B, d_S]`` EMA-student features of the same view (2q only).
        """
        if self.variant == "2q" and student_key is None:
            raise ValueError("CompRess-2q needs student_key (the EMA student's features of the same view)")
        teacher_feats = teacher_feats.detach()
        t_logits = self.similarities(teacher_feats, self.teacher_bank)
        if self.project is not None:
            s_logits = self.similarities(self.project(student_feats.float()), self.teacher_bank)
        else:
            assert self.student_bank is not None
            s_logits = self.similarities(student_feats, self.student_bank)
        loss = compress_kl(t_logits, s_logits)
        # Write AFTER the similarities: this batch becomes an anchor for the next ones, never for itself.
        self.teacher_bank.push(self.comm.all_gather(teacher_feats))
        if self.student_bank is not None and student_key is not None:
            self.student_bank.push(self.comm.all_gather(student_key.detach()))
        return CompressOutput(loss=loss, teacher_logits=t_logits.detach(), student_logits=s_logits.detach())


def entropy(logits: Tensor) -> Tensor:
    """Mean entropy (nats) of ``softmax(logits)`` rows; well below log K when the teacher is peaked."""
    logp = F.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(dim=1).mean()


class CompRess(nn.Module):
    """Student backbone + ``CompressLoss`` (+ the EMA student for 2q). The teacher is not a sub-module.

    Attributes:
        student: the backbone exported after training.
        criterion: the loss with its bank(s) and, for 1q, the linear map (discarded after training).
        student_ema: the 2q key encoder (None for 1q); its parameters never receive gradients.
    """

    def __init__(self, backbone: Backbone, teacher_dim: int, *, variant: str, bank_size: int,
                 temperature: float = 0.04, student_ema: float = 0.999,
                 generator: torch.Generator | None = None, comm: Comm | None = None) -> None:
        super().__init__()
        self.student = backbone
        student_dim = backbone.out_dim
        self.criterion = CompressLoss(teacher_dim, student_dim, bank_size=bank_size,
                                      temperature=temperature, variant=variant, generator=generator, comm=comm)
        self.ema_momentum = float(student_ema)
        self.student_ema = make_target(backbone) if variant == "2q" else None

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student backbone, plus the 1q linear map."""
        return [*self.student.parameters(), *self.criterion.parameters()]

    def train(self, mode: bool = True) -> CompRess:
        super().train(mode)
        if self.student_ema is not None:  # BN of the key encoder uses batch statistics, as in the reference
            self.student_ema.train(True)
        return self

    def step(self, view: Tensor, teacher_feats: Sequence[Tensor]) -> StepOutput:
        """Loss of one batch; ``view`` is the student's input, ``teacher_feats`` = [teacher feature of it]."""
        if len(teacher_feats) != 1:
            raise ValueError(f"CompRess distils one teacher, got {len(teacher_feats)} teacher features")
        s = self.student(view)
        key = None
        if self.student_ema is not None:
            # The reference updates the key encoder after each optimiser step; updating before computing the
            # keys is the same sequence of weights (the first update averages two identical networks).
            ema_update(self.student_ema, self.student, self.ema_momentum)
            with torch.no_grad():
                key = self.student_ema(view)
        out = self.criterion(teacher_feats[0], s, key)
        return StepOutput(loss=out.loss, metrics={"teacher_entropy": entropy(out.teacher_logits),
                                                  "student_entropy": entropy(out.student_logits)})

    def forward(self, view: Tensor, teacher_feats: Sequence[Tensor]) -> StepOutput:
        # DDP calls forward(); a step is the unit the gradient all-reduce wraps.
        return self.step(view, teacher_feats)
