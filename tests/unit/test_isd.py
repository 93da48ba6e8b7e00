"""ISD (ssl.md section 4) against a literal KL computation, and the bank write order that separates it from MSF."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from workers.ssl_trainer.isd import ISD, isd_loss
from workers.ssl_trainer.msf import MSF
from workers.vision.backbones import create_backbone
from workers.vision.bank import MemoryBank

torch.set_num_threads(1)


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _slow_isd(s: torch.Tensor, t: torch.Tensor, anchors: torch.Tensor, tau_s: float, tau_t: float) -> float:
    """ssl.md 4.2 written out: p^t_ij = exp(t_i.a_j/tau_t) / sum_l exp(t_i.a_l/tau_t) (same for p^s with s,
    tau_s); L = 1/B sum_i sum_j p^t_ij (log p^t_ij - log p^s_ij)."""
    total = 0.0
    for i in range(len(s)):
        zt = [math.exp(float(torch.dot(t[i], a)) / tau_t) for a in anchors]
        zs = [math.exp(float(torch.dot(s[i], a)) / tau_s) for a in anchors]
        for j in range(len(anchors)):
            pt, ps = zt[j] / sum(zt), zs[j] / sum(zs)
            total += pt * (math.log(pt) - math.log(ps))
    return total / len(s)


@pytest.mark.parametrize(("tau_s", "tau_t"), [(0.2, 0.2), (0.1, 0.05)])
def test_isd_loss_matches_the_literal_kl(tau_s: float, tau_t: float) -> None:
    s, t, anchors = _unit(5, 8, seed=1), _unit(5, 8, seed=2), _unit(30, 8, seed=3)
    loss, log_pt = isd_loss(s, t, anchors, tau_s=tau_s, tau_t=tau_t)
    assert_close(loss, torch.tensor(_slow_isd(s.double(), t.double(), anchors.double(), tau_s, tau_t),
                                    dtype=torch.float32), rtol=1e-4, atol=1e-6)
    reference = F.kl_div(F.log_softmax(s @ anchors.T / tau_s, 1), F.softmax(t @ anchors.T / tau_t, 1),
                         reduction="batchmean")
    assert_close(loss, reference, rtol=1e-4, atol=1e-6)
    assert_close(log_pt.exp().sum(1), torch.ones(5))


def test_isd_kl_is_non_negative_and_zero_when_student_equals_teacher() -> None:
    anchors = _unit(64, 16, seed=4)
    for seed in range(5):
        loss, _ = isd_loss(_unit(7, 16, seed=seed), _unit(7, 16, seed=seed + 50), anchors, tau_s=0.1, tau_t=0.01)
        assert float(loss) >= 0.0
    same = _unit(7, 16, seed=9)
    loss, _ = isd_loss(same, same.clone(), anchors, tau_s=0.02, tau_t=0.02)
    assert abs(float(loss)) < 1e-6
    loss, _ = isd_loss(same, same.clone(), anchors, tau_s=0.1, tau_t=0.02)  # same vectors, other temperature
    assert float(loss) > 1e-3


def _isd(recipe: str) -> ISD:
    torch.manual_seed(0)
    model = ISD(create_backbone("resnet18", stem="imagenet"), recipe=recipe, bank_size=32, ema_momentum=0.99,
                temperature_student=0.1, temperature_teacher=0.05, proj_hidden_dim=64, proj_dim=16,
                bank_generator=torch.Generator().manual_seed(1))
    return model.train()


def test_isd_writes_the_bank_after_the_similarities_msf_before() -> None:
    x_t, x_o, y = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32), torch.arange(8) % 3
    isd = _isd("plus")
    before = isd.bank.rows.clone()
    out = isd.step(x_t, x_o, y)
    # the loss used the bank as it was BEFORE this batch ...
    expected = _slow_isd(out.q.double(), out.u.double(), before.double(), 0.1, 0.05)
    assert_close(out.loss.detach(), torch.tensor(expected, dtype=torch.float32), rtol=1e-4, atol=1e-6)
    assert torch.equal(isd.bank.rows, before) and isd.bank.ptr == 0
    out.loss.backward()  # the bank is not modified between forward and backward
    isd.on_step_end(None, epoch=1, step_in_epoch=1, steps_per_epoch=4)
    # ... and the teacher embeddings are written afterwards, at the pointer
    assert_close(isd.bank.rows[:8], out.u)
    assert isd.bank.ptr == 8 and torch.equal(isd.bank.labels[:8], y)
    # writing first would have changed the loss: the order is what distinguishes ISD from MSF
    after = _slow_isd(out.q.double(), out.u.double(), isd.bank.rows.double(), 0.1, 0.05)
    assert abs(after - expected) > 1e-3

    torch.manual_seed(0)
    msf = MSF(create_backbone("resnet18", stem="imagenet"), topk=1, bank_size=32, proj_hidden_dim=64, proj_dim=16)
    msf.train()
    out = msf.step(x_t, x_o, y)
    assert_close(msf.bank.rows[:8], out.u)  # MSF: written before the search ...
    assert torch.equal(out.slots[:, 0], torch.arange(8))  # ... so each target is its own neighbour


def test_isd_recipes_heads_and_monitors() -> None:
    r18 = _isd("r18")
    pred = r18.predictor
    assert isinstance(r18.online.projector, torch.nn.Identity) and r18.bank.dim == 512
    assert pred[0].bias is None and isinstance(pred[1], torch.nn.BatchNorm1d) and pred[3].out_features == 512
    assert r18.exported_projector() is None
    plus = _isd("plus")
    proj = plus.exported_projector()
    assert (proj.in_dim, proj.hidden_dim, proj.out_dim) == (512, 64, 16) and "0.weight" in proj.state_dict()
    out = plus.step(torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32), torch.arange(8))
    ratio = float(out.extras["teacher_entropy_ratio"])
    assert 0.0 < ratio <= 1.0 + 1e-6
    assert_close(out.extras["teacher_entropy"], torch.tensor(ratio * math.log(32)))
    # a caller that skips on_step_end still gets the write before the next similarities
    plus.step(torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32), torch.arange(8))
    assert plus.bank.ptr == 8
    assert_close(plus.bank.rows[:8], out.u)


def test_bank_search_at_262k_rows_is_exact_and_chunked() -> None:
    """The target-side search never builds B x K; it must equal the dense search at large K."""
    bank = MemoryBank(262_144, 128, generator=torch.Generator().manual_seed(0))
    q = _unit(4, 128, seed=5)
    dense_sims, dense_idx = (q @ bank.rows.T).topk(10, dim=1)
    for chunk in (65_536, 100_000):  # chunk boundaries aligned and ragged
        sims, idx = bank.topk_neighbours(q, 10, chunk_rows=chunk)
        assert torch.equal(idx, dense_idx)
        assert_close(sims, dense_sims)
    allowed = torch.arange(262_144) % 7 == 3
    dense = (q @ bank.rows.T).masked_fill(~allowed, float("-inf")).topk(10, dim=1)
    sims, idx = bank.topk_neighbours(q, 10, mask_fn=lambda s, e: allowed[s:e].expand(4, -1))
    assert torch.equal(idx, dense.indices) and bool((idx % 7 == 3).all())
