"""SimReg and CompRess against slow, literal implementations of the formulas in ssl.md §5; frozen teachers;
the model-checkpoint loader that must never load partially."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from workers.distiller.compress import CompRess, CompressLoss, compress_kl
from workers.distiller.simreg import SimReg, SimRegHead, build_head, simreg_loss
from workers.distiller.teachers import load_teachers
from workers.runtime.context import JobConfigError
from workers.vision.backbones import create_backbone
from workers.vision.checkpoints import CheckpointError, load_encoder, model_payload
from workers.vision.heads import MLPHead

torch.set_num_threads(1)

META = {"method": "msf", "backbone": "resnet18", "stem": "cifar", "image_size": 8,
        "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}, "classes": ["a", "b"]}


class TinyBackbone(nn.Module):
    """A stand-in student: conv + BN + pool, ``out_dim`` wide (fast enough for exact formula checks)."""

    def __init__(self, out_dim: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, out_dim, 3, padding=1), nn.BatchNorm2d(out_dim), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _resnet_payload(projector: MLPHead | None = None) -> dict:
    torch.manual_seed(0)
    backbone = create_backbone("resnet18", stem="cifar")
    return model_payload(backbone, meta=META, projector=projector) | {"source": backbone}


# --- SimReg ------------------------------------------------------------------------------------------

def test_simreg_loss_matches_the_literal_formula() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g) * 3
    literal = 0.0
    for i in range(6):
        si = s[i] / math.sqrt(sum(v * v for v in s[i].tolist()))
        ti = t[i] / math.sqrt(sum(v * v for v in t[i].tolist()))
        literal += float(((si - ti) ** 2).sum())  # ||s_i - t_i||^2 of unit vectors
    assert_close(simreg_loss(s, t), torch.tensor(literal / 6))
    assert_close(simreg_loss(t, t), torch.tensor(0.0), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="teacher's width"):
        simreg_loss(s, t[:, :4])


def test_heads_end_at_the_teacher_width_and_the_mlp_is_the_papers_4_layer_head() -> None:
    head = build_head("mlp", 16, 40)
    assert isinstance(head, SimRegHead)
    assert [type(m).__name__ for m in head.modules() if not isinstance(m, nn.Sequential)] == [
        "Linear", "BatchNorm1d", "ReLU", "Linear", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 32), (32, 16), (16, 32), (32, 40)]
    assert head(torch.randn(4, 16)).shape == (4, 40)
    linear = build_head("linear", 16, 40)
    assert isinstance(linear, nn.Linear) and linear(torch.randn(4, 16)).shape == (4, 40)


def test_multi_teacher_loss_is_the_mean_over_independent_heads() -> None:
    torch.manual_seed(0)
    model = SimReg(TinyBackbone(8), [12, 20], head="mlp")
    x = torch.randn(6, 3, 5, 5)
    t0, t1 = torch.randn(6, 12), torch.randn(6, 20)
    out = model.step(x, [t0, t1])
    f = model.student(x)
    per = [simreg_loss(model.heads[0](f), t0), simreg_loss(model.heads[1](f), t1)]
    assert_close(out.loss, (per[0] + per[1]) / 2)
    assert_close(out.metrics["loss_teacher1"], per[1].detach())
    # Independent heads: no shared parameter, and head k only receives gradient from teacher k's term.
    assert not {id(p) for p in model.heads[0].parameters()} & {id(p) for p in model.heads[1].parameters()}
    out.loss.backward()
    grads = [p.grad.clone() for p in model.heads[0].parameters()]
    model.zero_grad()
    (0.5 * simreg_loss(model.heads[0](model.student(x)), t0)).backward()
    for g, p in zip(grads, model.heads[0].parameters(), strict=True):
        assert_close(g, p.grad)


def test_teacher_is_frozen_in_eval_mode_and_gets_no_gradient() -> None:
    payload = _resnet_payload()
    (teacher,) = load_teachers([payload], features="backbone", device=torch.device("cpu"))
    bn_before = teacher.encoder.backbone.bn1.running_mean.clone()
    model = SimReg(TinyBackbone(8), [teacher.dim])
    model.train()
    teacher.encoder.train()  # even asked explicitly, the teacher stays in eval mode
    assert not teacher.encoder.training and not teacher.encoder.backbone.bn1.training
    x01 = torch.rand(4, 3, 8, 8)
    feats = [teacher.embed(x01)]
    assert not feats[0].requires_grad
    model.step(x01, feats).loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.encoder.parameters())
    assert all(p.grad is not None for p in model.parameters())
    assert torch.equal(teacher.encoder.backbone.bn1.running_mean, bn_before)  # eval-mode BN: stats untouched
    # Its input is normalised with the teacher's own statistics: embed == backbone((x - mean) / std).
    with torch.no_grad():
        expected = payload["source"].eval()((x01 - 0.5) / 0.25)
    assert_close(feats[0], expected)


# --- CompRess ----------------------------------------------------------------------------------------

def _literal_kl(t: torch.Tensor, s: torch.Tensor, anchors_t: torch.Tensor, anchors_s: torch.Tensor,
                tau: float) -> torch.Tensor:
    """(1/B) sum_i sum_j p_T,ij (log p_T,ij - log p_S,ij), one row at a time."""
    total = 0.0
    for i in range(t.shape[0]):
        ti, si = t[i] / t[i].norm(), s[i] / s[i].norm()
        zt = torch.exp(anchors_t @ ti / tau)
        zs = torch.exp(anchors_s @ si / tau)
        pt, ps = zt / zt.sum(), zs / zs.sum()
        total += float((pt * (pt.log() - ps.log())).sum())
    return torch.tensor(total / t.shape[0])


def test_compress_kl_equals_torch_kl_div() -> None:
    g = torch.Generator().manual_seed(1)
    t, s = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    expected = F.kl_div(F.log_softmax(s, dim=1), F.softmax(t, dim=1), reduction="batchmean")
    assert_close(compress_kl(t, s), expected)
    assert_close(compress_kl(t, t), torch.tensor(0.0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", ["1q", "2q"])
def test_compress_loss_matches_the_literal_formula_and_writes_banks_after(variant: str) -> None:
    g = torch.Generator().manual_seed(2)
    tau, batch = 0.5, 4
    crit = CompressLoss(6, 5, bank_size=8, temperature=tau, variant=variant, generator=g)
    t, s, key = torch.randn(batch, 6, generator=g), torch.randn(batch, 5, generator=g), torch.randn(batch, 5)
    teacher_anchors = crit.teacher_bank.rows.clone()
    if variant == "1q":
        assert crit.project is not None and crit.student_bank is None
        s_scored, student_anchors = crit.project(s).detach(), teacher_anchors  # mapped to d_T, teacher anchors
    else:
        assert crit.project is None and crit.student_bank is not None
        s_scored, student_anchors = s, crit.student_bank.rows.clone()
    out = crit(t, s, key if variant == "2q" else None)
    # The loss uses the banks as they were BEFORE this batch was written ...
    assert_close(out.loss.detach(), _literal_kl(t, s_scored, teacher_anchors, student_anchors, tau))
    assert_close(out.teacher_logits, F.normalize(t, dim=1) @ teacher_anchors.T / tau)
    # ... and the write happens afterwards: rows [0, B) now hold this batch, the rest is unchanged.
    assert_close(crit.teacher_bank.rows[:batch], F.normalize(t, dim=1))
    assert torch.equal(crit.teacher_bank.rows[batch:], teacher_anchors[batch:])
    assert crit.teacher_bank.ptr == batch
    if variant == "2q":
        assert_close(crit.student_bank.rows[:batch], F.normalize(key, dim=1))
    # The gradient reaches the student (and the 1q map) even though the bank was overwritten in place.
    s.requires_grad_(True)
    crit(t, s, key if variant == "2q" else None).loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_compress_2q_key_encoder_is_an_ema_in_train_mode_without_gradients() -> None:
    torch.manual_seed(3)
    model = CompRess(TinyBackbone(8), 6, variant="2q", bank_size=8, temperature=0.04, student_ema=0.5)
    assert model.student_ema is not None
    model.eval()
    assert model.student_ema.training and not model.student.training
    model.train()
    before = [p.clone() for p in model.student_ema.parameters()]
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    out = model.step(torch.randn(4, 3, 5, 5), [torch.randn(4, 6)])
    out.loss.backward()
    for b, e, s in zip(before, model.student_ema.parameters(), model.student.parameters(), strict=True):
        assert_close(e, 0.5 * b + 0.5 * s.detach())
        assert e.grad is None
    assert set(model.trainable_parameters()) == set(model.student.parameters())
    with pytest.raises(ValueError, match="one teacher"):
        model.step(torch.randn(4, 3, 5, 5), [torch.randn(4, 6), torch.randn(4, 6)])


# --- model checkpoints ---------------------------------------------------------------------------------

def test_load_encoder_loads_everything_or_raises() -> None:
    payload = _resnet_payload()
    encoder, meta = load_encoder(payload)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    assert meta["feature_dim"] == 512 and meta["projector"] is None and meta["out_dim"] == 512
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert_close(encoder(x), payload["source"].eval()(x))

    broken = dict(payload, backbone=dict(payload["backbone"]))
    broken["backbone"]["layer4.1.bn2.weights"] = broken["backbone"].pop("layer4.1.bn2.weight")
    with pytest.raises(CheckpointError, match="1 of .* backbone tensors are missing"):
        load_encoder(broken)
    with pytest.raises(CheckpointError, match="exports no projection head"):
        load_encoder(payload, features="projection")
    with pytest.raises(JobConfigError, match="no 'backbone'"):  # e.g. an eval job's probe checkpoint
        load_encoder({"probe": {}, "epoch": 3})


def test_load_encoder_projection_features() -> None:
    torch.manual_seed(4)
    projector = MLPHead(512, 64, 16)
    payload = _resnet_payload(projector)
    encoder, meta = load_encoder(payload, features="projection")
    assert encoder.out_dim == meta["feature_dim"] == 16 and meta["projector"] == {"in": 512, "hidden": 64, "out": 16}
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert_close(encoder(x), projector.eval()(payload["source"].eval()(x)))
    bad = dict(payload, projector={k: v for k, v in payload["projector"].items() if not k.startswith("1.")})
    with pytest.raises(CheckpointError, match="projector weights do not match"):
        load_encoder(bad, features="projection")
