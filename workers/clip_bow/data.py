"""Captioned data for the clip-bow-trainer: ``builtin://scenes`` or an extracted captioned dataset.

Both become a ``CaptionedData``: uint8 images at the job's size, a caption (or None) per image, and label
dimensions for zero-shot evaluation (``labels[attr]`` indexes ``label_names[attr]``, the class names the
prompts are filled with). Scenes have six attributes; an uploaded dataset has ``class`` (its class folders),
plus any ``"attributes"`` its captions file carries (datasets written by ``clip-pseudo-caption`` from scenes).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from shared.data import DatasetError
from shared.data.base import resize_square
from shared.data.captions import CaptionError, CaptionRecord, load_captions
from shared.data.imagefolder import _decode, holdout_split, list_files
from shared.data.layout import ArchiveError, plan_layout


@dataclass
class Split:
    images: np.ndarray
    captions: list[str | None]
    labels: dict[str, np.ndarray]
    paths: list[str] = field(default_factory=list)  # relative image paths (uploaded datasets)
    pseudo: list[bool] = field(default_factory=list)  # caption written by clip-pseudo-caption

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: np.ndarray) -> Split:
        return Split(self.images[idx], [self.captions[i] for i in idx], {k: v[idx] for k, v in self.labels.items()},
                     [self.paths[i] for i in idx] if self.paths else [],
                     [self.pseudo[i] for i in idx] if self.pseudo else [])


@dataclass
class CaptionedData:
    train: Split
    test: Split
    label_names: dict[str, list[str]]
    name: str

    def drop_captions(self, captioned_fraction: float, seed: int) -> CaptionedData:
        """Keep the captions of a seeded share of the captioned training images (the rest become uncaptioned)."""
        if captioned_fraction >= 1.0:
            return self
        rng = np.random.default_rng([seed, 0xCAF])
        keep = rng.random(len(self.train)) < captioned_fraction
        caps = [c if k else None for c, k in zip(self.train.captions, keep, strict=True)]
        return replace(self, train=replace(self.train, captions=caps))


def scene_label_names() -> dict[str, list[str]]:
    from shared.data import scenes

    return {"shape": [scenes.SHAPE_WORDS[s][0] for s in scenes.SHAPES], "colour": list(scenes.COLOURS),
            "size": list(scenes.SIZES), "position": list(scenes.POSITIONS), "texture": list(scenes.TEXTURES),
            "count": [scenes.COUNT_WORDS[c][0] for c in scenes.COUNTS]}


def _scenes(image_size: int) -> CaptionedData:
    from shared.data import scenes

    def split(name: str) -> Split:
        s = scenes.load_split(name)
        return Split(resize_square(np.asarray(s.images), image_size), list(s.captions),
                     {k: v.copy() for k, v in s.attributes.items()})

    return CaptionedData(split("train"), split("test"), scene_label_names(), "scenes")


def _folder(root: Path, image_size: int, name: str) -> CaptionedData:
    try:
        layout = plan_layout(list_files(root))
        records = load_captions(root)
    except (ArchiveError, CaptionError) as e:
        raise DatasetError(f"{root}: {e}") from e
    train, test = (layout.train, layout.test) if layout.test else holdout_split(layout.train)
    extra_dims = _attribute_dims(records)
    label_names: dict[str, list[str]] = {"class": list(layout.classes), **extra_dims}

    def split(items: list[tuple[str, int]]) -> Split:
        images, classes = _decode(root, items, image_size)
        recs = [records.get(p) for p, _ in items]
        labels = {"class": classes}
        for dim, names in extra_dims.items():
            labels[dim] = np.array([names.index(str((r.extra.get("attributes") or {}).get(dim)))
                                    if r is not None and dim in (r.extra.get("attributes") or {}) else -1
                                    for r in recs], dtype=np.int64)
        return Split(images, [r.caption if r else None for r in recs], labels, [p for p, _ in items],
                     [bool(r and r.extra.get("pseudo")) for r in recs])

    return CaptionedData(split(train), split(test), label_names, name)


def _attribute_dims(records: dict[str, CaptionRecord]) -> dict[str, list[str]]:
    """Label dimensions from the captions' ``"attributes"`` objects (class names sorted; scenes keep their order)."""
    values: dict[str, set[str]] = {}
    for r in records.values():
        attrs = r.extra.get("attributes")
        if isinstance(attrs, dict):
            for k, v in attrs.items():
                values.setdefault(str(k), set()).add(str(v))
    known = scene_label_names()
    return {k: (known[k] if k in known and vs <= set(known[k]) else sorted(vs)) for k, vs in values.items()}


def load_captioned(ref: dict[str, Any], *, image_size: int, limit_train: int | None = None,
                   limit_test: int | None = None) -> CaptionedData:
    """A job's captioned dataset input (see the module docstring); raises ``DatasetError``."""
    if ref.get("path"):
        data = _folder(Path(ref["path"]), image_size, str(ref.get("name") or ref.get("uri")))
    elif str(ref.get("uri", "")) == "builtin://scenes":
        data = _scenes(image_size)
    else:
        raise DatasetError(f"{ref.get('uri')!r} is not a captioned dataset: use builtin://scenes or a dataset "
                           "uploaded with format=captioned")
    if limit_train:
        data = replace(data, train=data.train.subset(np.arange(min(limit_train, len(data.train)))))
    if limit_test:
        data = replace(data, test=data.test.subset(np.arange(min(limit_test, len(data.test)))))
    return data


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images[:4000].reshape(-1, 3).astype(np.float64) / 255.0
    return tuple(float(v) for v in x.mean(0)), tuple(float(max(v, 1e-3)) for v in x.std(0))
