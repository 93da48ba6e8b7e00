"""Projects (the isolation boundary), their API keys and experiments."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from shared.models.base import Base, Timestamped, UUIDPk


class Project(UUIDPk, Timestamped, Base):
    __tablename__ = "projects"

    name: Mapped[str] = mapped_column(String(128), unique=True)


class ApiKey(UUIDPk, Timestamped, Base):
    """A project-scoped bearer key. Only the sha256 of the secret is stored."""

    __tablename__ = "api_keys"

    project_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128), default="default")
    prefix: Mapped[str] = mapped_column(String(16), index=True)  # shown in listings; not secret
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)  # written at most once a minute
    expires_at: Mapped[datetime | None] = mapped_column(default=None)  # None: never expires

    project: Mapped[Project] = relationship(lazy="joined")


class Experiment(UUIDPk, Timestamped, Base):
    """A group of jobs; one MLflow experiment per Crucible experiment (created by the first worker)."""

    __tablename__ = "experiments"
    __table_args__ = (UniqueConstraint("project_id", "name"),)

    project_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    description: Mapped[str | None] = mapped_column(String(2000), default=None)
    mlflow_experiment_id: Mapped[str | None] = mapped_column(String(64), default=None)
