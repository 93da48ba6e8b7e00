from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict


class ArtifactRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: uuid.UUID
    kind: str
    name: str
    uri: str
    sha256: str | None
    size_bytes: int
    job_id: uuid.UUID | None
    attempt: int | None
    meta: dict[str, Any]
    created_at: datetime
    parents: list[uuid.UUID] = []
    download_url: str | None = None
