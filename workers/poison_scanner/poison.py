"""``poison`` jobs: patch-trigger poisoning of an image dataset, as SSL-Backdoor's ``generate_poison.py`` does it
(security-clip-experts.md §1.1), written as a NEW dataset with a manifest of the ground truth.

Output layout (an ImageFolder tree, registered with ``ctx.save_dataset(..., output="dataset")``)::

    train/<class>/<n>.png          every training image; the poisoned ones carry the trigger, ordinary names
    test/<class>/<n>.png           the clean test images, unchanged
    patched_test.npy               uint8 N x S x S x 3: the NON-target test images with the trigger at a
                                   val_location position (attack evaluation), rows in manifest.patched_test order
    trigger.npy                    the trigger as pasted (training size)
    poison_manifest.json           ``shared.specs.poison.PoisonManifest``: which train/ files are poisoned, their
                                   boxes, the patched test images, trigger, seed - never inferred from names

(Only train/, test/ and non-image root files survive storage, hence ``.npy`` sidecars, not image folders.)

Algorithm (mode ``ssl``, the reference's targeted attack): shuffle the target class's training images with the
seeded generator, poison the first ``floor(rate * N_target)`` (paste on a copy at a random ``train_location``
corner, alpha-blended), keep all other images unchanged. Mode ``badnets`` pastes on ``floor(rate * N_other)`` of
the non-target images and files them under the target class. Every random choice comes from
``numpy.random.default_rng(seed)`` in a fixed order, so a seed reproduces the dataset byte for byte.

Deviations from the reference, deliberate: images are written at ``image_size`` (the loader's resize + centre
crop) for train and test alike, so the trigger has one pixel size; patched test images are non-target only
(the reference pastes on every val image and then has to exclude the target class from ASR); no ``np.float``,
no ``Image.show()``, a fixed seed instead of ``seed = None``.
"""

from __future__ import annotations

import base64
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from shared.data import DatasetError, ImageDataset
from shared.specs.poison import (
    MANIFEST_FILENAME,
    PATCHED_TEST_FILE,
    TRIGGER_FILE,
    PoisonManifest,
    PoisonSpec,
    TriggerInfo,
)
from workers.poison_scanner.triggers import builtin_trigger, digest, image_trigger, location, paste
from workers.runtime.context import JobConfigError, JobContext


def run(ctx: JobContext[PoisonSpec]) -> None:
    """Platform entry point: poison ``ctx.inputs["dataset"]`` and register the result as a new dataset."""
    from workers.vision.data import load_job_dataset

    spec = ctx.spec
    dataset = load_job_dataset(ctx, image_size=spec.image_size)
    ref = ctx.inputs.get("dataset") or {"uri": spec.dataset}
    trigger = load_trigger(spec, dataset_root=ref.get("path"))
    base = Path(ctx.workdir) if ctx.workdir else None
    with tempfile.TemporaryDirectory(dir=base, prefix="poison-") as tmp:
        out = Path(tmp) / "dataset"
        manifest = poison_dataset(spec, dataset, out, trigger=trigger, source=str(ref.get("uri", spec.dataset)),
                                  progress=ctx.progress)
        name = spec.output_name or f"{manifest.target_class}-poisoned"
        summary = {"poisoned": len(manifest.poisoned), "train": manifest.num_train,
                   "patched_test": len(manifest.patched_test), "trigger_size": manifest.trigger.size}
        ctx.log(f"poisoned {summary['poisoned']} of {summary['train']} training images (target "
                f"{manifest.target_class!r}, mode {spec.mode}); {summary['patched_test']} patched test images")
        ctx.set_result({k: float(v or 0) for k, v in summary.items()})
        ctx.save_dataset(out, name=name, format="images", output="dataset",
                         meta={"poison": {"target_class": manifest.target_class, "mode": spec.mode,
                                          "rate": spec.rate, "seed": spec.seed, **summary}})


def load_trigger(spec: PoisonSpec, *, dataset_root: str | Path | None) -> np.ndarray:
    """The trigger at ``spec.trigger_size`` (uint8 ``w x w x 3``)."""
    t, size = spec.trigger, spec.trigger_size
    if t.builtin:
        return builtin_trigger(t.builtin, size, t.pattern_seed)
    if t.png_base64:
        return image_trigger(base64.b64decode(t.png_base64), size)
    if dataset_root is None:
        raise JobConfigError(f"trigger.file={t.file!r} needs an uploaded input dataset (a builtin has no files); "
                             "put the PNG beside train/ in the upload, or use trigger.png_base64")
    path = Path(dataset_root) / str(t.file)
    if not path.is_file():
        raise JobConfigError(f"trigger.file={t.file!r} is not in the input dataset")
    try:
        return image_trigger(path, size)
    except OSError as exc:
        raise JobConfigError(f"trigger.file={t.file!r} does not decode as an image: {exc}") from exc


@dataclass
class _Written:
    paths: list[str]
    boxes: dict[str, list[int]]


def poison_dataset(spec: PoisonSpec, dataset: ImageDataset, out: Path, *, trigger: np.ndarray, source: str,
                   progress: Any = None) -> PoisonManifest:
    """Write the poisoned ImageFolder tree + manifest under ``out`` (see the module docstring)."""
    classes = list(dataset.classes)
    if spec.target_class not in classes:
        raise JobConfigError(f"target_class={spec.target_class!r} is not a class of the dataset; one of: "
                             f"{', '.join(classes[:50])}")
    bad = [c for c in classes if not c or "/" in c or c.startswith(".")]
    if bad:
        raise JobConfigError(f"class names {bad[:5]} cannot be folder names")
    size, w = dataset.image_size, trigger.shape[0]
    if w > size:
        raise JobConfigError(f"the {w}-px trigger is larger than the {size}-px images")
    target = classes.index(spec.target_class)
    rng = np.random.default_rng(spec.seed)
    labels = np.asarray(dataset.train_labels)

    pool = np.flatnonzero(labels == target) if spec.mode == "ssl" else np.flatnonzero(labels != target)
    n_poison = math.floor(spec.rate * len(pool))
    if n_poison < 1:
        raise JobConfigError(f"rate={spec.rate} of {len(pool)} {'target' if spec.mode == 'ssl' else 'non-target'} "
                             "training images poisons none; raise the rate or use more images")
    chosen = set(rng.permutation(pool)[:n_poison].tolist())

    out.mkdir(parents=True, exist_ok=False)
    written_train: list[str] = []
    poisoned: list[str] = []
    boxes: dict[str, list[int]] = {}
    total = len(labels) + len(dataset.test_labels)
    for i, (img, y) in enumerate(zip(dataset.train_images, labels, strict=True)):
        cls = classes[int(y)]
        if i in chosen:
            x0 = location(rng, size, w, *spec.train_location)
            y0 = location(rng, size, w, *spec.train_location)
            img = paste(img, trigger, x0, y0, spec.alpha)
            cls = spec.target_class  # badnets: relabelled; ssl: already the target
        rel = f"train/{cls}/{i:06d}.png"
        _save(out / rel, img)
        written_train.append(rel)
        if i in chosen:
            poisoned.append(rel)
            boxes[rel] = [x0, y0, w, w]
        if progress is not None and i % 500 == 0:
            progress(i, total)
    for j, (img, y) in enumerate(zip(dataset.test_images, dataset.test_labels, strict=True)):
        _save(out / f"test/{classes[int(y)]}/{j:06d}.png", img)
    patched = _patched_test(spec, dataset, out, trigger, rng, target) if spec.patched_test else _Written([], {})
    np.save(out / TRIGGER_FILE, np.ascontiguousarray(trigger), allow_pickle=False)

    sorted_classes = sorted(set(classes))
    manifest = PoisonManifest(
        source_dataset=source, target_class=spec.target_class, target_index=sorted_classes.index(spec.target_class),
        classes=sorted_classes,
        trigger=TriggerInfo(source=spec.trigger.source(), size=w, alpha=spec.alpha, val_alpha=spec.val_alpha,
                            sha256=digest(trigger), file=TRIGGER_FILE),
        poisoned=poisoned, boxes=boxes, rate=spec.rate, seed=spec.seed, image_size=size,
        train_location=list(spec.train_location), val_location=list(spec.val_location),
        patched_test=patched.paths, patched_boxes=patched.boxes,
        patched_test_file=PATCHED_TEST_FILE if spec.patched_test else None, num_train=len(written_train),
        mode=spec.mode)
    manifest.save(out)
    assert (out / MANIFEST_FILENAME).is_file()
    return manifest


def _patched_test(spec: PoisonSpec, dataset: ImageDataset, out: Path, trigger: np.ndarray,
                  rng: np.random.Generator, target: int) -> _Written:
    """Non-target test images with the trigger at a ``val_location`` corner (with ``val_alpha``)."""
    size, w = dataset.image_size, trigger.shape[0]
    paths: list[str] = []
    boxes: dict[str, list[int]] = {}
    rows: list[np.ndarray] = []
    for j, (img, y) in enumerate(zip(dataset.test_images, dataset.test_labels, strict=True)):
        if int(y) == target:
            continue
        x0 = location(rng, size, w, *spec.val_location)
        y0 = location(rng, size, w, *spec.val_location)
        rel = f"test/{dataset.classes[int(y)]}/{j:06d}.png"  # the clean original of this row
        rows.append(paste(img, trigger, x0, y0, spec.val_alpha))
        paths.append(rel)
        boxes[rel] = [x0, y0, w, w]
    if not paths:
        raise JobConfigError("the dataset has no non-target test images to patch; use a dataset with a test split "
                             "or set patched_test: false")
    np.save(out / PATCHED_TEST_FILE, np.stack(rows).astype(np.uint8), allow_pickle=False)
    return _Written(paths, boxes)


def _save(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        Image.fromarray(np.ascontiguousarray(img)).save(path, format="PNG", compress_level=1)
    except OSError as exc:  # disk full, ...: not the user's config
        raise DatasetError(f"cannot write {path}: {exc}") from exc
