"""Dataset rows: one name, many versions. Recorded here for every way a dataset arrives (an upload, a registered
prefix, a dataset a job made), so versioning and "same content is not a new version" hold for all three."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.models import Artifact, Dataset


class VersionTaken(Exception):
    """A concurrent writer recorded the same name's next version first; the caller decides (409, or retry)."""

    def __init__(self, name: str, version: int) -> None:
        super().__init__(f"dataset {name!r} version {version} was recorded concurrently")
        self.name, self.version = name, version


def archive_stats(report: Any) -> dict[str, Any]:
    """The ``datasets.stats`` of an inspected ImageFolder archive (``shared.data.archives.ArchiveReport``)."""
    return {"images": report.num_images, "train": report.num_train, "test": report.num_test,
            "splits": report.splits, "classes": list(report.classes), "num_classes": len(report.classes)}


def record_dataset(session: Session, *, project_id: uuid.UUID, name: str, source: str, bucket: str, key: str,
                   sha256: str, size: int, stats: dict[str, Any], meta: dict[str, Any],
                   job_id: uuid.UUID | None = None, attempt: int | None = None) -> tuple[Dataset, Artifact | None]:
    """Record ``name``'s next version (and its artifact) in the session; flushes, does not commit.

    Returns ``(dataset, new_artifact)``; the content of the latest version again is not a new version, and then
    ``new_artifact`` is None. Raises ``VersionTaken`` when a concurrent writer took the version number (the
    session's savepoint is rolled back, the caller's transaction stays usable)."""
    latest = session.scalar(select(func.max(Dataset.version)).where(Dataset.project_id == project_id,
                                                                    Dataset.name == name)) or 0
    if latest:
        prev = session.scalars(select(Dataset).where(Dataset.project_id == project_id, Dataset.name == name,
                                                     Dataset.version == latest)).one()
        prev_art = session.get(Artifact, prev.artifact_id)
        if prev_art is not None and prev_art.sha256 == sha256:
            return prev, None  # the same content again is a no-op, not a new version
    art = Artifact(project_id=project_id, kind="dataset", name=name, bucket=bucket, key=key, sha256=sha256,
                   size_bytes=size, job_id=job_id, attempt=attempt, meta={"source": source, **meta})
    nested = session.begin_nested()
    try:
        session.add(art)
        session.flush()
        ds = Dataset(project_id=project_id, name=name, version=latest + 1, source=source, artifact_id=art.id,
                     stats=stats)
        session.add(ds)
        session.flush()
    except IntegrityError:
        nested.rollback()
        raise VersionTaken(name, latest + 1) from None
    nested.commit()
    return ds, art
