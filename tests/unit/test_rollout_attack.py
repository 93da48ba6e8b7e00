"""Attention-gradient rollout (shapes, row normalisation, literal product), window search and blocking, and the
attack metrics on hand-built predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from workers.evaluator.attack import attack_metrics, heatmap_grid
from workers.evaluator.linear import LinearProbe
from workers.poison_scanner.rollout import (
    block,
    boxes_overlap,
    cls_map,
    grad_rollout_maps,
    random_windows,
    rollout_from,
    top_window,
)
from workers.vision.backbones import create_backbone

torch.set_num_threads(1)


def _stochastic(b: int, t: int, seed: int) -> torch.Tensor:
    return torch.rand(b, t, t, generator=torch.Generator().manual_seed(seed)).softmax(dim=-1)


def test_rollout_is_the_literal_product_of_row_normalised_layers() -> None:
    layers = [_stochastic(2, 5, s) for s in range(3)]
    expected = []
    for i in range(2):
        r = torch.eye(5)
        for a in layers:
            m = (a[i] + torch.eye(5)) / 2
            m = torch.stack([row / row.sum() for row in m])  # each row by its own sum
            r = m @ r
        expected.append(r)
    out = rollout_from(layers, discard_ratio=0.0)
    assert_close(out, torch.stack(expected))
    assert_close(out.sum(dim=-1), torch.ones(2, 5))  # a product of row-stochastic matrices is row-stochastic


def test_discard_zeroes_the_lowest_entries_before_the_identity() -> None:
    a = torch.arange(16, dtype=torch.float32).view(1, 4, 4)
    out = rollout_from([a], discard_ratio=0.5)
    kept = (a * (a >= 8)).view(4, 4) + torch.eye(4)
    assert_close(out[0], (kept / 2) / (kept / 2).sum(dim=-1, keepdim=True))


def and_close_to_one(t: torch.Tensor) -> bool:
    return bool(torch.allclose(t, torch.ones_like(t)))


def test_grad_rollout_maps_on_the_micro_vit() -> None:
    torch.manual_seed(0)
    vit = create_backbone("vit_micro_p4").eval()
    head = LinearProbe(torch.zeros(64), torch.ones(64), 3)
    x = torch.randn(3, 3, 16, 16)
    maps, logits = grad_rollout_maps(vit, head, x)
    assert maps.shape == (3, 16, 16) and logits.shape == (3, 3)
    assert (maps >= 0).all()
    peaks = maps.flatten(1).amax(dim=1)
    assert (peaks <= 1 + 1e-6).all() and (peaks > 0.5).all()  # max-normalised on the grid, then bilinear
    grid = cls_map(rollout_from([_stochastic(3, 17, 1)], discard_ratio=0.0), (4, 4), (4, 4))
    assert grid.shape == (3, 4, 4) and and_close_to_one(grid.flatten(1).amax(dim=1))
    assert not any(p.grad is not None for p in vit.parameters())  # weights untouched


def test_top_window_block_and_overlap() -> None:
    maps = torch.zeros(2, 12, 12)
    maps[0, 2:5, 5:8] = 1.0  # hot 3x3 block at x=5, y=2
    maps[1, 9:12, 0:3] = 1.0  # in the bottom-left corner
    corners = top_window(maps, 3)
    assert corners.tolist() == [[5, 2], [0, 9]]
    assert top_window(maps, 5).tolist()[1] == [0, 7]  # the window stays inside the image
    x = torch.ones(2, 3, 12, 12)
    out = block(x, corners, 3, fill="black", mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    assert (out[0, :, 2:5, 5:8] == -2.0).all() and (out[0, :, :2] == 1).all() and int((out != 1).sum()) == 2 * 27
    x[1, 0] = 3.0
    mean_fill = block(x, corners, 3, fill="mean", mean=[0, 0, 0], std=[1, 1, 1])
    assert_close(mean_fill[1, 0, 9:12, 0:3], torch.full((3, 3), 3.0))
    hits = boxes_overlap(corners, 3, torch.tensor([[6, 3, 2, 2], [3, 9, 2, 2]]))
    assert hits.tolist() == [True, False]  # touching edges (x 0..2 vs 3..4) is no overlap
    rand = random_windows(200, 12, 12, 3, torch.Generator().manual_seed(0))
    assert rand.min() >= 0 and rand.max() <= 9
    img = np.zeros((12, 12, 3), np.uint8)
    grid = heatmap_grid([(img, maps[0].numpy(), [5, 2], [6, 3, 2, 2])], 3, scale=2)
    assert grid.size == (48, 24)


def test_attack_metrics_on_hand_built_predictions() -> None:
    # target 0; clean test: 2 target + 4 non-target images, one non-target predicted 0 (a clean FP)
    y_clean = np.array([0, 0, 1, 1, 2, 2])
    p_clean = np.array([0, 1, 1, 0, 2, 2])
    # patched (non-target only): 3 of 4 flipped to the target
    y_p = np.array([1, 1, 2, 2])
    p_p = np.array([0, 0, 0, 2])
    m = attack_metrics(p_clean, y_clean, p_p, y_p, target=0, num_classes=3)
    assert m["attack_clean_acc"] == pytest.approx(4 / 6) and m["attack_patched_acc"] == pytest.approx(1 / 4)
    assert m["attack_fp_clean"] == 1 and m["attack_fp_patched"] == 3
    assert m["attack_asr"] == pytest.approx(3 / 4) and m["attack_asr_clean"] == pytest.approx(1 / 4)
    assert m["attack_nfp_patched"] == 1.0  # the target is the most false-positive class
