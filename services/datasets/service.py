"""Datasets: validated uploads (archives) and registered object-store prefixes, named and versioned."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.datasets import storage
from services.errors import Conflict, Invalid, NotFound, Unavailable
from shared.config import get_settings
from shared.datasets import VersionTaken, archive_stats, record_dataset
from shared.models import Artifact, Dataset
from shared.storage import CAS_PREFIX, ObjectStore, sha256_file

log = logging.getLogger("crucible.datasets")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
MAX_VERSION = 2**31 - 1  # datasets.version is a 32-bit integer column
_VERSION_RE = re.compile(r"[0-9]{1,10}")
# Said for a forbidden location and for a missing one alike: a caller cannot tell them apart.
UNKNOWN_LOCATION = ("no dataset location {uri} is available to this project: an operator grants prefixes with "
                    "`crucible admin grant-storage PROJECT s3://bucket/prefix/`, and the prefix must hold "
                    "<class>/<image> (or train/<class>/<image>) files")
# Upload formats (the `format` form field): "images" is an ImageFolder archive; "captioned" adds captions.jsonl
# (shared/data/captions.py); "text" is a corpus (shared/data/corpus.py).
FORMATS: tuple[str, ...] = ("images", "captioned", "text")
_inspections: threading.BoundedSemaphore | None = None
_inspections_lock = threading.Lock()


def resolve_ref(*, session: Session, project_id: uuid.UUID, ref: str) -> dict[str, Any]:
    """Turn a spec's dataset reference into the exact input a worker materialises (pinned at submit)."""
    if ref.startswith("builtin://"):
        from shared.data import builtin_info

        return {"uri": ref, "name": ref, "stats": builtin_info(ref.removeprefix("builtin://"))}
    ds = get(session=session, project_id=project_id, ref=ref, loc=["body", "dataset"])
    art = session.get(Artifact, ds.artifact_id)
    assert art is not None
    if ds.source == "prefix" and not storage.may_register(
            session=session, project_id=project_id, location=storage.Location(art.bucket, art.key)):
        # the grant was withdrawn (or narrowed) after registration: no new job may read the prefix
        raise NotFound(UNKNOWN_LOCATION.format(uri=art.uri), loc=["body", "dataset"])
    out: dict[str, Any] = {"uri": f"dataset://{ds.id}", "dataset_id": str(ds.id), "name": ds.name,
                           "version": ds.version, "artifact_id": str(art.id), "source": ds.source,
                           "bucket": art.bucket, "sha256": art.sha256, "stats": ds.stats}
    out["key" if ds.source == "archive" else "prefix"] = art.key
    if art.meta.get("format"):
        out["format"] = art.meta["format"]  # how the worker materialises it (absent: an ImageFolder)
    return out


def get(*, session: Session, project_id: uuid.UUID, ref: str, loc: list[str | int] | None = None) -> Dataset:
    """A dataset by id, ``name`` (latest version) or ``name@version``, within the project."""
    stmt = select(Dataset).where(Dataset.project_id == project_id)
    ds: Dataset | None
    try:
        ds = session.scalars(stmt.where(Dataset.id == uuid.UUID(ref))).first()
    except ValueError:
        name, sep, version = ref.partition("@")
        stmt = stmt.where(Dataset.name == name)
        if sep:
            if not _VERSION_RE.fullmatch(version) or not 1 <= int(version) <= MAX_VERSION:
                raise Invalid(f"dataset version must be a number from 1 to {MAX_VERSION}, got {version[:20]!r}",
                              loc=loc or ["path", "dataset"]) from None
            stmt = stmt.where(Dataset.version == int(version))
        ds = session.scalars(stmt.order_by(Dataset.version.desc())).first()
    if ds is None:
        raise NotFound(f"dataset {ref[:200]!r} not found in this project; upload it with `crucible datasets upload` or "
                       "use builtin://mnist, builtin://digits or builtin://shapes", loc=loc or ["path", "dataset"])
    return ds


def list_datasets(*, session: Session, project_id: uuid.UUID) -> list[Dataset]:
    return list(session.scalars(select(Dataset).where(Dataset.project_id == project_id)
                                .order_by(Dataset.name, Dataset.version)))


def upload_archive(*, session: Session, project_id: uuid.UUID, name: str, path: Path, filename: str,
                   store: ObjectStore, format: str = "images") -> Dataset:
    """Validate an ImageFolder archive, store it (content-addressed) and record it. Nothing is stored or
    written unless every check passes; a failed DB write removes the object it just stored."""
    from shared.data.archives import inspect_archive
    from shared.data.layout import ArchiveError

    settings = get_settings()
    lowered = filename.lower()
    if not lowered.endswith((".tar", ".tar.gz", ".tgz", ".zip")):
        raise Invalid(f"unsupported archive {filename!r}: upload a .tar, .tar.gz/.tgz or .zip of an ImageFolder tree",
                      loc=["body", "file"])
    with _inspection_slot():
        try:
            report = inspect_archive(path, max_files=settings.MAX_ARCHIVE_FILES,
                                     max_unpacked_bytes=settings.MAX_ARCHIVE_UNPACKED_BYTES,
                                     max_ratio=settings.MAX_ARCHIVE_RATIO)
        except ArchiveError as e:
            raise Invalid(f"archive rejected: {e}", loc=["body", "file"]) from None
        extra_stats = _format_stats(format, path)
    return _store_and_record(session, store, path, project_id=project_id, name=name,
                             stats=archive_stats(report) | extra_stats,
                             meta={"filename": filename} | ({"format": format} if format != "images" else {}))


def _store_and_record(session: Session, store: ObjectStore, path: Path, *, project_id: uuid.UUID, name: str,
                      stats: dict[str, Any], meta: dict[str, Any]) -> Dataset:
    """Store a validated upload content-addressed and record it as the next version of ``name``; if recording
    fails the object is removed again unless it was there before or another row uses it (no orphans)."""
    digest = sha256_file(path)
    already_stored = store.exists(CAS_PREFIX + digest)
    obj = store.put_file(path, sha256=digest)
    try:
        ds = _record(session, project_id=project_id, name=name, source="archive", bucket=obj.bucket, key=obj.key,
                     sha256=digest, size=obj.size, stats=stats, meta=meta)
        session.commit()
    except BaseException:
        session.rollback()
        if not already_stored and not _referenced(session, obj.key):
            store.remove(obj.key)
        raise
    return ds


def _format_stats(format: str, path: Path) -> dict[str, Any]:
    """Checks of the format beyond the image layout, and the stats they add; Invalid (422) names the problem."""
    if format == "captioned":
        from shared.data.captions import CaptionError, validate_archive_captions

        try:
            return validate_archive_captions(path)
        except CaptionError as e:
            raise Invalid(f"captions rejected: {e}", loc=["body", "file"]) from None
    return {}


def upload_text(*, session: Session, project_id: uuid.UUID, name: str, path: Path, filename: str,
                store: ObjectStore) -> Dataset:
    """Validate a text corpus (``shared.data.corpus``: JSONL or an archive of .txt files) and store its canonical
    JSONL (every document with its split decided). Nothing is stored unless it validates."""
    import tempfile

    from shared.data.corpus import CorpusError, canonical_jsonl, read_upload

    settings = get_settings()
    with _inspection_slot():
        try:
            report = read_upload(path, filename, max_files=settings.MAX_ARCHIVE_FILES,
                                 max_unpacked_bytes=settings.MAX_ARCHIVE_UNPACKED_BYTES)
        except CorpusError as e:
            raise Invalid(f"text corpus rejected: {e}", loc=["body", "file"]) from None
    with tempfile.TemporaryDirectory(prefix="crucible-corpus-") as tmp:
        canonical = Path(tmp) / "corpus.jsonl"
        canonical.write_bytes(canonical_jsonl(report.corpus))
        return _store_and_record(session, store, canonical, project_id=project_id, name=name,
                                 stats=report.stats(), meta={"filename": filename, "format": "text"})


# Inspecting an archive decodes every image: a CPU-bound few seconds per upload. Bounded per process, so a
# burst of uploads queues briefly and then gets 503 instead of starving every other request.
INSPECTION_WAIT_S = 10.0


@contextmanager
def _inspection_slot() -> Iterator[None]:
    global _inspections
    with _inspections_lock:
        if _inspections is None:
            _inspections = threading.BoundedSemaphore(max(1, get_settings().MAX_CONCURRENT_INSPECTIONS))
    slots = _inspections
    if not slots.acquire(timeout=INSPECTION_WAIT_S):
        raise Unavailable("too many dataset uploads are being inspected right now; retry in a few seconds",
                          loc=["body", "file"], retry_after=5)
    try:
        yield
    finally:
        slots.release()


def register_prefix(*, session: Session, project_id: uuid.UUID, name: str, uri: str, store: ObjectStore) -> Dataset:
    """Register an existing ``s3://bucket/prefix/`` ImageFolder tree inside one of the project's storage grants
    (nothing is copied). The listing's digest is pinned: the worker refuses to train on a prefix that changed."""
    from minio.error import S3Error

    try:
        location = storage.parse_location(uri)
    except ValueError as e:
        raise Invalid(str(e), loc=["body", "uri"]) from None
    if not location.prefix:
        raise Invalid("register a prefix inside the bucket (s3://bucket/some/prefix/), not a whole bucket",
                      loc=["body", "uri"])
    unknown = NotFound(UNKNOWN_LOCATION.format(uri=location.uri[:300]), loc=["body", "uri"])
    if not storage.may_register(session=session, project_id=project_id, location=location):
        log.info("project %s may not register %s", project_id, location.uri)
        raise unknown
    limit = get_settings().MAX_ARCHIVE_FILES
    listing: list[tuple[str, int, str]] = []
    try:  # the same (key, size, etag) rows, in the same form, as ObjectStore.list_keys: the worker re-lists
        for o in store.client.list_objects(location.bucket, prefix=location.prefix, recursive=True):
            if o.object_name and not o.is_dir:
                listing.append((o.object_name, o.size or 0, (o.etag or "").strip('"')))
                if len(listing) > 2 * limit:  # stop listing a huge prefix early
                    break
    except S3Error as e:  # S3's own code (NoSuchBucket, AccessDenied) would tell a caller what exists
        log.info("listing %s failed: %s", location.uri, e.code)
        raise unknown from None
    images = [(k, size, etag) for k, size, etag in listing if k.lower().endswith(IMAGE_SUFFIXES)]
    if not images:
        raise unknown
    if len(listing) > 2 * limit or len(images) > limit:
        raise Invalid(f"more than {limit} images under {location.uri}: split the dataset or ask for a higher "
                      "limit", loc=["body", "uri"])
    from collections import Counter

    from shared.data.layout import ArchiveError, holdout_size, plan_layout

    prefix = location.prefix
    try:
        layout = plan_layout([k[len(prefix):] for k, _, _ in images])
    except ArchiveError as e:
        raise Invalid(f"{location.uri} is not an ImageFolder tree: {e}", loc=["body", "uri"]) from None
    digest = listing_digest(listing)
    n_train, n_test = len(layout.train), len(layout.test)
    if layout.test_split is None:  # the loader holds out part of every class as test
        n_test = sum(holdout_size(n) for n in Counter(c for _, c in layout.train).values())
        n_train -= n_test
    stats = {"images": len(images), "train": n_train, "test": n_test,
             "classes": layout.classes, "num_classes": len(layout.classes)}
    try:
        ds = _record(session, project_id=project_id, name=name, source="prefix", bucket=location.bucket,
                     key=prefix, sha256=digest, size=sum(s for _, s, _ in images), stats=stats,
                     meta={"uri": location.uri})
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return ds


def listing_digest(listing: list[tuple[str, int, str]]) -> str:
    """sha256 of a prefix's (key, size, etag) rows; workers/runtime/inputs.py computes the same."""
    return hashlib.sha256(json.dumps(sorted(listing)).encode()).hexdigest()


def _record(session: Session, *, project_id: uuid.UUID, name: str, source: str, bucket: str, key: str,
            sha256: str, size: int, stats: dict[str, Any], meta: dict[str, Any]) -> Dataset:
    try:
        ds, _ = record_dataset(session, project_id=project_id, name=name, source=source, bucket=bucket, key=key,
                               sha256=sha256, size=size, stats=stats, meta=meta)
    except VersionTaken as e:  # a concurrent upload of the same name took this version number first
        raise Conflict(f"another upload of dataset {name!r} finished first (version {e.version}); send yours "
                       "again to make it the next version", loc=["body", "name"]) from None
    return ds


def _referenced(session: Session, key: str) -> bool:
    return session.scalar(select(func.count()).select_from(Artifact).where(Artifact.key == key)) != 0
