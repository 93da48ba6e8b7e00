"""What a PatchSearch run reads: the model (a model checkpoint, frozen), the training images with their file
paths, and - when the dataset has one - the poison manifest (ground truth; never inferred from file names,
unlike the reference's ``'HTBA_trigger' in path``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from shared.data import DatasetError, ImageDataset, load_dataset
from shared.specs.poison import MANIFEST_FILENAME, PoisonManifest
from workers.runtime.context import JobConfigError
from workers.vision.backbones import Backbone
from workers.vision.checkpoints import CheckpointError, load_encoder

MANIFEST_FILE = MANIFEST_FILENAME


@dataclass
class Model:
    """The frozen backbone and the normalisation it was trained with; ``embed`` gives unit feature rows."""

    backbone: Backbone
    meta: dict[str, Any]
    mean: Tensor  # [1, 3, 1, 1]
    std: Tensor
    device: torch.device

    def normalise(self, pixels: Tensor) -> Tensor:
        """``[B, 3, H, W]`` floats in [0, 1] -> the network's input."""
        return (pixels.to(self.device) - self.mean) / self.std

    @torch.no_grad()
    def embed(self, pixels: Tensor, batch_size: int = 256) -> Tensor:
        """L2-normalised pooled features ``[N, D]`` (CPU float32) of pixel images ``[N, 3, H, W]``."""
        out = []
        for i in range(0, len(pixels), batch_size):
            f = self.backbone(self.normalise(pixels[i:i + batch_size]))
            out.append(torch.nn.functional.normalize(f.float(), dim=1).cpu())
        return torch.cat(out) if out else torch.empty(0, self.backbone.out_dim)


def load_model(state: Any, *, source: str, device: torch.device) -> Model:
    """The checkpoint's backbone, rebuilt and fully loaded (``load_encoder`` refuses a partial load, a
    checkpoint of another architecture, or one that is not a model checkpoint at all)."""
    try:
        encoder, meta = load_encoder(state, features="backbone", device=device)
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}; PatchSearch needs the model checkpoint of an ssl-train or "
                              "distill job trained on this dataset") from exc
    norm = meta["normalization"]
    mean = torch.tensor(norm["mean"], dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(norm["std"], dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return Model(encoder.backbone, meta, mean, std, device)


def to_pixels(images: np.ndarray) -> Tensor:
    """uint8 ``N x H x W x 3`` -> float ``N x 3 x H x W`` in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)


@dataclass
class TrainingSet:
    """The images PatchSearch scans, in ``ImageDataset`` row order, with their files when there are files."""

    dataset: ImageDataset
    root: Path | None  # the extracted ImageFolder tree (None: a builtin set)
    paths: list[str] | None  # per training row, relative to ``root`` (e.g. ``train/cat/001.png``)
    test_paths: list[str] | None

    @property
    def n(self) -> int:
        return len(self.dataset.train_images)


def load_training_set(ref: dict[str, Any], *, image_size: int) -> TrainingSet:
    """Decode the dataset (every image: PatchSearch scans all of them) and recover each row's file.

    ``load_image_folder`` puts rows in a seeded order; the same ``plan_layout`` + ``holdout_split`` + seeded
    permutation is replayed here to name each row's file, and checked against the decoded labels.
    """
    try:
        dataset = load_dataset(ref, image_size=image_size)
    except DatasetError as exc:
        raise JobConfigError(str(exc)) from exc
    if not ref.get("path"):
        return TrainingSet(dataset, None, None, None)
    from shared.data.imagefolder import SPLIT_SEED, holdout_split, list_files
    from shared.data.layout import plan_layout

    root = Path(ref["path"])
    layout = plan_layout(list_files(root))
    train, test = (layout.train, layout.test) if layout.test else holdout_split(layout.train)
    rng = np.random.default_rng(SPLIT_SEED)
    train = [train[i] for i in rng.permutation(len(train))]
    test = [test[i] for i in rng.permutation(len(test))]
    if [c for _, c in train] != dataset.train_labels.tolist():
        raise RuntimeError("the training rows could not be matched to their files (the ImageFolder loader's "
                           "order changed); update workers/poison_scanner/patchsearch/inputs.py")
    return TrainingSet(dataset, root, [p for p, _ in train], [p for p, _ in test])


def under_train(path: str) -> str:
    """``[prefix/]train/a/b.png`` and ``a/b.png`` -> ``a/b.png`` (manifest paths are relative to ``train/``)."""
    p = path.replace("\\", "/").lstrip("/")
    head, sep, rest = p.partition("train/")
    return rest if sep and (not head or head.endswith("/")) else p


@dataclass
class GroundTruth:
    poisoned: np.ndarray  # bool per training row
    manifest: PoisonManifest
    unmatched: int  # manifest entries naming no training row (e.g. removed earlier)


def read_manifest(training: TrainingSet) -> tuple[GroundTruth | None, str]:
    """The poison manifest at the dataset root, as a per-row mask; or None and the reason there is none."""
    if training.root is None or training.paths is None:
        return None, "the dataset is a builtin set without files, so it has no poison manifest"
    path = training.root / MANIFEST_FILE
    if not path.is_file():
        return None, f"the dataset has no {MANIFEST_FILE} at its root (ground truth is never guessed from names)"
    try:
        manifest = PoisonManifest.load(path)
    except (ValueError, OSError) as exc:  # pydantic's ValidationError is a ValueError
        raise JobConfigError(f"{MANIFEST_FILE} at the dataset root is not a poison manifest (format version 1 "
                             f"of shared.specs.poison.PoisonManifest): {exc}") from exc
    listed = manifest.poisoned
    wanted = {under_train(p) for p in listed}
    rows = [under_train(p) for p in training.paths]
    mask = np.fromiter((r in wanted for r in rows), dtype=bool, count=len(rows))
    return GroundTruth(mask, manifest, len(wanted - set(rows))), ""
