"""Datasets: validated uploads (archives) and registered object-store prefixes, named and versioned."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.errors import Invalid, NotFound
from shared.config import get_settings
from shared.models import Artifact, Dataset
from shared.storage import CAS_PREFIX, ObjectStore, parse_s3_uri, sha256_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def resolve_ref(*, session: Session, project_id: uuid.UUID, ref: str) -> dict[str, Any]:
    """Turn a spec's dataset reference into the exact input a worker materialises (pinned at submit)."""
    if ref.startswith("builtin://"):
        from shared.data import builtin_info

        return {"uri": ref, "name": ref, "stats": builtin_info(ref.removeprefix("builtin://"))}
    ds = get(session=session, project_id=project_id, ref=ref, loc=["body", "dataset"])
    art = session.get(Artifact, ds.artifact_id)
    assert art is not None
    out: dict[str, Any] = {"uri": f"dataset://{ds.id}", "dataset_id": str(ds.id), "name": ds.name,
                           "version": ds.version, "artifact_id": str(art.id), "source": ds.source,
                           "bucket": art.bucket, "sha256": art.sha256, "stats": ds.stats}
    out["key" if ds.source == "archive" else "prefix"] = art.key
    return out


def get(*, session: Session, project_id: uuid.UUID, ref: str, loc: list[str | int] | None = None) -> Dataset:
    """A dataset by id, ``name`` (latest version) or ``name@version``, within the project."""
    stmt = select(Dataset).where(Dataset.project_id == project_id)
    ds: Dataset | None
    try:
        ds = session.scalars(stmt.where(Dataset.id == uuid.UUID(ref))).first()
    except ValueError:
        name, _, version = ref.partition("@")
        stmt = stmt.where(Dataset.name == name)
        if version:
            if not version.isdigit():
                raise Invalid(f"dataset version must be a number, got {version!r}", loc=loc) from None
            stmt = stmt.where(Dataset.version == int(version))
        ds = session.scalars(stmt.order_by(Dataset.version.desc())).first()
    if ds is None:
        raise NotFound(f"dataset {ref!r} not found in this project; upload it with `crucible datasets upload` or "
                       "use builtin://mnist, builtin://digits or builtin://shapes", loc=loc or ["path", "dataset"])
    return ds


def list_datasets(*, session: Session, project_id: uuid.UUID) -> list[Dataset]:
    return list(session.scalars(select(Dataset).where(Dataset.project_id == project_id)
                                .order_by(Dataset.name, Dataset.version)))


def upload_archive(*, session: Session, project_id: uuid.UUID, name: str, path: Path, filename: str,
                   store: ObjectStore) -> Dataset:
    """Validate an ImageFolder archive, store it (content-addressed) and record it. Nothing is stored or
    written unless every check passes; a failed DB write removes the object it just stored."""
    from shared.data.archives import ArchiveError, inspect_archive

    settings = get_settings()
    lowered = filename.lower()
    if not lowered.endswith((".tar", ".tar.gz", ".tgz", ".zip")):
        raise Invalid(f"unsupported archive {filename!r}: upload a .tar, .tar.gz/.tgz or .zip of an ImageFolder tree",
                      loc=["body", "file"])
    try:
        report = inspect_archive(path, max_files=settings.MAX_ARCHIVE_FILES,
                                 max_unpacked_bytes=settings.MAX_ARCHIVE_UNPACKED_BYTES)
    except ArchiveError as e:
        raise Invalid(f"archive rejected: {e}", loc=["body", "file"]) from None
    digest = sha256_file(path)
    stats = _archive_stats(report)
    already_stored = store.exists(CAS_PREFIX + digest)
    obj = store.put_file(path, sha256=digest)
    try:
        ds = _record(session, project_id=project_id, name=name, source="archive", bucket=obj.bucket, key=obj.key,
                     sha256=digest, size=obj.size, stats=stats, meta={"filename": filename})
        session.commit()
    except BaseException:
        session.rollback()
        if not already_stored and not _referenced(session, obj.key):
            store.remove(obj.key)
        raise
    return ds


def register_prefix(*, session: Session, project_id: uuid.UUID, name: str, uri: str, store: ObjectStore) -> Dataset:
    """Register an existing ``s3://bucket/prefix/`` ImageFolder tree as a dataset (nothing is copied)."""
    try:
        bucket, prefix = parse_s3_uri(uri)
    except ValueError as e:
        raise Invalid(str(e), loc=["body", "uri"]) from None
    if not prefix:
        raise Invalid("register a prefix inside the bucket (s3://bucket/some/prefix/), not a whole bucket",
                      loc=["body", "uri"])
    if bucket == store.bucket and prefix.startswith(CAS_PREFIX.split("/")[0] + "/"):
        raise Invalid("cas/ holds Crucible's own content-addressed objects and cannot be registered",
                      loc=["body", "uri"])
    prefix = prefix.rstrip("/") + "/"
    try:
        listing = store.list_keys(prefix, bucket=bucket)
    except Exception as e:
        raise NotFound(f"cannot list {uri}: {e}", loc=["body", "uri"]) from None
    images = [(k, size, etag) for k, size, etag in listing if k.lower().endswith(IMAGE_SUFFIXES)]
    if not images:
        raise NotFound(f"no images under {uri}; expected <prefix>/<class>/<image> (or train/<class>/...)",
                       loc=["body", "uri"])
    if len(images) > get_settings().MAX_ARCHIVE_FILES:
        raise Invalid(f"{len(images)} images under {uri} exceed the limit of {get_settings().MAX_ARCHIVE_FILES}",
                      loc=["body", "uri"])
    from collections import Counter

    from shared.data.archives import ArchiveError, holdout_size, plan_layout

    try:
        layout = plan_layout([k[len(prefix):] for k, _, _ in images])
    except ArchiveError as e:
        raise Invalid(f"{uri} is not an ImageFolder tree: {e}", loc=["body", "uri"]) from None
    digest = hashlib.sha256(json.dumps(sorted(listing)).encode()).hexdigest()
    n_train, n_test = len(layout.train), len(layout.test)
    if layout.test_split is None:  # the loader holds out part of every class as test
        n_test = sum(holdout_size(n) for n in Counter(c for _, c in layout.train).values())
        n_train -= n_test
    stats = {"images": len(images), "train": n_train, "test": n_test,
             "classes": layout.classes, "num_classes": len(layout.classes)}
    ds = _record(session, project_id=project_id, name=name, source="prefix", bucket=bucket, key=prefix,
                 sha256=digest, size=sum(s for _, s, _ in images), stats=stats, meta={"uri": uri})
    return ds


def _record(session: Session, *, project_id: uuid.UUID, name: str, source: str, bucket: str, key: str,
            sha256: str, size: int, stats: dict[str, Any], meta: dict[str, Any]) -> Dataset:
    latest = session.scalar(select(func.max(Dataset.version)).where(Dataset.project_id == project_id,
                                                                    Dataset.name == name)) or 0
    if latest:
        prev = session.scalars(select(Dataset).where(Dataset.project_id == project_id, Dataset.name == name,
                                                     Dataset.version == latest)).one()
        prev_art = session.get(Artifact, prev.artifact_id)
        if prev_art is not None and prev_art.sha256 == sha256:
            return prev  # uploading the same content again is a no-op, not a new version
    art = Artifact(project_id=project_id, kind="dataset", name=name, bucket=bucket, key=key, sha256=sha256,
                   size_bytes=size, meta={"source": source, **meta})
    session.add(art)
    session.flush()
    ds = Dataset(project_id=project_id, name=name, version=latest + 1, source=source, artifact_id=art.id,
                 stats=stats)
    session.add(ds)
    session.flush()
    return ds


def _referenced(session: Session, key: str) -> bool:
    return session.scalar(select(func.count()).select_from(Artifact).where(Artifact.key == key)) != 0


def _archive_stats(report: Any) -> dict[str, Any]:
    return {"images": report.num_images, "train": report.num_train, "test": report.num_test,
            "splits": report.splits, "classes": list(report.classes), "num_classes": len(report.classes)}
