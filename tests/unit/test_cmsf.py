"""CMSF (ssl.md section 3): constrained neighbours and loss against slow, literal implementations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from workers.ssl_trainer.base import Pushed
from workers.ssl_trainer.cmsf import CMSF, constrained_loss
from workers.ssl_trainer.constraints import (
    CrossModalConstraint,
    KMeansConstraint,
    SupervisedConstraint,
    TwoQueueConstraint,
    run_kmeans,
)
from workers.ssl_trainer.msf import msf_loss, purity
from workers.ssl_trainer.pseudo_labels import SemiSupervisedConstraint, labelled_split, train_head
from workers.vision.backbones import create_backbone
from workers.vision.bank import MemoryBank

torch.set_num_threads(1)


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _slow_constrained(q: torch.Tensor, u: torch.Tensor, bank: torch.Tensor, allowed: list[list[bool]],
                      k: int) -> tuple[torch.Tensor, list[list[int]]]:
    """ssl.md 3.1 written out: N_i^C = the k smallest ||u_i - m_j||^2 over allowed j (fewer if C_i is small);
    L_C = 1/B sum_i 1/|N_i^C| sum_{j in N_i^C} (2 - 2 q_i . m_j)."""
    total = torch.zeros(())
    chosen = []
    for i in range(len(q)):
        dists = sorted((float(((u[i] - bank[j]) ** 2).sum()), j) for j in range(len(bank)) if allowed[i][j])
        n_i = [j for _, j in dists[:k]]
        inner = torch.zeros(())
        for j in n_i:
            inner = inner + (2 - 2 * torch.dot(q[i], bank[j]))
        total = total + inner / len(n_i)
        chosen.append(n_i)
    return total / len(q), chosen


def _pushed(bank: MemoryBank, u: torch.Tensor, labels: torch.Tensor | None = None,
            indices: torch.Tensor | None = None) -> Pushed:
    slots = bank.push(u, labels, indices)
    return Pushed(u, labels, indices, slots, slots)


def test_supervised_constraint_matches_the_literal_search_and_loss() -> None:
    bank = MemoryBank(48, 16, generator=torch.Generator().manual_seed(0))
    bank_labels = torch.arange(48) % 4  # 12 rows per class
    for s in range(3):
        bank.push(_unit(16, 16, seed=10 + s), bank_labels[16 * s:16 * (s + 1)])
    q, u, y = _unit(6, 16, seed=1), _unit(6, 16, seed=2), torch.tensor([0, 1, 2, 3, 0, 1])
    nb = SupervisedConstraint().neighbours(bank, u, None, y, 5)
    assert nb is not None and bool(nb.valid.all())
    allowed = [[bool(bank.labels[j] == y[i]) for j in range(48)] for i in range(6)]
    expected, chosen = _slow_constrained(q, u, bank.rows, allowed, 5)
    assert [set(r) for r in nb.slots.tolist()] == [set(r) for r in chosen]
    assert_close(constrained_loss(q, bank.gather(nb.slots), nb.valid), expected)
    # >= k same-class rows: purity exactly 1 (ssl.md 7.5 item 5)
    assert float(purity(y, bank.labels[nb.slots], nb.valid)) == 1.0
    # all neighbours valid -> exactly MSF's loss on the same neighbours
    assert_close(constrained_loss(q, bank.gather(nb.slots), nb.valid), msf_loss(q, bank.gather(nb.slots)))


def test_short_constraint_sets_are_flagged_and_never_use_disallowed_rows() -> None:
    torch.manual_seed(0)
    model = CMSF(create_backbone("resnet18", stem="imagenet"), constraint=SupervisedConstraint(), topk=5,
                 bank_size=32, proj_hidden_dim=64, proj_dim=16)
    model.train()
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 2])  # classes 1 and 2: one row each in the whole bank
    out = model.step(torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32), labels, torch.arange(8))
    assert_close(out.extras["constraint_short"], torch.tensor(0.25))
    assert float(out.purity) == 1.0  # only same-class rows were used, even for the short rows
    assert out.slots[6, 0] == 6 and out.slots[7, 0] == 7  # the short rows still have their own target
    allowed = [[bool(model.bank.labels[j] == labels[i]) for j in range(32)] for i in range(8)]
    expected, _ = _slow_constrained(out.q, out.u, model.bank.rows, allowed, 5)
    assert_close(out.loss.detach(), expected)  # supervised: L = L_C only
    out.loss.backward()
    assert all(p.grad is None for p in model.target.parameters())


def _slow_two_queue(pool: torch.Tensor, next_slot: torch.Tensor, bank: MemoryBank, u: torch.Tensor,
                    idx: torch.Tensor, k: int, k_prime: int) -> list[list[int]]:
    def older(n: int) -> torch.Tensor:
        return pool[int(next_slot[n]), n]

    out = []
    for i in range(len(u)):
        written = [j for j in range(bank.size) if bank.indices[j] >= 0]
        aux = sorted((float(((older(int(idx[i])) - older(int(bank.indices[j]))) ** 2).sum()), j) for j in written)
        c_i = [j for _, j in aux[:k_prime]]
        cur = sorted((float(((u[i] - bank.rows[j]) ** 2).sum()), j) for j in c_i)
        out.append([j for _, j in cur[:k]])
    return out


@pytest.mark.parametrize(("k", "k_prime"), [(5, 5), (3, 7)])
def test_two_queue_constraint_is_the_previous_view_neighbourhood(k: int, k_prime: int) -> None:
    n, d = 40, 12
    bank = MemoryBank(32, d, track_indices=True, generator=torch.Generator().manual_seed(0))
    c = TwoQueueConstraint(n, d, topk_constraint=k_prime, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    for epoch in range(2):  # two "epochs": every image gets a current and an older embedding
        perm = torch.randperm(n, generator=g)[:32]
        for s in range(4):
            ids = perm[8 * s:8 * (s + 1)]
            c.after_push(bank, _pushed(bank, _unit(8, d, seed=100 * epoch + s), indices=ids), None)
    latest = c.pool[1 - c.next_slot[perm[:8]], perm[:8]].clone()
    u = _unit(8, d, seed=7)
    c.after_push(bank, _pushed(bank, u, indices=perm[:8]), None)
    assert torch.equal(c.older(perm[:8]), latest)  # after the write, the previous embedding is the "older" one
    assert torch.equal(c.pool[1 - c.next_slot[perm[:8]], perm[:8]], u)
    nb = c.neighbours(bank, u, perm[:8], None, k)
    assert nb is not None and bool(nb.valid.all()) and nb.slots.shape == (8, k)
    expected = _slow_two_queue(c.pool, c.next_slot, bank, u, perm[:8], k, k_prime)
    assert [set(r) for r in nb.slots.tolist()] == [set(r) for r in expected]
    if k == k_prime:  # N_i^C is the whole constraint set (the released k = k' = 5 setting)
        assert all(len(set(r)) == k_prime for r in nb.slots.tolist())
    assert all(int(nb.slots[i, 0]) == int(bank.ptr - 8 + i) % 32 for i in range(8))  # own row first


def test_cross_modal_constraint_matches_the_literal_neighbourhood() -> None:
    n, d = 30, 8
    emb = _unit(n, 5, seed=3)
    bank = MemoryBank(24, d, track_indices=True, generator=torch.Generator().manual_seed(0))
    c = CrossModalConstraint(emb, topk_constraint=6)
    for s in range(3):
        bank.push(_unit(8, d, seed=20 + s), indices=torch.arange(8 * s, 8 * (s + 1)))
    u, ids = _unit(4, d, seed=9), torch.tensor([1, 9, 17, 25])  # 25 is not in the bank: fine, only a query
    nb = c.neighbours(bank, u, ids, None, 3)
    assert nb is not None
    for i in range(4):
        aux = sorted((float(((emb[ids[i]] - emb[bank.indices[j]]) ** 2).sum()), j) for j in range(24))
        c_i = [j for _, j in aux[:6]]
        cur = sorted((float(((u[i] - bank.rows[j]) ** 2).sum()), j) for j in c_i)
        assert set(nb.slots[i].tolist()) == {j for _, j in cur[:3]}


def test_kmeans_epoch_one_is_msf_then_clusters_constrain() -> None:
    torch.manual_seed(0)
    constraint = KMeansConstraint(16, 16, clusters=3, iters=5, seed=0)
    model = CMSF(create_backbone("resnet18", stem="imagenet"), constraint=constraint, topk=3, bank_size=16,
                 proj_hidden_dim=64, proj_dim=16)
    model.train()
    x_t, x_o, y, idx = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32), torch.arange(8) % 2, torch.arange(8)
    out = model.step(x_t, x_o, y, idx)
    assert_close(out.loss.detach(), msf_loss(out.q, model.bank.gather(out.slots)))  # (L_MSF + L_MSF) / 2
    assert torch.equal(constraint.pool[:8], out.u)  # the pool caches the latest target embedding
    constraint.clusters.copy_(torch.arange(16) % 2)
    constraint.ready = True
    out = model.step(x_t, x_o, y, idx + 8)
    allowed = [[bool(model.bank.indices[j] >= 0 and constraint.clusters[model.bank.indices[j]] ==
                     constraint.clusters[8 + i]) for j in range(16)] for i in range(8)]
    l_c, _ = _slow_constrained(out.q, out.u, model.bank.rows, allowed, 3)
    l_msf, _ = _slow_constrained(out.q, out.u, model.bank.rows, [[True] * 16] * 8, 3)
    assert_close(out.loss.detach(), 0.5 * (l_c + l_msf))
    assert_close(out.extras["loss_constrained"], l_c)
    # the extra state travels with the checkpoint
    clone = KMeansConstraint(16, 16, clusters=3, iters=5, seed=0)
    clone.load_state_dict(constraint.state_dict())
    assert clone.ready and torch.equal(clone.clusters, constraint.clusters)


def test_run_kmeans_separates_blobs() -> None:
    centres = _unit(3, 8, seed=4) * 5
    x = torch.cat([centres[i] + 0.01 * torch.randn(20, 8, generator=torch.Generator().manual_seed(i))
                   for i in range(3)])
    ids, objective = run_kmeans(x, 3, iters=10, seed=0)
    assert objective >= 0 and len(set(ids.tolist())) == 3
    assert all(len(set(ids[20 * i:20 * (i + 1)].tolist())) == 1 for i in range(3))


def test_labelled_split_is_stratified_and_deterministic() -> None:
    labels = torch.arange(200) % 10
    a, b = labelled_split(labels, 0.1, seed=3), labelled_split(labels, 0.1, seed=3)
    assert torch.equal(a, b) and int(a.sum()) == 20
    assert all(int(a[labels == c].sum()) == 2 for c in range(10))
    assert not torch.equal(a, labelled_split(labels, 0.1, seed=4))
    assert all(int(labelled_split(labels, 0.01, seed=0)[labels == c].sum()) == 1 for c in range(10))


def test_semi_supervised_keys_fallback_and_head_training() -> None:
    labels = torch.arange(40) % 4
    c = SemiSupervisedConstraint(labels, bank_size=16, dim=4, num_classes=4, label_fraction=0.25,
                                 confidence_threshold=0.9, head="linear", head_epochs=30, seed=0)
    with torch.no_grad():  # a head that is confident on the first axis only
        c.head.weight.copy_(torch.eye(4) * 20)
        c.head.bias.zero_()
    u = torch.stack([torch.tensor([1.0, 0, 0, 0]), torch.tensor([0.5, 0.5, 0.5, 0.5])] * 4)
    idx = torch.arange(8)
    keys = c.query_keys(u, labels[idx], idx)
    labelled = c.labelled[idx]
    for i in range(8):
        if labelled[i]:
            assert keys[i] == labels[i]  # ground truth for the labelled split
        else:
            assert keys[i] == (0 if i % 2 == 0 else -1)  # confident -> pseudo-label, else no constraint
    bank = MemoryBank(16, 4, generator=torch.Generator().manual_seed(0))
    pushed = _pushed(bank, u, labels[idx], idx)
    c.after_push(bank, pushed, keys)
    assert torch.equal(c.slot_keys[:8], keys)
    nb = c.neighbours(bank, u, idx, keys, 3)
    assert nb is not None
    free_sims, free = bank.topk_neighbours(u, 3)
    for i in range(8):
        if keys[i] < 0:  # unconfident rows fall back to plain MSF neighbours
            assert set(nb.slots[i].tolist()) == set(free[i].tolist())
        else:
            assert all(c.slot_keys[j] == keys[i] for j, ok in zip(nb.slots[i], nb.valid[i], strict=True) if ok)
    # the head re-trains on cached labelled target embeddings (oracle labels are never cached)
    assert int(c.cache_seen.sum()) == int(labelled.sum())
    feats = F.normalize(torch.eye(4).repeat(10, 1) + 0.05 * torch.randn(40, 4), dim=1)
    head = torch.nn.Linear(4, 4)
    assert train_head(head, feats, torch.arange(40) % 4, epochs=60, seed=0) == 1.0
    assert not any(p.requires_grad for p in head.parameters()) and not head.training
