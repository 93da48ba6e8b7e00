"""Webhooks: a project's endpoints for terminal-state notifications, and their delivery outbox.

A ``WebhookDelivery`` row is written in the same transaction as the state change it reports (so a
notification is never lost nor sent for a change that rolled back); the scheduler POSTs it later and retries
with backoff. Delivery status: pending -> delivered | failed (gave up after ``WEBHOOK_MAX_ATTEMPTS``).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from shared.models.base import Base, JSONType, Timestamped, UUIDPk, utcnow

WEBHOOK_EVENTS = ("job.succeeded", "job.failed", "job.cancelled", "job.pruned",
                  "pipeline.succeeded", "pipeline.failed", "pipeline.cancelled",
                  "sweep.succeeded", "sweep.failed", "sweep.cancelled")
DELIVERY_STATUSES = ("pending", "delivered", "failed")


class Webhook(UUIDPk, Timestamped, Base):
    __tablename__ = "webhooks"
    __table_args__ = (Index("ix_webhooks_project_active", "project_id", "active"),)

    project_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(String(2048))
    secret: Mapped[str] = mapped_column(String(128))  # HMAC key; shown to the user once, at creation
    events: Mapped[list[str]] = mapped_column(JSONType, default=lambda: list(WEBHOOK_EVENTS))
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class WebhookDelivery(UUIDPk, Timestamped, Base):
    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),)

    webhook_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"), index=True)
    event: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
