"""SimReg - Regression as a Simple Yet Effective Tool for Self-supervised Knowledge Distillation
(Navaneet, Koohpayegani, Tejankar, Pirsiavash; BMVC 2021, arXiv 2201.05131).

A frozen self-supervised teacher is distilled into a student backbone by plain feature regression,
made strong by three choices (ssl.md 5.1):

1. a deep MLP head ``g`` on the student, used only during distillation and discarded afterwards - the
   exported network is the student BACKBONE, whose features improve although only ``g``'s output is
   trained to match the teacher;
2. several teachers -> one independent head per teacher on the shared backbone, loss averaged over
   the teachers (the paper's multi-teacher variant; the released code has only one teacher);
3. the SAME weakly augmented image ``v`` goes to teacher and student.

Per step (ssl.md 5.2), for each teacher k with width ``D_k``::

    t_k = normalize(f_Tk(v))                       # frozen teacher, eval mode, no grad
    s_k = normalize(g_k(f_S(v)))                   # student backbone + head k
    L_k = (1/B) sum_i ||s_ki - t_ki||^2 = (1/B) sum_i (2 - 2 s_ki . t_ki)
    L   = (1/K) sum_k L_k

Head ``g`` (``head: mlp``, the paper's 4-layer head; d = student width)::

    Linear(d, 2d) -> BN -> ReLU -> Linear(2d, d) -> Linear(d, 2d) -> BN -> ReLU -> Linear(2d, D_k)

i.e. a projection MLP and a prediction MLP stacked with no non-linearity between them. The reference's
``--n_mlp_layers 2`` is two Linear layers with nothing in between (a factorised linear map, ssl.md 5.8)
and is not reproduced; ``head: linear`` is the honest "without the MLP head" ablation, one
``Linear(d, D_k)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.distiller import StepOutput
from workers.vision.backbones import Backbone
from workers.vision.heads import MLPHead


def simreg_loss(student_out: Tensor, teacher_feat: Tensor) -> Tensor:
    """``(1/B) sum_i (2 - 2 s_i . t_i)`` with ``s = normalize(student_out)``, ``t = normalize(teacher_feat)``.

    Equal to the mean squared distance of the L2-normalised vectors. Computed in fp32 even under
    autocast (the cosines are the loss); no gradient flows into the teacher feature.

    Args:
        student_out: ``[B, D]`` head outputs ``g(f_S(v))``.
        teacher_feat: ``[B, D]`` teacher features ``f_T(v)`` of the same view.
    """
    if student_out.shape != teacher_feat.shape:
        raise ValueError(f"student head output {tuple(student_out.shape)} and teacher feature "
                         f"{tuple(teacher_feat.shape)} differ; the head must end at the teacher's width")
    s = F.normalize(student_out.float(), dim=1)
    t = F.normalize(teacher_feat.detach().float(), dim=1)
    return (2.0 - 2.0 * (s * t).sum(dim=1)).mean()


class SimRegHead(nn.Sequential):
    """The paper's 4-layer student head: ``MLPHead(d, 2d, d)`` then ``MLPHead(d, 2d, out_dim)``."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None) -> None:
        hidden = hidden_dim or 2 * in_dim
        super().__init__(MLPHead(in_dim, hidden, in_dim), MLPHead(in_dim, hidden, out_dim))
        self.in_dim, self.out_dim = in_dim, out_dim


def build_head(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """``"mlp"`` -> ``SimRegHead``; ``"linear"`` -> ``Linear(in_dim, out_dim)`` (the no-MLP ablation)."""
    if kind == "mlp":
        return SimRegHead(in_dim, out_dim)
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    raise ValueError(f"unknown SimReg head {kind!r}; use 'mlp' or 'linear'")


class SimReg(nn.Module):
    """Student backbone + one regression head per teacher. Teachers are NOT sub-modules: the
    checkpoint holds only what is trained, and ``train()`` on this module cannot touch them.

    Attributes:
        student: the backbone exported after training (``student.out_dim`` wide).
        heads: ``heads[k]`` maps the student feature to teacher k's width; discarded after training.
    """

    def __init__(self, backbone: Backbone, teacher_dims: Sequence[int], *, head: str = "mlp") -> None:
        super().__init__()
        if not teacher_dims:
            raise ValueError("SimReg needs at least one teacher")
        self.student = backbone
        d = backbone.out_dim
        self.heads = nn.ModuleList(build_head(head, d, int(dim)) for dim in teacher_dims)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Backbone + every head; weight decay on all of them (BN and biases too), as in the reference."""
        return list(self.parameters())

    def step(self, view: Tensor, teacher_feats: Sequence[Tensor]) -> StepOutput:
        """Loss of one batch: ``view`` is the student's input (normalised for the student), ``teacher_feats[k]``
        teacher k's feature of the same image."""
        if len(teacher_feats) != len(self.heads):
            raise ValueError(f"{len(teacher_feats)} teacher features for {len(self.heads)} heads")
        f = self.student(view)
        losses = torch.stack([simreg_loss(head(f), t) for head, t in zip(self.heads, teacher_feats, strict=True)])
        metrics = {f"loss_teacher{k}": v.detach() for k, v in enumerate(losses)} if len(losses) > 1 else {}
        return StepOutput(loss=losses.mean(), metrics=metrics)

    def forward(self, view: Tensor, teacher_feats: Sequence[Tensor]) -> StepOutput:
        # DDP calls forward(); a step is the unit the gradient all-reduce wraps.
        return self.step(view, teacher_feats)
