"""Webhook notifications, the write side: ``enqueue`` is called inside the transaction that moves a job or a
pipeline to a terminal state, so a delivery exists exactly when the change committed. Sending is the
scheduler's (services/scheduler/webhooks.py); ``sign`` is shared with receivers' documentation and tests."""

from __future__ import annotations

import hashlib
import hmac
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.models import Webhook, WebhookDelivery

SIGNATURE_HEADER = "X-Crucible-Signature"
EVENT_HEADER = "X-Crucible-Event"
DELIVERY_HEADER = "X-Crucible-Delivery"


def sign(secret: str, body: bytes) -> str:
    """The ``X-Crucible-Signature`` value: ``sha256=`` + hex HMAC-SHA256 of the raw request body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def enqueue(session: Session, project_id: uuid.UUID, event: str, payload: dict[str, Any]) -> int:
    """One delivery per active webhook of the project that subscribes to ``event``; returns how many.

    A project without webhooks costs one indexed query (ix_webhooks_project_active)."""
    hooks = session.scalars(select(Webhook).where(Webhook.project_id == project_id, Webhook.active.is_(True)))
    n = 0
    for hook in hooks:
        if event in hook.events:
            session.add(WebhookDelivery(webhook_id=hook.id, event=event, payload={"event": event, **payload}))
            n += 1
    return n
