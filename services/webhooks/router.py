from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Query, Response, status

from services.api.deps import ProjectDep, SessionDep
from services.webhooks import service
from services.webhooks.schemas import DeliveryRead, WebhookCreate, WebhookCreated, WebhookRead

router = APIRouter(prefix="/webhooks", tags=["webhooks"])
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No such webhook in this project"}}


@router.post("", response_model=WebhookCreated, status_code=status.HTTP_201_CREATED)
def create_webhook(body: WebhookCreate, project: ProjectDep, session: SessionDep) -> object:
    """Notify `url` when the project's jobs or pipelines end. The response carries the signing secret, once:
    each POST has `X-Crucible-Signature: sha256=<hex HMAC-SHA256 of the raw body>`."""
    return service.create(session=session, project_id=project.id, body=body)


@router.get("", response_model=list[WebhookRead])
def list_webhooks(project: ProjectDep, session: SessionDep) -> object:
    return service.list_webhooks(session=session, project_id=project.id)


@router.delete("/{webhook_id}", status_code=status.HTTP_204_NO_CONTENT, responses=NOT_FOUND)
def delete_webhook(webhook_id: uuid.UUID, project: ProjectDep, session: SessionDep) -> Response:
    service.delete(session=session, project_id=project.id, webhook_id=webhook_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{webhook_id}/deliveries", response_model=list[DeliveryRead], responses=NOT_FOUND)
def list_deliveries(webhook_id: uuid.UUID, project: ProjectDep, session: SessionDep,
                    limit: int = Query(50, ge=1, le=500)) -> object:
    """The webhook's latest deliveries: pending (with attempts and the next try), delivered or failed."""
    return service.deliveries(session=session, project_id=project.id, webhook_id=webhook_id, limit=limit)
