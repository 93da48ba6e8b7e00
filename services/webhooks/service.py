"""Webhooks: register, list, delete a project's endpoints and read their deliveries (project-scoped: another
project's webhook is a 404, never a 403, so ids do not leak)."""

from __future__ import annotations

import secrets
import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.errors import Invalid, NotFound
from services.webhooks.schemas import WebhookCreate
from shared.config import get_settings
from shared.models import Webhook, WebhookDelivery
from shared.models.webhooks import WEBHOOK_EVENTS
from shared.webhooks import UnsafeTarget, check_target


def create(*, session: Session, project_id: uuid.UUID, body: WebhookCreate) -> Webhook:
    try:
        check_target(body.url, allow_private=get_settings().webhooks_may_reach_private)
    except UnsafeTarget as e:
        raise Invalid(str(e), loc=["body", "url"]) from None
    events = list(dict.fromkeys(body.events)) if body.events else list(WEBHOOK_EVENTS)
    hook = Webhook(project_id=project_id, url=body.url, secret=secrets.token_hex(32), events=events, active=True)
    session.add(hook)
    session.flush()
    return hook


def list_webhooks(*, session: Session, project_id: uuid.UUID) -> list[Webhook]:
    return list(session.scalars(select(Webhook).where(Webhook.project_id == project_id)
                                .order_by(Webhook.created_at)))


def get(*, session: Session, project_id: uuid.UUID, webhook_id: uuid.UUID) -> Webhook:
    hook = session.get(Webhook, webhook_id)
    if hook is None or hook.project_id != project_id:
        raise NotFound(f"no webhook {webhook_id} in this project; `GET /v1/webhooks` lists them",
                       loc=["path", "webhook_id"])
    return hook


def delete(*, session: Session, project_id: uuid.UUID, webhook_id: uuid.UUID) -> None:
    """Delete the webhook and its deliveries (pending ones are never sent)."""
    session.delete(get(session=session, project_id=project_id, webhook_id=webhook_id))


def deliveries(*, session: Session, project_id: uuid.UUID, webhook_id: uuid.UUID,
               limit: int = 50) -> list[WebhookDelivery]:
    get(session=session, project_id=project_id, webhook_id=webhook_id)
    return list(session.scalars(select(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook_id)
                                .order_by(WebhookDelivery.created_at.desc()).limit(limit)))
