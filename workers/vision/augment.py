"""Weak / strong views (MoCo-v2 recipe, ssl.md sections 1.6 and 7.2) as batched tensor ops.

torchvision's transforms draw ONE set of random parameters per call, so applying them to a batch would
give every image the same crop and the same jitter. Here every op draws per-sample parameters and
runs on the whole ``B x 3 x H x W`` batch at once (on CPU in the data loader, or on any device),
which on 32-px images is ~10x cheaper than a per-image transform pipeline. The maths follows the
torchvision definitions:

* RandomResizedCrop(size, scale=(0.2, 1), ratio=(3/4, 4/3)) - torchvision's 10-attempt sampler with
  its centre-crop fallback, integer boxes; crop + resize + horizontal flip in one ``grid_sample``.
* ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8, the four ops in a random order *per sample*; brightness
  blends with black, contrast with the image's mean grey, saturation with its grey image, hue rotates H
  in HSV.
* RandomGrayscale(p=0.2) (ITU-R 601 luma, replicated to 3 channels).
* Gaussian blur p=0.5, sigma ~ U[0.1, 2.0] at 224 px, scaled with the image size; only for
  ``image_size >= 96`` (at 32 px a 224-px blur would erase the image).

Input: uint8 ``(B, 3, H, W)`` or ``(3, H, W)``; output: float32, normalised with the dataset mean/std.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from shared.specs.recipes import BLUR_MIN_SIZE

MOCO_JITTER = (0.4, 0.4, 0.4, 0.1)  # ColorJitter(brightness, contrast, saturation, hue) of MoCo-v2
_LUMA = (0.299, 0.587, 0.114)


def _rand(n: int, lo: float, hi: float, gen: torch.Generator | None) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _grey(x: Tensor) -> Tensor:
    r, g, b = x.unbind(dim=1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def crop_boxes(n: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
               gen: torch.Generator | None, attempts: int = 10) -> Tensor:
    """``(n, 4)`` integer boxes ``(top, left, h, w)`` drawn like torchvision's RandomResizedCrop."""
    area = height * width
    target = area * _rand(n * attempts, *scale, gen).view(n, attempts)
    log_r = _rand(n * attempts, math.log(ratio[0]), math.log(ratio[1]), gen).view(n, attempts)
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.argmax(ok.int(), dim=1)  # first valid attempt (0 when none, fixed below)
    w = w.gather(1, first[:, None]).squeeze(1)
    h = h.gather(1, first[:, None]).squeeze(1)
    # Fallback when all attempts fail: the largest centre crop within the ratio range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    none = ~ok.any(dim=1)
    w = torch.where(none, torch.full_like(w, fw), w)
    h = torch.where(none, torch.full_like(h, fh), h)
    top = torch.floor(torch.rand(n, generator=gen) * (height - h + 1))
    left = torch.floor(torch.rand(n, generator=gen) * (width - w + 1))
    top = torch.where(none, torch.full_like(top, 0.0) + (height - fh) // 2, top)
    left = torch.where(none, torch.full_like(left, 0.0) + (width - fw) // 2, left)
    return torch.stack([top, left, h, w], dim=1)


def resized_crop_flip(x: Tensor, boxes: Tensor, flip: Tensor, size: int) -> Tensor:
    """Crop every image to its box, resize to ``size`` (bilinear) and mirror where ``flip``.

    One affine ``grid_sample``; the sampling positions equal those of resizing the cropped image with
    ``align_corners=False`` (pixel centres), so this matches torchvision's crop-then-resize except in the
    outermost half pixel, where we interpolate with the real neighbouring pixels instead of clamping to
    the crop's edge.
    """
    n, _, height, width = x.shape
    top, left, h, w = boxes.to(x.device, torch.float32).unbind(dim=1)
    sign = 1.0 - 2.0 * flip.to(x.device, torch.float32)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = w / width * sign
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate hue by ``shift`` (fraction of a turn, per sample) through HSV, as torchvision does."""
    r, g, b = x.unbind(dim=1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(maxc == r, (g - b) / safe,
                      torch.where(maxc == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = torch.where(delta > 0, hue / 6.0, torch.zeros_like(hue))
    hue = torch.remainder(hue + shift.view(-1, 1, 1), 1.0)
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)),
                      torch.zeros_like(maxc))
    # HSV -> RGB: each channel from the distance of its phase to the hue (branch-free form).
    k = torch.stack([torch.remainder(5 + hue * 6, 6), torch.remainder(3 + hue * 6, 6),
                     torch.remainder(1 + hue * 6, 6)], dim=1)
    k = torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return maxc.unsqueeze(1) * (1 - sat.unsqueeze(1) * k)


def color_jitter(x: Tensor, strength: Sequence[float], p: float, gen: torch.Generator | None) -> Tensor:
    """ColorJitter(brightness, contrast, saturation, hue) applied with probability ``p`` per sample."""
    n = x.shape[0]
    bri, con, sat, hue = strength
    apply = torch.rand(n, generator=gen) < p
    factors = [
        _rand(n, max(0.0, 1 - bri), 1 + bri, gen), _rand(n, max(0.0, 1 - con), 1 + con, gen),
        _rand(n, max(0.0, 1 - sat), 1 + sat, gen), _rand(n, -hue, hue, gen),
    ]
    order = torch.argsort(torch.rand(n, 4, generator=gen), dim=1)  # a random op order per sample
    dev = x.device
    for step in range(4):
        for op in range(4):
            if strength[op] == 0:  # identity (factor 1 / no hue shift): skip the work, e.g. grey images
                continue
            sel = (apply & (order[:, step] == op)).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            sel_d = sel.to(dev)
            xs, f = x.index_select(0, sel_d), factors[op][sel].to(dev)
            if op == 0:
                xs = xs * f.view(-1, 1, 1, 1)
            elif op == 1:
                mean = _grey(xs).mean(dim=(1, 2, 3), keepdim=True)
                xs = f.view(-1, 1, 1, 1) * xs + (1 - f.view(-1, 1, 1, 1)) * mean
            elif op == 2:
                xs = f.view(-1, 1, 1, 1) * xs + (1 - f.view(-1, 1, 1, 1)) * _grey(xs)
            else:
                xs = _adjust_hue(xs, f)
            x = x.index_copy(0, sel_d, xs.clamp_(0.0, 1.0))
    return x


def random_grayscale(x: Tensor, p: float, gen: torch.Generator | None) -> Tensor:
    mask = (torch.rand(x.shape[0], generator=gen) < p).to(x.device).view(-1, 1, 1, 1)
    if p <= 0:
        return x
    return torch.where(mask, _grey(x).expand_as(x), x)


def gaussian_blur(x: Tensor, sigma_range: tuple[float, float], p: float, gen: torch.Generator | None) -> Tensor:
    """Per-sample Gaussian blur (separable, reflect padding) with probability ``p``."""
    n, c, _, _ = x.shape
    sigma = _rand(n, *sigma_range, gen)
    apply = torch.rand(n, generator=gen) < p
    radius = max(1, math.ceil(3 * sigma_range[1]))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    identity = (offsets == 0).float().expand_as(kernel)
    kernel = torch.where(apply[:, None], kernel, identity).to(x.device)
    k = kernel.repeat_interleave(c, dim=0)  # one kernel per (sample, channel) -> grouped conv
    y = x.reshape(1, n * c, *x.shape[2:])
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=n * c)
    return y.reshape_as(x)


class ViewTransform:
    """One augmentation pipeline ("weak" or "strong"); callable on uint8 images, returns normalised floats."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], *, strong: bool,
                 scale: Sequence[float] = (0.2, 1.0), hflip: bool = True, jitter: Sequence[float] = MOCO_JITTER,
                 jitter_p: float = 0.8, grayscale_p: float = 0.2, blur: bool | None = None,
                 blur_p: float = 0.5) -> None:
        self.image_size = image_size
        self.strong = strong
        self.scale = (float(scale[0]), float(scale[1]))
        self.hflip = hflip  # off for digits and text: a mirrored 2 or 7 is not a 2 or 7
        self.jitter, self.jitter_p, self.grayscale_p = tuple(jitter), jitter_p, grayscale_p
        # Blur only for strong views and images big enough for it (ssl.md 7.2: none at 32 px).
        self.blur = strong and blur_p > 0 and (image_size >= BLUR_MIN_SIZE if blur is None else blur)
        self.blur_p = blur_p
        s = image_size / 224
        self.blur_sigma = (0.1 * s, 2.0 * s)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def __repr__(self) -> str:
        return (f"ViewTransform(size={self.image_size}, strong={self.strong}, scale={self.scale}, "
                f"hflip={self.hflip}, blur={self.blur})")

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        single = images.dim() == 3
        x = images.unsqueeze(0) if single else images
        x = x.float().div_(255.0)
        n = x.shape[0]
        boxes = crop_boxes(n, x.shape[2], x.shape[3], self.scale, (3 / 4, 4 / 3), generator)
        # Drawn even without flips, so switching them off changes nothing else in the random stream.
        flip = (torch.rand(n, generator=generator) < 0.5) & self.hflip
        x = resized_crop_flip(x, boxes, flip, self.image_size)
        if self.strong:
            x = color_jitter(x, self.jitter, self.jitter_p, generator)
            x = random_grayscale(x, self.grayscale_p, generator)
            if self.blur:
                x = gaussian_blur(x, self.blur_sigma, self.blur_p, generator)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return x.squeeze(0) if single else x


class EvalTransform:
    """Evaluation: no augmentation, only uint8 -> float and normalisation (images are already sized)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        single = images.dim() == 3
        x = (images.unsqueeze(0) if single else images).float().div_(255.0)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return x.squeeze(0) if single else x


def build_view_transforms(augmentation: str, image_size: int, mean: Sequence[float], std: Sequence[float], *,
                          recipe: Any | None = None,
                          color_jitter: Sequence[float] | None = None) -> tuple[ViewTransform, ViewTransform]:
    """``"weak/strong"`` -> (target transform, online transform): the reference's "target/online" naming.

    ``recipe`` is a resolved ``shared.specs.recipes.AugmentOptions`` (a spec's ``augment``): crop scale, flips,
    colour jitter and its probability, grayscale and blur; without it, MoCo-v2's recipe (ssl.md 1.6).
    ``color_jitter`` overrides the strong views' ColorJitter (brightness, contrast, saturation, hue). Weak
    views only crop and flip.
    """
    try:
        target, online = augmentation.split("/")
        if {target, online} - {"weak", "strong"}:
            raise ValueError
    except ValueError:
        raise ValueError(f"augmentation must be '<weak|strong>/<weak|strong>' (target/online), "
                         f"got {augmentation!r}") from None
    kwargs: dict[str, Any] = {}
    if recipe is not None:
        kwargs = {"scale": tuple(recipe.crop_scale), "hflip": recipe.hflip, "jitter": tuple(recipe.color_jitter),
                  "jitter_p": recipe.jitter_p, "grayscale_p": recipe.grayscale_p, "blur_p": recipe.blur_p,
                  "blur": recipe.blur_p > 0}  # the resolved recipe already applied the preset's size rule
    if color_jitter is not None:
        kwargs["jitter"] = tuple(color_jitter)
    return (ViewTransform(image_size, mean, std, strong=target == "strong", **kwargs),
            ViewTransform(image_size, mean, std, strong=online == "strong", **kwargs))
