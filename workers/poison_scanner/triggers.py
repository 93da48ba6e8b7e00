"""Patch triggers: the project's built-in patterns, custom images, and the reference's paste rule (§1.1).

``paste(image, trigger, x, y, alpha)`` is SSL-Backdoor's ``alpha_composite`` paste: inside the box,
``pixel = alpha * image + (1 - alpha) * trigger`` - alpha is the opacity of the IMAGE, so ``alpha = 0`` is an
opaque trigger (the name suggests the opposite). ``location(rng, side, w, lo, hi)`` is its random top-left rule:
uniform over ``[floor(lo * S), floor(hi * S - w)]``, the lower bound alone when that range is empty.
"""

from __future__ import annotations

import hashlib
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image


def checkerboard(size: int, cell: int = 2) -> np.ndarray:
    """Black/white checkerboard ``size x size x 3`` uint8 with ``cell``-pixel squares (top-left white)."""
    yy, xx = np.mgrid[0:size, 0:size]
    on = ((yy // cell + xx // cell) % 2 == 0).astype(np.uint8) * 255
    return np.repeat(on[..., None], 3, axis=2)


def random_colors(size: int, seed: int, *, grid: int = 4, smooth: bool = False) -> np.ndarray:
    """A ``grid x grid`` array of random RGB colours upsampled to ``size``: nearest (``random-colors``, the toy
    trigger of §1.8) or bilinear (``smooth-colors``, like the reference's HTBA trigger PNGs)."""
    cells = np.random.default_rng(seed).integers(0, 256, size=(grid, grid, 3), dtype=np.uint8)
    method = Image.Resampling.BILINEAR if smooth else Image.Resampling.NEAREST
    return np.asarray(Image.fromarray(cells).resize((size, size), method), dtype=np.uint8).copy()


def builtin_trigger(name: str, size: int, seed: int = 0) -> np.ndarray:
    if name == "checkerboard":
        return checkerboard(size, cell=max(1, size // 4) if size >= 8 else 1)
    if name == "random-colors":
        return random_colors(size, seed)
    if name == "smooth-colors":
        return random_colors(size, seed, smooth=True)
    raise ValueError(f"unknown built-in trigger {name!r}; one of: checkerboard, random-colors, smooth-colors")


def image_trigger(data: bytes | Path, size: int) -> np.ndarray:
    """A custom trigger image (bytes or a path) as RGB, resized to ``size x size`` (bilinear, like the reference's
    resize to ``watermark_width``; a non-square image is squashed to square)."""
    src = io.BytesIO(data) if isinstance(data, bytes) else data
    with Image.open(src) as img:
        rgb = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8).copy()


def digest(trigger: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(trigger).tobytes()).hexdigest()


def location(rng: np.random.Generator, side: int, w: int, lo: float, hi: float) -> int:
    """One top-left coordinate: uniform integer in ``[floor(lo*S), floor(hi*S - w)]`` (inclusive); the lower bound
    when the upper falls below it (the reference's rule)."""
    low, high = math.floor(lo * side), math.floor(hi * side - w)
    if high < low:
        return low
    return int(rng.integers(low, high + 1))


def paste(image: np.ndarray, trigger: np.ndarray, x: int, y: int, alpha: float = 0.0) -> np.ndarray:
    """A copy of ``image`` (H x W x 3 uint8) with ``trigger`` blended in at top-left ``(x, y)``:
    ``alpha * image + (1 - alpha) * trigger`` inside the box (alpha = 0: opaque), rounded to uint8."""
    h, w = trigger.shape[:2]
    if y < 0 or x < 0 or y + h > image.shape[0] or x + w > image.shape[1]:
        raise ValueError(f"a {w}x{h} trigger at ({x}, {y}) does not fit a {image.shape[1]}x{image.shape[0]} image")
    out = image.copy()
    region = out[y:y + h, x:x + w].astype(np.float64)
    out[y:y + h, x:x + w] = np.clip(np.rint(alpha * region + (1.0 - alpha) * trigger), 0, 255).astype(np.uint8)
    return out
