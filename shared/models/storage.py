"""Object-store locations an operator lets a project register as datasets (tenant isolation for prefixes)."""

from __future__ import annotations

import uuid

from sqlalchemy import ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from shared.models.base import Base, Timestamped, UUIDPk


class StorageGrant(UUIDPk, Timestamped, Base):
    """``s3://bucket/prefix/`` that a project may register datasets inside (``crucible admin grant-storage``).

    ``prefix`` is stored normalised (``a/b/``, always one trailing slash, never ``.``/``..``/empty parts), so a
    containment check is a plain ``startswith``.
    """

    __tablename__ = "storage_grants"
    __table_args__ = (UniqueConstraint("project_id", "bucket", "prefix"),)

    project_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    bucket: Mapped[str] = mapped_column(String(63))
    prefix: Mapped[str] = mapped_column(String(1024))
