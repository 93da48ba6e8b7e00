"""workers.vision: augmentations, loaders, LR schedules, k-NN evaluation and device helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torch.testing import assert_close

from workers.common import device as dev
from workers.common.schedule import lr_at_epoch
from workers.vision.augment import (
    ViewTransform,
    _adjust_hue,
    build_view_transforms,
    color_jitter,
    crop_boxes,
    resized_crop_flip,
)
from workers.vision.data import TwoViewDataset, train_loader
from workers.vision.knn import knn_accuracy, majority_vote

torch.set_num_threads(1)
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _images(n: int = 16, size: int = 16) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def test_hue_matches_torchvision() -> None:
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for shift in (-0.1, 0.04, 0.3):
        assert_close(_adjust_hue(x, torch.full((4,), shift)), TF.adjust_hue(x, shift), atol=1e-5, rtol=0)


def test_crop_matches_torchvision_resized_crop_inside_the_border() -> None:
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    boxes = crop_boxes(6, 16, 16, (0.2, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(2))
    flip = torch.tensor([False, True] * 3)
    out = resized_crop_flip(x, boxes, flip, 16)
    for i in range(6):
        top, left, h, w = (int(v) for v in boxes[i])
        assert 0 <= top <= 16 - h and 0 <= left <= 16 - w and h * w >= 0.2 * 256 * 0.9
        ref = TF.resized_crop(x[i], top, left, h, w, [16, 16], antialias=False)
        ref = ref.flip(-1) if flip[i] else ref
        assert_close(out[i, :, 1:-1, 1:-1], ref[:, 1:-1, 1:-1], atol=1e-5, rtol=0)


def test_views_are_per_sample_and_reproducible() -> None:
    x = torch.from_numpy(_images(8)).permute(0, 3, 1, 2)
    strong = ViewTransform(16, MEAN, STD, strong=True)
    a = strong(x, torch.Generator().manual_seed(0))
    b = strong(x, torch.Generator().manual_seed(0))
    assert a.shape == (8, 3, 16, 16) and a.dtype == torch.float32 and torch.equal(a, b)
    same = x[:1].expand(8, -1, -1, -1)
    views = strong(same, torch.Generator().manual_seed(1))
    assert len({round(float(v.sum()), 3) for v in views}) == 8  # different params per image
    weak = ViewTransform(16, MEAN, STD, strong=False)
    full = weak.__class__(16, MEAN, STD, strong=False, scale=(1.0, 1.0))
    y = full(x, torch.Generator().manual_seed(0))  # full crop: only flips; colours untouched
    ref = (x.float() / 255 - 0.5) / 0.25
    assert all(torch.allclose(y[i], ref[i], atol=1e-4) or torch.allclose(y[i], ref[i].flip(-1), atol=1e-4)
               for i in range(8))
    assert not ViewTransform(32, MEAN, STD, strong=True).blur and ViewTransform(96, MEAN, STD, strong=True).blur
    blurred = ViewTransform(96, MEAN, STD, strong=True)(torch.zeros(2, 3, 96, 96, dtype=torch.uint8))
    assert blurred.shape == (2, 3, 96, 96) and torch.isfinite(blurred).all()
    with pytest.raises(ValueError, match="target/online"):
        build_view_transforms("weak-strong", 16, MEAN, STD)


def test_strong_views_colour_jitter_is_configurable() -> None:
    weak, strong = build_view_transforms("weak/strong", 16, MEAN, STD)
    assert strong.jitter == (0.4, 0.4, 0.4, 0.1) and not weak.strong  # MoCo-v2 by default
    t_target, t_online = build_view_transforms("strong/strong", 16, MEAN, STD, color_jitter=[0, 0, 0, 0.5])
    assert t_target.jitter == t_online.jitter == (0, 0, 0, 0.5)
    # hue 0.5 rotates a pure red image to any hue: all three channels end up dominant somewhere.
    red = torch.zeros(256, 3, 4, 4)
    red[:, 0] = 1.0
    out = color_jitter(red, (0, 0, 0, 0.5), 1.0, torch.Generator().manual_seed(0))
    assert set(out.mean(dim=(2, 3)).argmax(dim=1).tolist()) == {0, 1, 2}
    out = color_jitter(red, (0, 0, 0, 0.1), 1.0, torch.Generator().manual_seed(0))
    assert set(out.mean(dim=(2, 3)).argmax(dim=1).tolist()) == {0}  # +-36 degrees stays red-dominant


def test_two_view_loader_contract_and_determinism() -> None:
    t_target, t_online = build_view_transforms("weak/strong", 16, MEAN, STD)
    ds = TwoViewDataset(_images(20), np.arange(20) % 4, t_target, t_online, seed=3)
    idx, (vt, vo), y = ds[5]
    assert idx == 5 and vt.shape == vo.shape == (3, 16, 16) and y == 1
    batches = list(train_loader(ds, 8, seed=0, epoch=1))
    assert len(batches) == 2  # drop_last
    idx, (vt, vo), y = batches[0]
    assert vt.shape == (8, 3, 16, 16) and torch.equal(y, idx % 4)
    again = list(train_loader(ds, 8, seed=0, epoch=1))
    assert torch.equal(again[0][0], idx) and torch.equal(again[0][1][1], vo)
    other = list(train_loader(ds, 8, seed=0, epoch=2))
    assert not torch.equal(other[0][0], idx)


def test_lr_schedules() -> None:
    assert lr_at_epoch(1, base_lr=0.05, epochs=10) == pytest.approx(0.05)
    assert lr_at_epoch(6, base_lr=0.05, epochs=10) == pytest.approx(0.025)
    assert 0 < lr_at_epoch(10, base_lr=0.05, epochs=10) < 0.002
    step = {"base_lr": 0.01, "epochs": 200, "schedule": "step", "milestones": [140, 180], "decay": 0.2}
    assert lr_at_epoch(140, **step) == pytest.approx(0.01)
    assert lr_at_epoch(141, **step) == pytest.approx(0.002)
    assert lr_at_epoch(181, **step) == pytest.approx(0.0004)
    with pytest.raises(ValueError):
        lr_at_epoch(0, base_lr=0.1, epochs=3)


def test_majority_vote_breaks_ties_randomly_but_reproducibly() -> None:
    tied = np.array([[0, 1]] * 200)
    a = majority_vote(tied, 3, np.random.default_rng(0))
    b = majority_vote(tied, 3, np.random.default_rng(0))
    assert np.array_equal(a, b) and set(a.tolist()) == {0, 1}
    assert majority_vote(np.array([[2, 2, 1]]), 3, np.random.default_rng(0)).tolist() == [2]


def test_knn_accuracy_on_separable_features() -> None:
    rng = np.random.default_rng(0)
    centres = np.eye(4, 16, dtype=np.float32)
    ytr, yte = np.repeat(np.arange(4), 60), np.repeat(np.arange(4), 10)
    ftr = centres[ytr] + 0.05 * rng.standard_normal((240, 16)).astype(np.float32)
    fte = centres[yte] + 0.05 * rng.standard_normal((40, 16)).astype(np.float32)
    ftr /= np.linalg.norm(ftr, axis=1, keepdims=True)
    fte /= np.linalg.norm(fte, axis=1, keepdims=True)
    res = knn_accuracy(ftr, ytr, fte, yte, ks=[1, 20], num_classes=4)
    assert res == {"knn_top1_k1": 1.0, "knn_top1_k20": 1.0, "knn_weighted_top1_k200": 1.0}
    shuffled = knn_accuracy(ftr, rng.permutation(ytr), fte, yte, ks=[1], num_classes=4)
    assert shuffled["knn_top1_k1"] < 0.6


def test_device_helpers_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert dev.amp_dtype(cpu, True) is None
    assert dev.memory_format(cpu, True) == torch.contiguous_format
    with dev.autocast(cpu, None):
        assert not torch.is_autocast_enabled("cpu")
    n = torch.get_num_threads()
    monkeypatch.setenv(dev.THREADS_ENV, "1")
    assert dev.configure_threads() == 1
    monkeypatch.setenv(dev.THREADS_ENV, "lots")
    with pytest.raises(ValueError, match="integer"):
        dev.configure_threads()
    torch.set_num_threads(n)
