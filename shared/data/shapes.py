"""``builtin://shapes``: a procedural, deterministic 10-class 32x32 colour image set.

Why it exists: no CIFAR-like colour set ships inside a wheel here (see env.md section 7), and MNIST/digits
are grey, so colour augmentations would be meaningless on them. The classes are *shapes*; colour is drawn
independently of the class, so colour is not a shortcut, and colour jitter / grayscale are exactly the
invariances a self-supervised method has to learn.

Every image: a random shape (random centre, size and - where the class allows it - rotation) over a
plain background, anti-aliased by 2x2 supersampling, plus Gaussian pixel noise. Orientation-defined
classes (square vs diamond, horizontal vs vertical stripes, plus) only get a small rotation jitter so
they stay distinguishable from each other.

Colour: every image is a two-tone TINT of one random hue - a light tone (low saturation, high value) and a
dark tone (high saturation, low value) of the same hue, the shape taking either one (random polarity).
The hue is uniform over the whole colour wheel, so colour is the dominant nuisance of the raw pixels
(raw-pixel 1-NN ~0.45, a random-init ResNet-18 ~0.45, chance 0.10), but a hue rotation maps any image's
colours onto any other's: a strong view with ``color_jitter`` hue 0.5 removes the colour cue entirely,
and what is left to agree on between two views is the shape. (The first version drew foreground and
background colours independently and uniformly from RGB: each image's colour PAIR was then almost unique
and no global colour jitter can remove it, so MSF/BYOL matched views by colour and their k-NN fell BELOW
random init.)

Generation is vectorised NumPy (~0.5 s for all 6,000 images on one core) and cached in-process.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np

SIZE = 32
NUM_TRAIN = 5000
NUM_TEST = 1000
TRAIN_SEED = 20_240_101
TEST_SEED = 20_240_102

_SUPERSAMPLE = 2  # anti-aliasing: render at 2x and average 2x2 blocks (the code assumes 2)
_NOISE_STD = 4.0  # Gaussian pixel noise, in 0-255 units
# Tones of the tint, as (low, high) ranges of HSV saturation and value (0-1): light vs dark stays visible.
_LIGHT_SATURATION, _LIGHT_VALUE = (0.2, 0.5), (0.8, 1.0)
_DARK_SATURATION, _DARK_VALUE = (0.6, 1.0), (0.25, 0.5)
_CHUNK = 1000  # images rendered per vectorised chunk (bounds peak memory to ~100 MB)

Mask = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _disk(u: np.ndarray, v: np.ndarray, _r: np.ndarray) -> np.ndarray:
    return np.asarray(u * u + v * v <= 1.0)


def _ring(u: np.ndarray, v: np.ndarray, _r: np.ndarray) -> np.ndarray:
    rho2 = u * u + v * v
    return np.asarray((rho2 <= 1.0) & (rho2 >= 0.55**2))


def _triangle(u: np.ndarray, v: np.ndarray, _r: np.ndarray) -> np.ndarray:
    # Equilateral, circumradius 1 (inradius 0.5): inside all three edge half-planes.
    inside = np.ones(u.shape, dtype=bool)
    for k in range(3):
        phi = -np.pi / 2 + 2 * np.pi * k / 3
        inside &= u * np.cos(phi) + v * np.sin(phi) <= 0.5
    return inside


def _square(u: np.ndarray, v: np.ndarray, _r: np.ndarray) -> np.ndarray:
    return np.asarray(np.maximum(np.abs(u), np.abs(v)) <= 0.75)


def _diamond(u: np.ndarray, v: np.ndarray, _r: np.ndarray) -> np.ndarray:
    return np.asarray(np.abs(u) + np.abs(v) <= 1.0)


def _plus(u: np.ndarray, v: np.ndarray, _r: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    return np.asarray(((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0)))


def _star(u: np.ndarray, v: np.ndarray, _r: np.ndarray) -> np.ndarray:
    # Five points: the allowed radius oscillates between 1 (tips) and 0.4 (valleys) with the angle.
    phi = np.arctan2(v, u) + np.pi / 2
    t = np.abs(np.mod(phi * 5 / (2 * np.pi), 1.0) - 0.5) * 2  # 1 at a tip, 0 in a valley
    return np.asarray(np.sqrt(u * u + v * v) <= 0.4 + 0.6 * t)


def _stripes(coord: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Mask:
    def mask(u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
        # Square patch filled with stripes; the period (in pixels) is tied to the patch radius r.
        period = np.maximum(r / 2.5, 3.0)
        inside = np.maximum(np.abs(u), np.abs(v)) <= 0.85
        return np.asarray(inside & (np.mod(coord(u, v) * r / period, 1.0) < 0.5))

    return mask


def _checker(u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    period = np.maximum(r / 2.0, 3.0)
    inside = np.maximum(np.abs(u), np.abs(v)) <= 0.85
    a = np.mod(u * r / period, 1.0) < 0.5
    b = np.mod(v * r / period, 1.0) < 0.5
    return np.asarray(inside & (a ^ b))


# name -> (mask in shape coordinates (unit "radius"), max |rotation| in degrees)
CLASSES: dict[str, tuple[Mask, float]] = {
    "circle": (_disk, 0.0),
    "ring": (_ring, 0.0),
    "triangle": (_triangle, 180.0),
    "square": (_square, 15.0),
    "diamond": (_diamond, 15.0),
    "plus": (_plus, 15.0),
    "star": (_star, 180.0),
    "horizontal_stripes": (_stripes(lambda u, v: v), 15.0),
    "vertical_stripes": (_stripes(lambda u, v: u), 15.0),
    "checker": (_checker, 15.0),
}
CLASS_NAMES: list[str] = list(CLASSES)


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """HSV in [0, 1] (arrays of one shape ``S``) -> RGB in [0, 255], shape ``S + (3,)``."""
    k = np.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], axis=-1)
    k = np.clip(np.minimum(k, 4 - k), 0, 1)
    return np.asarray(255.0 * v[..., None] * (1 - s[..., None] * k))


def _colours(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Foreground/background colours: the light and dark tone of one uniform random hue, polarity random."""
    hue = rng.random(n)
    light = hsv_to_rgb(hue, rng.uniform(*_LIGHT_SATURATION, n), rng.uniform(*_LIGHT_VALUE, n))
    dark = hsv_to_rgb(hue, rng.uniform(*_DARK_SATURATION, n), rng.uniform(*_DARK_VALUE, n))
    light_shape = (rng.random(n) < 0.5)[:, None]
    fg = np.where(light_shape, light, dark)
    bg = np.where(light_shape, dark, light)
    return fg.astype(np.float32), bg.astype(np.float32)


def _render_chunk(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    n = len(labels)
    s = SIZE * _SUPERSAMPLE
    radius = rng.uniform(7.0, 13.0, size=n).astype(np.float32)
    # Centres keep at least ~80% of the shape inside the frame.
    lo, hi = 0.8 * radius, SIZE - 0.8 * radius
    cx = (lo + rng.random(n) * (hi - lo)).astype(np.float32)
    cy = (lo + rng.random(n) * (hi - lo)).astype(np.float32)
    max_rot = np.array([CLASSES[CLASS_NAMES[c]][1] for c in labels], dtype=np.float32)
    theta = np.deg2rad(rng.uniform(-1.0, 1.0, size=n).astype(np.float32) * max_rot)
    fg, bg = _colours(rng, n)

    # Pixel-centre coordinates of the supersampled grid, in output-pixel units.
    grid = (np.arange(s, dtype=np.float32) + 0.5) / _SUPERSAMPLE
    mask = np.empty((n, s, s), dtype=bool)
    for c, name in enumerate(CLASS_NAMES):
        sel = np.flatnonzero(labels == c)
        if not sel.size:
            continue
        # Shape coordinates: translate, rotate, scale so the shape has unit "radius".
        dx = grid[None, None, :] - cx[sel, None, None]
        dy = grid[None, :, None] - cy[sel, None, None]
        cos, sin = np.cos(theta[sel])[:, None, None], np.sin(theta[sel])[:, None, None]
        r = radius[sel, None, None]
        u = (dx * cos + dy * sin) / r
        v = (dy * cos - dx * sin) / r
        mask[sel] = CLASSES[name][0](u, v, r)
    # Sum 2x2 blocks -> fractional coverage = anti-aliased alpha.
    m = mask.view(np.uint8)
    alpha = (m[:, 0::2, 0::2] + m[:, 1::2, 0::2] + m[:, 0::2, 1::2] + m[:, 1::2, 1::2]).astype(np.float32) / 4
    img = bg[:, None, None, :] + alpha[..., None] * (fg - bg)[:, None, None, :]
    img += _NOISE_STD * rng.standard_normal(size=img.shape, dtype=np.float32)
    return np.asarray(np.clip(np.rint(img), 0, 255).astype(np.uint8))


def generate(num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``num`` images (uint8 N x 32 x 32 x 3) and labels (int64), class-balanced, fully determined by seed."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(num) % len(CLASS_NAMES)).astype(np.int64)
    chunks = [_render_chunk(rng, labels[i:i + _CHUNK]) for i in range(0, num, _CHUNK)]
    images = np.concatenate(chunks) if chunks else np.zeros((0, SIZE, SIZE, 3), np.uint8)
    return images, labels


@lru_cache(maxsize=2)
def _cached(split: str) -> tuple[np.ndarray, np.ndarray]:
    num, seed = (NUM_TRAIN, TRAIN_SEED) if split == "train" else (NUM_TEST, TEST_SEED)
    images, labels = generate(num, seed)
    # Shared between callers: make accidental in-place edits fail loudly instead of leaking.
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def load_shapes() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(train_images, train_labels, test_images, test_labels, class names); read-only cached arrays."""
    xtr, ytr = _cached("train")
    xte, yte = _cached("test")
    return xtr, ytr, xte, yte, list(CLASS_NAMES)
