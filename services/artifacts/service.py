"""Artifacts: metadata, lineage and presigned downloads, within the caller's project."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.errors import NotFound
from shared.models import Artifact, ArtifactParent


def get(*, session: Session, project_id: uuid.UUID, artifact_id: uuid.UUID) -> Artifact:
    art = session.get(Artifact, artifact_id)
    if art is None or art.project_id != project_id:
        raise NotFound(f"artifact {artifact_id} not found", loc=["path", "artifact_id"])
    return art


def parents(*, session: Session, artifact_id: uuid.UUID) -> list[uuid.UUID]:
    return list(session.scalars(select(ArtifactParent.parent_id).where(ArtifactParent.artifact_id == artifact_id)))


def list_artifacts(*, session: Session, project_id: uuid.UUID, job_id: uuid.UUID | None = None,
                   kind: str | None = None, limit: int = 100, offset: int = 0) -> list[Artifact]:
    stmt = select(Artifact).where(Artifact.project_id == project_id)
    if job_id is not None:
        stmt = stmt.where(Artifact.job_id == job_id)
    if kind is not None:
        stmt = stmt.where(Artifact.kind == kind)
    return list(session.scalars(stmt.order_by(Artifact.created_at, Artifact.id).limit(limit).offset(offset)))
