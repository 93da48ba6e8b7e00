"""Uploaded image archives: inspect (validate + summarise) and extract safely.

An archive is accepted only if it is one of the documented formats (tar, tar.gz, zip: recognised by content,
bz2/xz are refused), *every* entry is safe (relative path, no ``..``, no links or device files), it stays under
the file-count, unpacked-size and compression-ratio limits, every image decodes (PIL ``verify``), and the
images form an ImageFolder layout (``shared/data/layout.py`` says which trees are accepted).

Inspection reads the archive once, front to back, and stops at the first entry that is unsafe, too large or
an image that does not decode (anywhere but in junk), so a hostile upload costs at most what it took to reach
its first bad entry. Sizes are checked from the entry headers *before* the entry's data is read or skipped.

``extract_archive`` re-inspects, then writes only the accepted images, itself, into a canonical
``dest/train/<class>/...`` (+ ``dest/test/<class>/...``) tree, and the root's sidecar files beside it:
no ``extractall``, so no link is ever created or followed and nothing outside ``dest`` is written.
"""

from __future__ import annotations

import io
import shutil
import stat
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from PIL import Image, UnidentifiedImageError

from shared.data.layout import ArchiveError, Layout, holdout_size, is_image_name, is_junk, plan_layout, safe_relpath

PIL_FORMATS = frozenset({"PNG", "JPEG", "MPO", "BMP", "GIF", "WEBP"})  # MPO: multi-picture JPEG
DEFAULT_MAX_FILES = 2_000_000
DEFAULT_MAX_UNPACKED_BYTES = 20 * 1024**3
MAX_IMAGE_PIXELS = 64_000_000  # a larger "image" is a decompression bomb, not a training sample
MAX_IMAGE_BYTES = 256 * 1024**2
DEFAULT_MAX_RATIO = 100.0  # unpacked bytes per archive byte: image archives compress little, bombs a lot
RATIO_FLOOR_BYTES = 64 * 1024**2  # below this much unpacked data the ratio is not checked (tiny archives)
_COPY_CHUNK = 1024 * 1024


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
