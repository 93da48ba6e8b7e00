"""MSF loss, memory bank, EMA and backbone loading against literal reference implementations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from workers.ssl_trainer.msf import MSF, msf_loss, purity, spread
from workers.vision.backbones import backbone_state_dict, create_backbone, load_backbone
from workers.vision.bank import MemoryBank
from workers.vision.ema import ema_update, make_target
from workers.vision.heads import MLPHead

torch.set_num_threads(1)


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def _slow_msf_loss(q: torch.Tensor, bank: torch.Tensor, neighbours: list[list[int]]) -> torch.Tensor:
    """The formula written out literally: L = 1/B sum_i 1/k sum_{j in N_i} (2 - 2 q_i . m_j)."""
    total = torch.zeros(())
    for i, n_i in enumerate(neighbours):
        inner = torch.zeros(())
        for j in n_i:
            inner = inner + (2 - 2 * torch.dot(q[i], bank[j]))
        total = total + inner / len(n_i)
    return total / len(neighbours)


def test_msf_loss_matches_the_literal_formula() -> None:
    q, bank = _unit(6, 16, seed=1), _unit(40, 16, seed=2)
    g = torch.Generator().manual_seed(3)
    idx = torch.stack([torch.randperm(40, generator=g)[:5] for _ in range(6)])
    expected = _slow_msf_loss(q, bank, idx.tolist())
    assert_close(msf_loss(q, bank[idx]), expected)
    # ... which is also the mean squared distance to the neighbours.
    assert_close(msf_loss(q, bank[idx]), ((q[:, None, :] - bank[idx]) ** 2).sum(-1).mean())


def test_k1_is_byol_normalised_mse() -> None:
    q, u = _unit(8, 32, seed=4), _unit(8, 32, seed=5)
    bank = MemoryBank(64, 32)
    slots = bank.push(u)
    _, nn_slots = bank.topk_neighbours(u, 1)
    byol = (F.normalize(q, dim=1) - F.normalize(u, dim=1)).pow(2).sum(1).mean()
    assert_close(msf_loss(q, bank.gather(nn_slots)), byol)
    assert_close(msf_loss(q, u), byol)  # [B, d] neighbours read as k = 1
    assert torch.equal(nn_slots[:, 0], slots)


def test_write_before_search_finds_itself_even_when_wrapping() -> None:
    bank = MemoryBank(48, 8, generator=torch.Generator().manual_seed(0))
    for step in range(5):  # 5 pushes of 16 wrap around the 48-row bank
        u = _unit(16, 8, seed=10 + step)
        slots = bank.push(u)
        sims, nn = bank.topk_neighbours(u, 3)
        assert torch.equal(nn[:, 0], slots)
        assert_close(sims[:, 0], torch.ones(16))


def test_pointer_advances_by_batch_and_wraps() -> None:
    bank = MemoryBank(12, 4)
    assert bank.ptr == 0
    bank.push(_unit(4, 4), torch.arange(4))
    assert bank.ptr == 4 and bank.labels[:4].tolist() == [0, 1, 2, 3] and not bank.is_full
    bank.push(_unit(4, 4))
    bank.push(_unit(4, 4))
    assert bank.ptr == 0 and bank.is_full and bank.labels[4:].tolist() == [-1] * 8
    assert_close(bank.rows.norm(dim=1), torch.ones(12))
    with pytest.raises(ValueError, match="multiple of the batch size"):
        bank.push(_unit(5, 4))
    # The pointer travels with the state dict (exact resume).
    clone = MemoryBank(12, 4)
    bank.push(_unit(4, 4))
    clone.load_state_dict(bank.state_dict())
    assert clone.ptr == 4 and clone.num_pushed == 16 and torch.equal(clone.rows, bank.rows)


def test_chunked_and_masked_search_match_dense() -> None:
    bank = MemoryBank(1000, 16, generator=torch.Generator().manual_seed(1))
    q = _unit(7, 16, seed=3)
    dense_sims, dense_idx = (q @ bank.rows.T).topk(5, dim=1)
    sims, idx = bank.topk_neighbours(q, 5, chunk_rows=64)
    assert torch.equal(idx, dense_idx) and torch.allclose(sims, dense_sims)
    allowed = torch.arange(1000) % 3 == 0  # e.g. a CMSF constraint
    _, idx = bank.topk_neighbours(q, 5, chunk_rows=100, mask_fn=lambda s, e: allowed[s:e].expand(7, -1))
    assert bool((idx % 3 == 0).all())


def test_gather_gradient_equals_dense_bxk_formulation() -> None:
    bank = MemoryBank(256, 16, generator=torch.Generator().manual_seed(2))
    u = _unit(8, 16, seed=6)
    bank.push(u)
    _, idx = bank.topk_neighbours(u, 5)
    raw = torch.randn(8, 16, generator=torch.Generator().manual_seed(7))
    q1 = raw.clone().requires_grad_(True)
    msf_loss(F.normalize(q1, dim=1), bank.gather(idx)).backward()
    # Dense: full B x K distance matrix, averaged over a one-hot neighbour mask.
    q2 = raw.clone().requires_grad_(True)
    dist = 2 - 2 * F.normalize(q2, dim=1) @ bank.rows.T
    mask = torch.zeros_like(dist).scatter_(1, idx, 1.0)
    ((dist * mask).sum(1) / 5).mean().backward()
    assert_close(q1.grad, q2.grad)


def test_purity_skips_unknown_labels() -> None:
    labels = torch.tensor([0, 1, -1])
    neighbour_labels = torch.tensor([[0, 0, 1], [1, 1, 1], [2, 2, 2]])
    assert_close(purity(labels, neighbour_labels), torch.tensor(5 / 6))
    assert float(purity(torch.tensor([-1]), torch.tensor([[-1]]))) == 0.0


def test_spread_detects_collapse() -> None:
    assert 0.9 < float(spread(torch.randn(512, 64))) < 1.1
    assert float(spread(torch.ones(512, 64))) < 1e-3


def test_ema_extremes_and_buffers() -> None:
    online = MLPHead(8, 16, 4)
    target = make_target(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
        online[1].running_mean.fill_(3.0)
    before = [p.clone() for p in target.parameters()]
    ema_update(target, online, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, target.parameters(), strict=True))
    ema_update(target, online, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(online.parameters(), target.parameters(), strict=True))
    assert float(target[1].running_mean.abs().max()) == 0.0  # buffers are not averaged
    ema_update(target, make_target(online), 0.5)
    assert all(not p.requires_grad for p in target.parameters())


def test_msf_step_gradients_reach_only_the_online_side() -> None:
    torch.manual_seed(0)
    model = MSF(create_backbone("resnet18", stem="imagenet"), topk=3, bank_size=32, ema_momentum=0.99,
                proj_hidden_dim=64, proj_dim=16)
    model.train()
    x_t, x_o = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    out = model.step(x_t, x_o, torch.arange(8) % 2)
    out.loss.backward()
    assert model.target.training and 0.0 <= float(out.purity) <= 1.0
    assert all(p.grad is None for p in model.target.parameters())
    assert not model.bank.rows.requires_grad and model.bank.rows.grad is None
    assert all(p.grad is not None for p in model.predictor.parameters())
    assert model.online.backbone.conv1.weight.grad is not None
    assert torch.equal(out.slots[:, 0], torch.arange(8))  # first push: slots 0..7, each finds itself
    assert 0.0 <= float(out.loss.detach()) <= 4.0


def test_backbone_loader_requires_every_tensor() -> None:
    src, dst = create_backbone("resnet18", stem="cifar"), create_backbone("resnet18", stem="cifar")
    assert src.out_dim == 512 and dst.conv1.kernel_size == (3, 3)
    state = backbone_state_dict(src)
    n = load_backbone(dst, {f"module.encoder_q.{k}": v for k, v in state.items()})  # wrapper prefixes
    assert n == len(dst.state_dict())
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in state.items())
    msf_like = {f"online.backbone.{k}": v for k, v in state.items()} | {"predictor.0.weight": torch.zeros(1)}
    assert load_backbone(dst, msf_like, prefix="online.backbone.") == n
    with pytest.raises(ValueError, match="missing"):
        load_backbone(dst, {k: v for k, v in state.items() if k != "layer4.1.bn2.running_var"})
    with pytest.raises(ValueError, match="missing"):  # the reference bug: prefix not stripped
        load_backbone(dst, {f"something.{k}": v for k, v in state.items()})
    with pytest.raises(ValueError, match="wrong shape"):
        load_backbone(dst, backbone_state_dict(create_backbone("resnet18", stem="imagenet")))


def test_backbones_work_on_small_inputs() -> None:
    for name, dim in (("resnet18", 512), ("resnet50", 2048)):
        net = create_backbone(name, stem="imagenet").eval()
        assert net.out_dim == dim
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, dim)
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("vgg16")
