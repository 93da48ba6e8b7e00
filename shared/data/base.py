"""The in-memory image dataset every vision worker trains on, and small array helpers (NumPy + PIL only)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


class DatasetError(ValueError):
    """A dataset cannot be loaded as requested; the message says what to change."""


@dataclass
class ImageDataset:
    """Train/test images as uint8 ``N x H x W x 3`` arrays with int64 labels indexing ``classes``.

    The row order is fixed (deterministic for a given source), and class-mixed, so "the first N images"
    (``limit_train``) is a usable, roughly balanced subset and dataset indices are stable across epochs
    and attempts (needed by per-sample caches such as CMSF's).
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]
    name: str
    # Metadata the augmentation recipes use (shared/specs/recipes.py): the family of images ("natural",
    # "grey", "digits", "shapes") and the channels of the source images (grey sources are replicated to 3).
    family: str = "natural"
    channels: int = 3

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
                raise DatasetError(f"{split}_images must be uint8 N x H x W x 3, got {x.dtype} {x.shape}")
            if y.shape != (len(x),):
                raise DatasetError(f"{split}_labels must have shape ({len(x)},), got {y.shape}")
        if len(self.test_labels) and self.test_labels.max() >= len(self.classes):
            raise DatasetError("test labels reference a class that is not in `classes`")
        if self.channels not in (1, 3):
            raise DatasetError(f"channels must be 1 (grey source) or 3, got {self.channels}")

    @property
    def grey(self) -> bool:
        return self.channels == 1

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[1])

    def channel_stats(self, max_images: int = 10_000) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std in [0, 1] units, from (the first ``max_images``) training images."""
        images = self.train_images[:max_images]
        total, sq, count = np.zeros(3), np.zeros(3), 0
        for i in range(0, len(images), 500):  # chunked: never a float copy of the whole array
            x = images[i:i + 500].reshape(-1, 3).astype(np.float64) / 255.0
            total += x.sum(axis=0)
            sq += (x * x).sum(axis=0)
            count += len(x)
        if count == 0:
            raise DatasetError("no training images to compute normalisation statistics from")
        mean = total / count
        std = np.sqrt(np.maximum(sq / count - mean * mean, 0.0))
        std = np.maximum(std, 1e-3)  # a constant channel (e.g. all-black) must not divide by zero
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def is_grey(images: np.ndarray, max_images: int = 256) -> bool:
    """Whether ``N x H x W x 3`` uint8 images are grey (R = G = B everywhere), judged on the first images."""
    x = images[:max_images]
    return bool(len(x)) and bool((x[..., 0] == x[..., 1]).all() and (x[..., 1] == x[..., 2]).all())


def limit(x: np.ndarray, y: np.ndarray, n: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` rows (all when ``n`` is None)."""
    if n is None:
        return x, y
    if n < 1:
        raise DatasetError(f"a limit must be >= 1, got {n}")
    return x[:n], y[:n]


def resize_square(images: np.ndarray, size: int) -> np.ndarray:
    """Resize ``N x H x W`` (grey) or ``N x H x W x 3`` uint8 images to ``N x size x size x 3``.

    Bilinear; PIL widens the filter when shrinking, so downscaling is anti-aliased. Grey input is
    resized once and then replicated to three channels (3x cheaper than resizing RGB).
    """
    grey = images.ndim == 3
    if images.shape[1:3] == (size, size):
        out = images
    else:
        out = np.empty((len(images), size, size) + (() if grey else (3,)), dtype=np.uint8)
        for i, img in enumerate(images):
            out[i] = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR))
    if grey:
        out = np.repeat(out[..., None], 3, axis=-1)
    return np.ascontiguousarray(out)


def fit_square(img: Image.Image, size: int) -> np.ndarray:
    """One image -> ``size x size x 3`` uint8: shorter side resized to ``size``, then centre crop.

    Keeps the aspect ratio (the ImageNet "Resize + CenterCrop" evaluation convention) instead of
    squashing non-square photos.
    """
    img.draft("RGB", (size, size))  # JPEG: decode at reduced scale when the file is much larger
    img = img.convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
