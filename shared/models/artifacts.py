"""Artifacts (every object Crucible stores) with lineage, and datasets (named, versioned inputs)."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from shared.models.base import Base, Timestamped, UUIDPk


class Artifact(UUIDPk, Timestamped, Base):
    """An object in the store: who made it (job + attempt) and what it was made from (parents)."""

    __tablename__ = "artifacts"
    __table_args__ = (Index("ix_artifacts_job_kind", "job_id", "kind"),)

    project_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))  # dataset | checkpoint | report | file
    name: Mapped[str] = mapped_column(String(255))
    bucket: Mapped[str] = mapped_column(String(255))
    key: Mapped[str] = mapped_column(String(1024))  # cas/sha256/<hex> for content-addressed objects
    sha256: Mapped[str | None] = mapped_column(String(64), index=True, default=None)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), default=None)
    attempt: Mapped[int | None] = mapped_column(Integer, default=None)
    meta: Mapped[dict[str, Any]] = mapped_column(default=dict)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


class ArtifactParent(Base):
    __tablename__ = "artifact_parents"

    artifact_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("artifacts.id", ondelete="CASCADE"), primary_key=True)
    parent_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("artifacts.id", ondelete="CASCADE"), primary_key=True,
                                                 index=True)


class Dataset(UUIDPk, Timestamped, Base):
    """A named dataset version; its content is an ``Artifact`` (an archive, or a registered prefix)."""

    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("project_id", "name", "version"),)

    project_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer, default=1)
    source: Mapped[str] = mapped_column(String(16))  # archive | prefix
    artifact_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("artifacts.id", ondelete="RESTRICT"))
    stats: Mapped[dict[str, Any]] = mapped_column(default=dict)  # images, classes, splits
