"""MoCo v2 InfoNCE, SimCLR NT-Xent and i-CutMix against literal slow formulas; a 1-epoch run of each method."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch.testing import assert_close

from shared.data import load_dataset
from shared.specs import SslTrainSpec
from workers.runtime.local import LocalContext
from workers.ssl_trainer.icutmix import cutmix_box, icutmix, sample_lambda
from workers.ssl_trainer.moco import info_nce, mixed_info_nce
from workers.ssl_trainer.simclr import nt_xent
from workers.ssl_trainer.train import train

torch.set_num_threads(1)


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _slow_info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float) -> torch.Tensor:
    """-(1/B) sum_i log(exp(q_i.k_i/t) / (exp(q_i.k_i/t) + sum_j exp(q_i.queue_j/t)))."""
    total = 0.0
    for i in range(len(q)):
        pos = math.exp(float(q[i] @ k[i]) / tau)
        neg = sum(math.exp(float(q[i] @ row) / tau) for row in queue)
        total += -math.log(pos / (pos + neg))
    return torch.tensor(total / len(q))


def _slow_nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    z = torch.cat([z1, z2])
    n, b = len(z), len(z1)
    total = 0.0
    for i in range(n):
        p = (i + b) % n
        den = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(n) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[p]) / tau) / den)
    return torch.tensor(total / n)


def test_info_nce_matches_the_literal_formula() -> None:
    q, k, queue = _unit(5, 8, seed=1), _unit(5, 8, seed=2), _unit(12, 8, seed=3)
    assert_close(info_nce(q, k, queue, tau=0.2), _slow_info_nce(q, k, queue, 0.2), rtol=1e-5, atol=1e-5)
    # a perfect positive far from the negatives gives a smaller loss than a random one
    assert info_nce(k, k, queue, tau=0.2) < info_nce(q, k, queue, tau=0.2)


def test_nt_xent_matches_the_literal_formula() -> None:
    z1, z2 = _unit(4, 6, seed=4), _unit(4, 6, seed=5)
    assert_close(nt_xent(z1, z2, tau=0.5), _slow_nt_xent(z1, z2, 0.5), rtol=1e-5, atol=1e-5)
    assert_close(nt_xent(z1, z2, tau=0.2), _slow_nt_xent(z1, z2, 0.2), rtol=1e-5, atol=1e-5)


def test_mixed_info_nce_is_the_lambda_weighted_pair_of_cross_entropies() -> None:
    q, keys, queue = _unit(4, 8, seed=6), _unit(4, 8, seed=7), _unit(8, 8, seed=8)
    perm, lam, tau = torch.tensor([2, 0, 3, 1]), 0.7, 0.2
    cand = torch.cat([keys, queue])
    total = 0.0
    for i in range(4):
        den = sum(math.exp(float(q[i] @ c) / tau) for c in cand)
        total += -lam * math.log(math.exp(float(q[i] @ keys[i]) / tau) / den)
        total += -(1 - lam) * math.log(math.exp(float(q[i] @ keys[int(perm[i])]) / tau) / den)
    assert_close(mixed_info_nce(q, keys, queue, perm, lam, tau=tau), torch.tensor(total / 4), rtol=1e-5, atol=1e-5)
    # lam = 1 with the identity permutation: in-batch keys become extra negatives, the positive is the own key
    assert_close(mixed_info_nce(q, keys, queue, torch.arange(4), 1.0, tau=tau),
                 F.cross_entropy(q @ cand.T / tau, torch.arange(4)))


def test_icutmix_lambda_is_folded_and_the_box_matches_it() -> None:
    g = torch.Generator().manual_seed(0)
    lams = [sample_lambda(g) for _ in range(500)]
    assert min(lams) >= 0.5 and max(lams) <= 1.0
    assert abs(sum(lams) / len(lams) - 0.75) < 0.03  # folded uniform: mean 3/4
    assert min(sample_lambda(g, alpha=0.5) for _ in range(100)) >= 0.5
    box = cutmix_box(32, 32, 0.75, torch.Generator().manual_seed(1))
    assert 0 <= box.y0 <= box.y1 <= 32 and 0 <= box.x0 <= box.x1 <= 32
    assert box.y1 - box.y0 <= 16 and box.x1 - box.x0 <= 16  # side sqrt(1 - 0.75) = 1/2, clipped at borders

    x = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 3, 16, 16).contiguous()
    for seed in range(20):
        mixed, perm, lam = icutmix(x, torch.Generator().manual_seed(seed))
        for i in range(6):
            own = (mixed[i, 0] == i).float().mean().item()
            if int(perm[i]) != i:
                assert own == pytest.approx(lam, abs=1e-6)  # the share left of image i IS the recomputed lam
                assert set(mixed[i, 0].unique().tolist()) <= {float(i), float(perm[i])}
        assert lam >= 0.5 - 1e-9 and sorted(perm.tolist()) == list(range(6))
    assert torch.equal(x[:, :, 0, 0], x[:, :, 5, 5])  # the input is not modified


def test_spec_rules_for_the_new_methods() -> None:
    base: dict[str, Any] = {"kind": "ssl-train", "batch_size": 32}
    SslTrainSpec.model_validate(base | {"method": "simclr", "bank_size": 100})  # no bank: any size
    with pytest.raises(ValidationError, match="icutmix is implemented for method 'moco'"):
        SslTrainSpec.model_validate(base | {"method": "byol", "icutmix": True, "bank_size": 64})
    spec = SslTrainSpec.model_validate(base | {"method": "simclr", "bank_size": 10**6})
    assert not [p for p in spec.dataset_problems(500) if p[0] == "bank_size"]


@pytest.mark.parametrize("extra", [{"method": "moco"}, {"method": "moco", "icutmix": True}, {"method": "simclr"}])
def test_one_epoch_of_each_new_method(extra: dict[str, Any]) -> None:
    data = load_dataset({"uri": "builtin://shapes"}, image_size=16, limit_train=64, limit_test=32)
    spec = SslTrainSpec.model_validate({
        "kind": "ssl-train", "dataset": "builtin://shapes", "limit_train": 64, "limit_test": 32, "image_size": 16,
        "backbone": "resnet18", "stem": "cifar", "batch_size": 16, "bank_size": 32, "epochs": 1, "knn_k": [1],
        "proj_hidden_dim": 64, "proj_dim": 16} | extra)
    ctx = LocalContext(spec)
    result = train(spec, data, ctx=ctx, device=torch.device("cpu"))
    assert math.isfinite(result["final_loss"]) and result["final_loss"] > 0
    if extra["method"] == "moco":  # the queue was written: 4 steps of 16 keys wrap the 32-row bank
        assert any(m.get("epoch_bank_full") == 1.0 or m.get("bank_full") == 1.0 for _, m in ctx.metrics)
