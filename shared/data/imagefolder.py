"""Load an (extracted) ImageFolder directory into an ``ImageDataset``.

Uses the same layout rules as archive inspection (``archives.plan_layout``): ``train/<class>/...`` with
an optional ``test/`` (or ``val/``) split, or ``<class>/...`` at the root, optionally inside one wrapping
folder. Without a test split, a deterministic ~20% of every class is held out as the test set.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from shared.data.base import DatasetError, ImageDataset, fit_square, is_grey
from shared.data.layout import ArchiveError, holdout_size, plan_layout

SPLIT_SEED = 0


def list_files(root: Path) -> list[str]:
    """Relative ``a/b/c`` paths of the regular files under ``root``; symlinks are skipped, not followed."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = os.path.relpath(dirpath, root)
        dirnames.sort()
        for fn in sorted(filenames):
            full = os.path.join(dirpath, fn)
            if os.path.isfile(full) and not os.path.islink(full):
                out.append(fn if rel_dir == "." else f"{rel_dir}/{fn}".replace(os.sep, "/"))
    return out


def holdout_split(items: list[tuple[str, int]],
                  seed: int = SPLIT_SEED) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Per class, move ``holdout_size(n)`` (~20%, at least 1 when the class has 2+) items to the test set."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in sorted({c for _, c in items}):
        members = sorted(p for p, cc in items if cc == c)
        n_test = holdout_size(len(members))
        order = rng.permutation(len(members))
        test += [(members[i], c) for i in order[:n_test]]
        train += [(members[i], c) for i in order[n_test:]]
    return train, test


def _decode(root: Path, items: list[tuple[str, int]], image_size: int) -> tuple[np.ndarray, np.ndarray]:
    images = np.empty((len(items), image_size, image_size, 3), dtype=np.uint8)
    for i, (rel, _) in enumerate(items):
        try:
            with Image.open(root / rel) as img:
                images[i] = fit_square(img, image_size)
        except (OSError, ValueError) as exc:
            raise DatasetError(f"cannot decode {rel!r} in {root}: {exc}; remove or replace the file") from exc
    return images, np.array([c for _, c in items], dtype=np.int64)


def load_image_folder(root: str | Path, *, image_size: int, limit_train: int | None = None,
                      limit_test: int | None = None, name: str | None = None) -> ImageDataset:
    """Decode an ImageFolder tree: RGB, shorter side resized to ``image_size`` then centre-cropped.

    Rows are put in a seeded, class-mixed order before ``limit_*`` is applied, so a limit keeps a roughly
    balanced subset, and only the kept images are decoded.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    try:
        layout = plan_layout(list_files(root))
    except ArchiveError as exc:
        raise DatasetError(f"{root}: {exc.reason}") from exc
    train, test = (layout.train, layout.test) if layout.test else holdout_split(layout.train)
    rng = np.random.default_rng(SPLIT_SEED)
    train = [train[i] for i in rng.permutation(len(train))][:limit_train]
    test = [test[i] for i in rng.permutation(len(test))][:limit_test]
    xtr, ytr = _decode(root, train, image_size)
    xte, yte = _decode(root, test, image_size)
    grey = is_grey(xtr)  # grey uploads (scans, X-rays): the recipes' "grey" family, without colour ops
    return ImageDataset(xtr, ytr, xte, yte, classes=layout.classes, name=name or root.name,
                        family="grey" if grey else "natural", channels=1 if grey else 3)
