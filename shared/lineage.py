"""Artifact lineage queries shared by the control plane (submit-time checks) and workers (inputs, outputs)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.models import Artifact, ArtifactParent


def latest_checkpoint(session: Session, job_id: uuid.UUID) -> Artifact | None:
    """The job's most recent checkpoint (for a succeeded job: its final one)."""
    return session.scalars(
        select(Artifact).where(Artifact.job_id == job_id, Artifact.kind == "checkpoint")
        .order_by(Artifact.created_at.desc(), Artifact.id).limit(1)
    ).first()


def link_parents(session: Session, artifact_id: uuid.UUID, parents: Iterable[uuid.UUID | str]) -> None:
    for parent in {uuid.UUID(str(p)) for p in parents if p}:
        session.add(ArtifactParent(artifact_id=artifact_id, parent_id=parent))
