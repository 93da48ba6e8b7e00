from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shared.specs.common import DATASET_NAME_PATTERN as NAME_PATTERN


class DatasetRegister(BaseModel):
    """Register an ImageFolder tree that already lives in the object store."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN, examples=["cats-vs-dogs"])
    uri: str = Field(max_length=1100, examples=["s3://lab-data/cats-vs-dogs/"],
                     description="s3://bucket/prefix/ of the tree, inside a location granted to the project "
                                 "(`crucible admin grant-storage`)")


class DatasetRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: uuid.UUID
    name: str
    version: int
    source: str
    artifact_id: uuid.UUID
    stats: dict[str, Any]
    created_at: datetime
