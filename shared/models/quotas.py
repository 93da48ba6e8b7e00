"""Per-project scheduling limits an operator sets (``crucible admin set-quota``)."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import ForeignKey, Integer
from sqlalchemy.orm import Mapped, mapped_column

from shared.models.base import Base, utcnow


class ProjectQuota(Base):
    """At most ``max_gpus`` GPUs and ``max_jobs`` jobs dispatched or running at once (None: no limit)."""

    __tablename__ = "project_quotas"

    project_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True)
    max_gpus: Mapped[int | None] = mapped_column(Integer, default=None)
    max_jobs: Mapped[int | None] = mapped_column(Integer, default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
