"""Captioned image datasets (format ``"captioned"``): an ImageFolder archive plus ``captions.jsonl`` at its root.

The captions file has one JSON object per line, ``{"image": "<path>", "caption": "<text>"}``; ``<path>`` names an
image of the archive relative to its root (``train/cat/1.png``, or ``cat/1.png`` for a root-class layout; a
wrapping top-level folder may be included or left out). Extra keys are kept (e.g. ``"pseudo": true`` on
pseudo-captions, ``"attributes"`` on generated scenes). Images without a line are allowed: they are the
uncaptioned images pseudo-captioning is for. Blank lines are skipped.

Rejected, with the line number and the reason (the API answers 422 and stores nothing):

* a line that is not UTF-8, not JSON, or not an object with string ``image`` and ``caption``;
* an empty (or whitespace-only) caption;
* an ``image`` that is not an image of the archive, or one captioned twice.

The image layout itself is checked by ``shared.data.archives`` (safety, decoding, classes); the class folders
are labels the zero-shot evaluation can use. Importable without torch (the API server validates with it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CAPTIONS_FILE = "captions.jsonl"
MAX_CAPTIONS_BYTES = 256 * 1024**2
MAX_CAPTION_CHARS = 10_000


class CaptionError(ValueError):
    """A captions file is rejected; ``line`` is 1-based (0: the file as a whole)."""

    def __init__(self, line: int, reason: str) -> None:
        self.line, self.reason = line, reason
        where = f"{CAPTIONS_FILE} line {line}" if line else CAPTIONS_FILE
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class CaptionRecord:
    image: str  # path as written in the file (normalised to a/b/c)
    caption: str
    extra: dict[str, Any]


def _norm(path: str) -> str:
    return "/".join(p for p in path.replace("\\", "/").split("/") if p not in ("", "."))


def parse_captions(data: bytes, *, images: set[str] | None = None) -> list[CaptionRecord]:
    """Parse and validate a captions file.

    Args:
        data: the raw bytes of ``captions.jsonl``.
        images: the image paths that exist (normalised, relative to the dataset root); None skips that check.

    Raises:
        CaptionError: the first bad line, with the reason.
    """
    records: list[CaptionRecord] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CaptionError(number, f"not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise CaptionError(number, f"not a JSON object ({e.msg}); write one "
                                       '{"image": "...", "caption": "..."} object per line (JSONL)') from None
        if not isinstance(obj, dict):
            raise CaptionError(number, 'expected a JSON object {"image": "...", "caption": "..."}')
        image, caption = obj.get("image"), obj.get("caption")
        if not isinstance(image, str) or not image.strip():
            raise CaptionError(number, "'image' must be the path of an image in the archive (a string)")
        if not isinstance(caption, str):
            raise CaptionError(number, "'caption' must be a string")
        if not caption.strip():
            raise CaptionError(number, f"the caption of {image[:200]!r} is empty; leave the image out of the "
                                       "file instead (images without captions are allowed)")
        if len(caption) > MAX_CAPTION_CHARS:
            raise CaptionError(number, f"the caption is longer than {MAX_CAPTION_CHARS} characters")
        path = _norm(image)
        if images is not None and path not in images:
            raise CaptionError(number, f"image {image[:200]!r} is not in the archive")
        if path in seen:
            raise CaptionError(number, f"image {image[:200]!r} is captioned twice (first on line {seen[path]})")
        seen[path] = number
        extra = {k: v for k, v in obj.items() if k not in ("image", "caption")}
        records.append(CaptionRecord(path, caption.strip(), extra))
    return records


def _archive_captions(path: Path) -> tuple[bytes | None, str, set[str]]:
    """(captions.jsonl bytes or None, where it was found, the archive's image paths)."""
    from shared.data.archives import _iter_entries, detect_format
    from shared.data.layout import is_image_name, is_junk

    images: set[str] = set()
    captions: bytes | None = None
    found_at = ""
    for entry, open_fn in _iter_entries(path, detect_format(path)):
        if entry.is_dir or is_junk(entry.path):
            continue
        if is_image_name(entry.path):
            images.add(entry.path)
        elif entry.path.rsplit("/", 1)[-1] == CAPTIONS_FILE and entry.path.count("/") <= 1:
            if entry.size > MAX_CAPTIONS_BYTES:
                raise CaptionError(0, f"larger than {MAX_CAPTIONS_BYTES // 1024**2} MiB")
            with open_fn() as f:
                captions = f.read(MAX_CAPTIONS_BYTES + 1)
            found_at = entry.path
    return captions, found_at, images


def validate_archive_captions(path: Path) -> dict[str, Any]:
    """Check ``captions.jsonl`` of an (already inspected) ImageFolder archive; returns the dataset stats to add.

    Caption paths may be written relative to the archive root or below its wrapping folder.

    Raises:
        CaptionError: no captions file, or a bad line.
    """
    captions, found_at, images = _archive_captions(Path(path))
    if captions is None:
        raise CaptionError(0, f"missing: a captioned dataset needs {CAPTIONS_FILE} at the root of the archive "
                              '(one {"image": "<path in the archive>", "caption": "<text>"} per line)')
    prefix = found_at[:-len(CAPTIONS_FILE)]  # "" or "wrap/"
    known = images | {p[len(prefix):] for p in images if prefix and p.startswith(prefix)}
    records = parse_captions(captions, images=known)
    return {"format": "captioned", "captioned": len(records), "uncaptioned": max(0, len(images) - len(records))}


def _resolve(path: str, files: set[str]) -> str | None:
    """A caption's path in an extracted (canonical ``train|test/<class>/...``) tree."""
    candidates = [path, f"train/{path}", f"test/{path}"]
    parts = path.split("/")
    if len(parts) > 2:  # a wrapping folder, or val/ renamed test/
        rest = "/".join(parts[1:])
        candidates += [rest, f"train/{rest}", f"test/{rest}"]
    return next((c for c in candidates if c in files), None)


def load_captions(root: Path) -> dict[str, CaptionRecord]:
    """Captions of an extracted captioned dataset, keyed by image path relative to ``root``.

    Raises:
        CaptionError: the file is missing or a line names an image that is not there.
    """
    from shared.data.imagefolder import list_files

    root = Path(root)
    file = root / CAPTIONS_FILE
    if not file.is_file():
        raise CaptionError(0, f"missing from {root}: was the dataset uploaded with format=captioned?")
    files = set(list_files(root))
    out: dict[str, CaptionRecord] = {}
    for rec in parse_captions(file.read_bytes()):
        where = _resolve(rec.image, files)
        if where is None:
            raise CaptionError(0, f"image {rec.image!r} is not in {root}")
        out[where] = rec
    return out


def write_captions(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` (each with ``image`` and ``caption``) as JSONL, UTF-8."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
