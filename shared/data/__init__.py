"""Datasets for the vision workers, importable without torch (the API server validates specs with it).

* ``load_dataset(ref, image_size=...)`` - a job's dataset input -> ``ImageDataset`` (uint8 arrays);
* ``builtin_info(name)`` - sizes of a builtin set without decoding anything (submit-time checks);
* ``archives`` - inspect / safely extract uploaded ImageFolder archives.
"""

from __future__ import annotations

from typing import Any

from shared.data.archives import ArchiveReport, extract_archive, inspect_archive
from shared.data.base import DatasetError, ImageDataset
from shared.data.builtin import BUILTIN_INFO, builtin_name, load_builtin
from shared.data.layout import ArchiveError


def builtin_info(name: str) -> dict[str, int]:
    """``{"train", "test", "num_classes"}`` of ``"shapes"`` / ``"builtin://shapes"``; cheap (no decoding)."""
    return dict(BUILTIN_INFO[builtin_name(name)])


def load_dataset(ref: dict[str, Any], *, image_size: int, limit_train: int | None = None,
                 limit_test: int | None = None) -> ImageDataset:
    """Load a job's dataset input.

    Args:
        ref: ``{"uri": "builtin://<name>"}``, or ``{"uri": ..., "path": "/abs/extracted/dir"}`` for an
            uploaded dataset the worker has already extracted (an ImageFolder tree).
        image_size: side of the square uint8 images returned.
        limit_train / limit_test: keep only the first N images of each split (order is class-mixed).

    Raises:
        DatasetError: unknown builtin, missing folder, bad layout or undecodable image.
    """
    for label, n in (("limit_train", limit_train), ("limit_test", limit_test)):
        if n is not None and n < 1:
            raise DatasetError(f"{label} must be >= 1, got {n}")
    if ref.get("path"):
        from shared.data.imagefolder import load_image_folder

        return load_image_folder(ref["path"], image_size=image_size, limit_train=limit_train,
                                 limit_test=limit_test, name=ref.get("name") or ref.get("uri"))
    uri = str(ref.get("uri", ""))
    if uri.startswith("builtin://"):
        return load_builtin(uri, image_size=image_size, limit_train=limit_train, limit_test=limit_test)
    raise DatasetError(f"dataset input {ref!r} has neither a builtin:// uri nor a 'path' to an extracted "
                       "folder; the worker must extract uploaded datasets before the method runs")


__all__ = [
    "ArchiveError", "ArchiveReport", "DatasetError", "ImageDataset", "builtin_info", "extract_archive",
    "inspect_archive", "load_dataset",
]
