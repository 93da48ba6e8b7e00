"""Uploaded image archives: inspect (validate + summarise) and extract safely.

An archive is accepted only if it is one of the documented formats (tar, tar.gz, zip: recognised by content,
bz2/xz are refused), *every* entry is safe (relative path, no ``..``, no links or device files), it stays under
the file-count, unpacked-size and compression-ratio limits, every image decodes (PIL ``verify``), and the
images form an ImageFolder layout:

* ``train/<class>/...`` with an optional ``test/<class>/...`` (or ``val/<class>/...``), or
* ``<class>/...`` at the root (no test split: loaders hold out ~20% per class),

optionally inside one wrapping top-level directory (``mydata/train/cat/1.png``). Junk that archivers
add (``__MACOSX/``, dot-files such as ``.DS_Store``, ``Thumbs.db``) is ignored, as are non-image files
outside class folders (a README at the root). A non-image file *inside* a class folder is an error: it
was probably meant to be data.

Inspection reads the archive once, front to back, and stops at the first entry that is unsafe, too large or
an image that does not decode (anywhere but in junk), so a hostile upload costs at most what it took to reach
its first bad entry. Sizes are checked from the entry headers *before* the entry's data is read or skipped.

``extract_archive`` re-inspects, then writes only the accepted images, itself, into a canonical
``dest/train/<class>/...`` (+ ``dest/test/<class>/...``) tree: no ``extractall``, so no link is ever
created or followed and nothing outside ``dest`` is written.
"""

from __future__ import annotations

import io
import re
import shutil
import stat
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
PIL_FORMATS = frozenset({"PNG", "JPEG", "MPO", "BMP", "GIF", "WEBP"})  # MPO: multi-picture JPEG
JUNK_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})
TEST_SPLITS = ("test", "val")  # first present wins
DEFAULT_MAX_FILES = 2_000_000
DEFAULT_MAX_UNPACKED_BYTES = 20 * 1024**3
MAX_IMAGE_PIXELS = 64_000_000  # a larger "image" is a decompression bomb, not a training sample
MAX_IMAGE_BYTES = 256 * 1024**2
DEFAULT_MAX_RATIO = 100.0  # unpacked bytes per archive byte: image archives compress little, bombs a lot
RATIO_FLOOR_BYTES = 64 * 1024**2  # below this much unpacked data the ratio is not checked (tiny archives)
_COPY_CHUNK = 1024 * 1024
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


@dataclass
class ArchiveReport:
    format: str
    num_images: int
    classes: list[str]
    splits: dict[str, int]  # images per split found in the archive: {"train": n} or {"train": n, "test": m}
    class_counts: dict[str, dict[str, int]]  # split -> class -> count, as found
    num_train: int  # training images a loader will use (after the ~20% hold-out when there is no test split)
    num_test: int
    unpacked_bytes: int
    num_files: int
    has_test_split: bool
    ignored: list[str] = field(default_factory=list)  # first few ignored names (junk, READMEs, ...)
    num_ignored: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- paths and layout ----------------------------------------------------------------------------

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


# --- reading archives ----------------------------------------------------------------------------

_UNSUPPORTED_MAGIC = {b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"7z\xbc\xaf\x27\x1c": "7z", b"Rar!": "rar",
                      b"\x28\xb5\x2f\xfd": "zstd"}
_TarMode = Literal["r:", "r:gz"]
_TAR_MODES: dict[str, _TarMode] = {"tar": "r:", "tar.gz": "r:gz"}
_TRAILER_BYTES = 64 * 1024
_CORRUPT = (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError)


def detect_format(path: Path) -> str:
    """``zip``, ``tar`` or ``tar.gz`` from the file's content (stored blobs have no extension); anything else,
    bz2- and xz-compressed tars included, is refused: only the documented formats are accepted."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        if zipfile.is_zipfile(path):
            return "zip"
        raise ArchiveError("the file starts like a zip archive but is corrupt or truncated (no zip directory); "
                           "re-create and upload it again")
    for magic, what in _UNSUPPORTED_MAGIC.items():
        if head.startswith(magic):
            raise ArchiveError(f"{what}-compressed files are not supported; upload a .tar, .tar.gz/.tgz or .zip")
    if head.startswith(b"\x1f\x8b"):
        if _is_tar(path, "r:gz"):
            return "tar.gz"
        raise ArchiveError("a gzip-compressed file that does not contain a tar archive; upload a .tar, "
                           ".tar.gz/.tgz or .zip")
    if head[257:262] == b"ustar" or _is_tar(path, "r:"):
        return "tar"
    raise ArchiveError("unsupported archive format; upload a .tar, .tar.gz/.tgz or .zip of an ImageFolder tree")


def _is_tar(path: Path, mode: _TarMode) -> bool:
    try:
        with tarfile.open(path, mode) as tf:  # reads the first header only
            return tf.next() is not None
    except _CORRUPT:
        return False


@dataclass(frozen=True)
class _Entry:
    path: str  # normalised relative path
    size: int
    is_dir: bool


def _iter_entries(path: Path, fmt: str) -> Iterator[tuple[_Entry, Any]]:
    """Yield ``(entry, open_fn)`` in archive order, rejecting unsafe entries as they are met.

    ``open_fn()`` returns a binary stream of a regular file's bytes; it is valid only until the next
    entry (tar archives are read as one forward stream, which keeps .tar.gz cheap).
    """
    try:
        yield from _iter_raw(path, fmt)
    except ArchiveError:
        raise
    except _CORRUPT as exc:  # corrupt deflate, a bad zip directory, a truncated tar: the archive, not us
        raise ArchiveError(f"the archive is corrupt or truncated ({type(exc).__name__}: {str(exc)[:120]}); "
                           "re-create and upload it again") from exc


def _iter_raw(path: Path, fmt: str) -> Iterator[tuple[_Entry, Any]]:
    if fmt == "zip":
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                name = safe_relpath(info.filename)
                kind = stat.S_IFMT(info.external_attr >> 16)
                if kind == stat.S_IFLNK:
                    raise ArchiveError(f"entry {info.filename!r} is a symbolic link; links are not allowed")
                if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                    raise ArchiveError(f"entry {info.filename!r} is a special file (device/fifo); not allowed")
                if info.flag_bits & 0x1:
                    raise ArchiveError(f"entry {info.filename!r} is encrypted; upload an unencrypted archive")
                is_dir = info.is_dir() or kind == stat.S_IFDIR
                yield _Entry(name, 0 if is_dir else info.file_size, is_dir), (lambda i=info: zf.open(i))
        return
    if fmt not in _TAR_MODES:
        raise ArchiveError(f"unsupported archive format {fmt!r}; upload a .tar, .tar.gz/.tgz or .zip")
    with tarfile.open(path, _TAR_MODES[fmt]) as tf:
        for m in tf:
            name = safe_relpath(m.name)
            if m.issym() or m.islnk():
                raise ArchiveError(f"entry {m.name!r} is a {'symbolic' if m.issym() else 'hard'} link; "
                                   "links are not allowed")
            if m.ischr() or m.isblk() or m.isfifo() or m.isdev():
                raise ArchiveError(f"entry {m.name!r} is a device or fifo; not allowed")
            if not (m.isfile() or m.isdir()):
                raise ArchiveError(f"entry {m.name!r} has an unsupported tar entry type {m.type!r}")
            yield _Entry(name, m.size if m.isfile() else 0, m.isdir()), (lambda m=m: tf.extractfile(m))
        # tarfile ends quietly at the first header it cannot parse, so a corrupt stream could pass for a shorter
        # archive: what follows the end must be zero padding (a few kB; more is not read).
        assert tf.fileobj is not None
        if tf.fileobj.read(_TRAILER_BYTES).strip(b"\0"):
            raise ArchiveError("the archive has data after its last readable entry (a corrupt or truncated "
                               "header); re-create and upload it again")


def _verify_image(name: str, size: int, open_fn: Any) -> str | None:
    """None when the file decodes as one of the allowed formats, else the reason it does not."""
    if size > MAX_IMAGE_BYTES:
        return f"{name!r} is {size / 1024**2:.0f} MiB, too large for a training image"
    try:
        with open_fn() as src:
            data = src.read(MAX_IMAGE_BYTES + 1)
    except _CORRUPT as exc:  # the archive's own compression is broken, not just this image
        raise ArchiveError(f"the archive is corrupt at {name!r} ({type(exc).__name__}: {str(exc)[:120]}); "
                           "re-create and upload it again") from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=["PNG", "JPEG", "BMP", "GIF", "WEBP"]) as im:
                if im.format not in PIL_FORMATS:
                    return f"{name!r} is a {im.format} file; allowed: png, jpeg, bmp, gif, webp"
                if im.size[0] * im.size[1] > MAX_IMAGE_PIXELS:
                    return f"{name!r} is {im.size[0]}x{im.size[1]} pixels, too large for a training image"
                im.verify()
    except UnidentifiedImageError:
        return f"{name!r} is not a readable image (not png, jpeg, bmp, gif or webp data)"
    except Exception as exc:  # PIL raises many types for bad data; all mean "not a usable image"
        return f"{name!r} is not a readable image ({type(exc).__name__}: {exc})"
    return None


def _scan(path: Path, max_files: int, max_unpacked_bytes: int,
          max_ratio: float = DEFAULT_MAX_RATIO) -> tuple[ArchiveReport, Layout]:
    path = Path(path)
    fmt = detect_format(path)
    ratio_budget = max(RATIO_FLOOR_BYTES, max_ratio * path.stat().st_size)
    names: list[str] = []
    entries = unpacked = 0
    for entry, open_fn in _iter_entries(path, fmt):
        entries += 1
        if entries > max_files:
            raise ArchiveError(f"the archive has more than {max_files:,} entries (files and folders); the "
                               "limit is there to protect the workers - split the dataset or ask for a higher limit")
        if entry.is_dir or not entry.path:
            continue
        unpacked += entry.size
        if unpacked > max_unpacked_bytes:
            raise ArchiveError(f"the archive unpacks to more than {max_unpacked_bytes / 1024**3:.2f} GiB; "
                               "resize the images or split the dataset")
        if unpacked > ratio_budget:
            raise ArchiveError(f"the archive unpacks to more than {max_ratio:g} times its own size (at "
                               f"{entry.path!r}); that is a compression bomb, not an image dataset")
        names.append(entry.path)
        if is_image_name(entry.path) and not is_junk(entry.path):
            reason = _verify_image(entry.path, entry.size, open_fn)
            if reason:  # stop here: nothing after the first bad image is worth reading
                raise ArchiveError(reason)
    layout = plan_layout(names)
    counts: dict[str, dict[str, int]] = {"train": {}, "test": {}}
    for split, items in (("train", layout.train), ("test", layout.test)):
        for _, c in items:
            counts[split][layout.classes[c]] = counts[split].get(layout.classes[c], 0) + 1
    splits = {"train": len(layout.train)} | ({"test": len(layout.test)} if layout.test_split else {})
    num_test = len(layout.test) if layout.test_split else sum(holdout_size(n) for n in counts["train"].values())
    if not layout.test_split:
        del counts["test"]
    report = ArchiveReport(
        format=fmt, num_images=len(layout.train) + len(layout.test), classes=layout.classes,
        splits=splits, class_counts=counts, num_train=len(layout.train) + len(layout.test) - num_test,
        num_test=num_test,
        unpacked_bytes=unpacked, num_files=len(names), has_test_split=layout.test_split is not None,
        ignored=layout.ignored[:20], num_ignored=len(layout.ignored),
    )
    return report, layout


def inspect_archive(path: str | Path, *, max_files: int = DEFAULT_MAX_FILES,
                    max_unpacked_bytes: int = DEFAULT_MAX_UNPACKED_BYTES,
                    max_ratio: float = DEFAULT_MAX_RATIO) -> ArchiveReport:
    """Validate an uploaded archive and summarise it; raises ArchiveError with the reason to reject it.

    Reads the archive once, up to its first bad entry (every image is decoded far enough for PIL to verify it).
    ``max_ratio`` bounds unpacked bytes per archive byte (above 64 MiB unpacked).
    """
    return _scan(Path(path), max_files, max_unpacked_bytes, max_ratio)[0]


def extract_archive(path: str | Path, dest: str | Path, *, max_files: int = DEFAULT_MAX_FILES,
                    max_unpacked_bytes: int = DEFAULT_MAX_UNPACKED_BYTES,
                    max_ratio: float = float("inf")) -> ArchiveReport:
    """Inspect, then extract the accepted images into ``dest/train/<class>/...`` (+ ``dest/test/...``).

    ``dest`` must be missing or empty. Files are written one by one from their archive streams (never
    ``extractall``), to paths built from validated names and checked to stay under ``dest``. The byte
    limit is enforced again on the bytes actually written, so an entry lying about its size cannot
    overflow the disk. On any error the partial output is removed.
    """
    # No ratio limit here by default: the upload was inspected under the operator's limit (which may be above
    # the default), and the bytes actually written are bounded below.
    report, layout = _scan(Path(path), max_files, max_unpacked_bytes, max_ratio)
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise ArchiveError(f"extraction folder {dest} is not empty")
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    targets = {p: f"{split}/{layout.classes[c]}/{_inner(p, layout)}"
               for split, items in (("train", layout.train), ("test", layout.test)) for p, c in items}
    targets.update({p: p.rsplit("/", 1)[-1] for p in layout.sidecars})
    written = 0
    try:
        for entry, open_fn in _iter_entries(Path(path), report.format):
            target = targets.get(entry.path)
            if target is None:
                continue
            out = (root / target).resolve()
            if not out.is_relative_to(root):  # defence in depth: names were already validated
                raise ArchiveError(f"entry {entry.path!r} would be written outside the dataset folder")
            out.parent.mkdir(parents=True, exist_ok=True)
            with open_fn() as src, open(out, "wb") as dst:
                written += _copy_limited(src, dst, max_unpacked_bytes - written, entry.path)
    except BaseException:
        for sub in ("train", "test"):
            shutil.rmtree(root / sub, ignore_errors=True)
        for p in layout.sidecars:
            (root / p.rsplit("/", 1)[-1]).unlink(missing_ok=True)
        raise
    return report


def _inner(full: str, layout: Layout) -> str:
    """``[prefix][train|test|val/]<class>/<rest>`` -> ``<rest>`` (the path below the class folder)."""
    parts = full[len(layout.prefix):].split("/")
    return "/".join(parts[2:] if layout.split_layout else parts[1:])


def _copy_limited(src: IO[bytes], dst: IO[bytes], budget: int, name: str) -> int:
    n = 0
    while chunk := src.read(_COPY_CHUNK):
        n += len(chunk)
        if n > budget:
            raise ArchiveError(f"{name!r} unpacks to more bytes than declared; the archive is rejected")
        dst.write(chunk)
    return n
