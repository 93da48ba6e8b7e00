"""Where the images of an ImageFolder tree are: one set of rules for uploaded archives, registered object-store
prefixes and folders on disk (``plan_layout``), so the three accept and reject exactly the same trees.

* ``train/<class>/...`` with an optional ``test/<class>/...`` (or ``val/<class>/...``), or
* ``<class>/...`` at the root (no test split: loaders hold out ~20% per class),

optionally inside one wrapping top-level directory (``mydata/train/cat/1.png``). Junk that archivers add
(``__MACOSX/``, dot-files such as ``.DS_Store``, ``Thumbs.db``) is ignored. Non-image files at the root (a README,
a manifest, a captions file) are kept as *sidecars*; a non-image file inside a class folder is an error: it was
probably meant to be data.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
JUNK_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})
TEST_SPLITS = ("test", "val")  # first present wins
HOLDOUT_FRACTION = 0.2  # share of every class held out as test when the data has no test split


class ArchiveError(Exception):
    """The archive is rejected; ``reason`` is a human sentence that says what is wrong."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason



@dataclass(frozen=True)
class Layout:
    """Where the images are: ``train``/``test`` hold (path relative to the dataset root, class index)."""

    classes: list[str]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]
    test_split: str | None  # "test", "val" or None (no test split in the data)
    prefix: str  # stripped wrapping directory ("" when none), e.g. "mydata/"
    split_layout: bool  # train/<class>/... (True) or <class>/... (False)
    ignored: list[str]
    # Non-image files at the dataset root (a manifest, a captions file): extracted beside train/ and test/.
    sidecars: list[str] = field(default_factory=list)



def safe_relpath(name: str) -> str:
    """Normalise an archive member name to ``a/b/c``; raise ArchiveError for unsafe names.

    Backslashes count as separators (zip files made on Windows), so ``..\\evil`` is caught too.
    Returns "" for the archive root itself (``./``).
    """
    if "\x00" in name:
        raise ArchiveError(f"entry {name!r} has a NUL byte in its name")
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        raise ArchiveError(f"entry {name!r} has an absolute path; archive entries must be relative")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"entry {name!r} contains '..', which could write outside the dataset folder")
    return "/".join(parts)


def is_junk(path: str) -> bool:
    """Archiver/OS clutter: ``__MACOSX/``, dot-files and dot-dirs (``.DS_Store``, ``._x.png``), Thumbs.db."""
    return any(p in JUNK_NAMES or p.startswith(".") for p in path.split("/"))


def holdout_size(n: int) -> int:
    """Images of an ``n``-image class held out as test when there is no test split (at least one if n >= 2)."""
    return max(1, round(HOLDOUT_FRACTION * n)) if n >= 2 else 0


def is_image_name(path: str) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def plan_layout(paths: Iterable[str]) -> Layout:
    """Decide the ImageFolder layout of normalised relative file paths (archive or directory)."""
    ignored = sorted(p for p in set(paths) if is_junk(p))
    files = sorted(p for p in set(paths) if not is_junk(p))
    in_dirs = [p for p in files if "/" in p]
    prefix = ""
    tops = {p.split("/", 1)[0] for p in in_dirs}
    if len(tops) == 1:
        top = next(iter(tops))
        # One wrapping directory: strip it when it is not itself a split and it has sub-directories.
        if top not in ("train", *TEST_SPLITS) and any(p.count("/") >= 2 for p in in_dirs):
            prefix = top + "/"
    # Files outside any folder of the (stripped) root: fine if they are READMEs, wrong if images.
    root_files = [p for p in files if not p.startswith(prefix) or "/" not in p[len(prefix):]]
    root_set = set(root_files)
    rel = [p[len(prefix):] for p in files if p not in root_set]
    for p in root_files:
        if is_image_name(p):
            raise ArchiveError(f"image {p!r} is not inside a class folder; use <class>/<image> or "
                               "train/<class>/<image>")
        ignored.append(p)
    sidecars = [p for p in root_files if p.count("/") == prefix.count("/")]

    by_top: dict[str, list[str]] = {}
    for p in rel:
        top, rest = p.split("/", 1)
        by_top.setdefault(top, []).append(rest)

    # split -> [(full path, path inside the split: "<class>/..." )]
    splits: dict[str, list[tuple[str, str]]] = {}
    test_split: str | None = None
    split_layout = "train" in by_top
    if split_layout:
        test_split = next((s for s in TEST_SPLITS if s in by_top), None)
        for split, folder in (("train", "train"), ("test", test_split)):
            if folder is not None:
                splits[split] = [(f"{prefix}{folder}/{rest}", rest) for rest in by_top.pop(folder)]
        ignored += [f"{prefix}{top}/{rest}" for top, rests in by_top.items() for rest in rests]
    else:
        splits["train"] = [(prefix + p, p) for p in rel]

    per_split: dict[str, list[tuple[str, str]]] = {}
    for split, entries in splits.items():
        items = []
        for full, inner in entries:
            if "/" not in inner:  # a file directly in train/ or test/
                if is_image_name(inner):
                    raise ArchiveError(f"image {full!r} is not inside a class folder ({split}/<class>/<image>)")
                ignored.append(full)
            elif not is_image_name(inner):
                raise ArchiveError(f"{full!r} is not an image (allowed extensions: "
                                   f"{', '.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))}); remove it")
            else:
                items.append((full, inner.split("/", 1)[0]))
        per_split[split] = items

    classes = sorted({c for _, c in per_split["train"]})
    if not classes:
        raise ArchiveError("no class folders with images found; expected train/<class>/<image> or "
                           "<class>/<image>")
    if len(classes) < 2:
        raise ArchiveError(f"found a single class folder ({classes[0]!r}); a classification dataset needs at "
                           "least 2 classes")
    unknown = sorted({c for _, c in per_split.get("test", [])} - set(classes))
    if unknown:
        raise ArchiveError(f"test classes {unknown} have no training images; every test class needs a "
                           "train/<class> folder")
    index = {c: i for i, c in enumerate(classes)}
    return Layout(
        classes=classes,
        train=[(p, index[c]) for p, c in per_split["train"]],
        test=[(p, index[c]) for p, c in per_split.get("test", [])],
        test_split=test_split, prefix=prefix, split_layout=split_layout, ignored=sorted(ignored),
        sidecars=sidecars,
    )
