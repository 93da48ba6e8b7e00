from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.models.webhooks import WEBHOOK_EVENTS

Event = Literal["job.succeeded", "job.failed", "job.cancelled", "job.pruned",
                "pipeline.succeeded", "pipeline.failed", "pipeline.cancelled",
                "sweep.succeeded", "sweep.failed", "sweep.cancelled"]
assert set(Event.__args__) == set(WEBHOOK_EVENTS)  # type: ignore[attr-defined]  # one list of events
MAX_URL = 2048


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(max_length=MAX_URL, examples=["https://hooks.example.com/crucible"])
    events: list[Event] | None = Field(None, min_length=1, description="default: every event")

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host, e.g. https://hooks.example.com/x")
        return v


class WebhookRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: uuid.UUID
    url: str
    events: list[str]
    active: bool
    created_at: datetime


class WebhookCreated(WebhookRead):
    secret: str = Field(description="the HMAC-SHA256 key of X-Crucible-Signature; shown only once")


class DeliveryRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: uuid.UUID
    event: str
    payload: dict[str, Any]
    status: str
    attempts: int
    next_attempt_at: datetime
    delivered_at: datetime | None
    last_error: str | None
    created_at: datetime
