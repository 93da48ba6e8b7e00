"""What a PatchSearch run writes: the per-image scores (CSV), the top-k windows as one image grid (a researcher
looks at them: real trigger crops or object parts?), and the filtered dataset (an ImageFolder tree)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from workers.poison_scanner.patchsearch.inputs import MANIFEST_FILE, TrainingSet, under_train


def patch_grid(windows: list[torch.Tensor], path: Path, *, poisoned: list[bool] | None = None, cell: int = 48,
               columns: int = 10) -> Path:
    """PNG of ``[3, w, w]`` pixel windows, best first, each upscaled (nearest) to ``cell`` px; with ground truth a
    red frame marks a true poison and a grey one a clean image."""
    rows = max(1, -(-len(windows) // columns))
    pad = 3
    grid = Image.new("RGB", (columns * (cell + 2 * pad), rows * (cell + 2 * pad)), (255, 255, 255))
    for i, win in enumerate(windows):
        arr = (win.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        tile = Image.fromarray(arr).resize((cell, cell), Image.Resampling.NEAREST)
        x, y = (i % columns) * (cell + 2 * pad), (i // columns) * (cell + 2 * pad)
        if poisoned is not None:
            colour = (220, 30, 30) if poisoned[i] else (160, 160, 160)
            frame = Image.new("RGB", (cell + 2 * pad, cell + 2 * pad), colour)
            grid.paste(frame, (x, y))
        grid.paste(tile, (x + pad, y + pad))
    grid.save(path)
    return path


def write_scores(path: Path, training: TrainingSet, scores: np.ndarray, scored: np.ndarray, removed: np.ndarray,
                 prob: np.ndarray, poisoned: np.ndarray | None) -> Path:
    """One row per training image: row, file (or ``-``), class, score, scored, P(poison), removed[, poisoned]."""
    ds = training.dataset
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["row", "path", "class", "score", "scored", "p_poison", "removed"]
                   + (["poisoned"] if poisoned is not None else []))
        for i in range(training.n):
            w.writerow([i, training.paths[i] if training.paths else "-", ds.classes[int(ds.train_labels[i])],
                        f"{scores[i]:g}", int(scored[i]), f"{prob[i]:.4f}", int(removed[i])]
                       + ([int(poisoned[i])] if poisoned is not None else []))
    return path


def write_filtered(out: Path, training: TrainingSet, removed: np.ndarray, *,
                   provenance: dict[str, Any]) -> dict[str, int]:
    """The dataset without the removed training images, as an ImageFolder tree at ``out``.

    Files are copied byte for byte (never re-encoded); the test split and every file outside ``train/``
    (a patched validation split, sidecars) are kept; a poison manifest is rewritten to list only the poisons
    still present, plus ``filtered_by``. A builtin set (no files) is written as PNGs.

    A class whose every training image is removed (100 % of the target class poisoned and all found) loses its
    ``test/<class>/`` folder too: an ImageFolder with test images of a class it has no training images of is
    refused by the loader, and the filtered set exists to be trained on (attack evaluations use the poisoned
    dataset, which keeps them). ``classes_emptied`` counts them.
    """
    ds = training.dataset
    out.mkdir(parents=True, exist_ok=True)
    kept = 0
    left = np.bincount(ds.train_labels[~removed], minlength=len(ds.classes))
    had = np.bincount(ds.train_labels, minlength=len(ds.classes))
    emptied = {ds.classes[c] for c in range(len(ds.classes)) if had[c] and not left[c]}
    if training.root is None or training.paths is None:
        tests = 0
        for split, images, labels, keep in (("train", ds.train_images, ds.train_labels, ~removed),
                                            ("test", ds.test_images, ds.test_labels, None)):
            for i, (img, y) in enumerate(zip(images, labels, strict=True)):
                if (keep is not None and not keep[i]) or (keep is None and ds.classes[int(y)] in emptied):
                    continue
                d = out / split / ds.classes[int(y)]
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(d / f"{i:06d}.png")
                kept += split == "train"
                tests += split == "test"
        return {"train": kept, "test": tests, "removed": int(removed.sum()), "classes_emptied": len(emptied)}
    root = training.root
    dropped = {training.paths[i] for i in np.flatnonzero(removed)}
    train_files = set(training.paths)
    gone_tests = {rel for rel in (training.test_paths or []) if rel.split("/")[1:2] and rel.split("/")[1] in emptied}
    for src in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = src.relative_to(root).as_posix()
        if rel in dropped or rel == MANIFEST_FILE or rel in gone_tests:
            continue
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        kept += rel in train_files
    manifest = root / MANIFEST_FILE
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        gone = {under_train(p) for p in dropped}
        data["poisoned"] = [p for p in data.get("poisoned", []) if under_train(p) not in gone]
        data["filtered_by"] = provenance
        (out / MANIFEST_FILE).write_text(json.dumps(data, indent=1))
    return {"train": kept, "test": len(training.test_paths or []) - len(gone_tests), "removed": len(dropped),
            "classes_emptied": len(emptied)}
