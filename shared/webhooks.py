"""Webhook notifications, the write side: ``enqueue`` is called inside the transaction that moves a job or a
pipeline to a terminal state, so a delivery exists exactly when the change committed. Sending is the
scheduler's (services/scheduler/webhooks.py); ``sign`` is shared with receivers' documentation and tests."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
import uuid
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.models import Webhook, WebhookDelivery

SIGNATURE_HEADER = "X-Crucible-Signature"
EVENT_HEADER = "X-Crucible-Event"
DELIVERY_HEADER = "X-Crucible-Delivery"


def sign(secret: str, body: bytes) -> str:
    """The ``X-Crucible-Signature`` value: ``sha256=`` + hex HMAC-SHA256 of the raw request body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class UnsafeTarget(ValueError):
    """A webhook URL whose host is (or resolves to) an address the scheduler must not call."""


def check_target(url: str, *, allow_private: bool, resolve: bool = True) -> None:
    """Refuse a URL whose host is a loopback, private, link-local, multicast or reserved address (``UnsafeTarget``).

    An IP literal is checked as written; a name is resolved (``resolve=True``) and every address it has must be
    public. Resolution that fails is not a refusal here: delivery checks again right before each POST. What is
    left is DNS rebinding between that check and httpx's own lookup, a window of milliseconds."""
    if allow_private:
        return
    host = urlsplit(url).hostname or ""
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        if not resolve:
            return
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except OSError:
            return
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    for addr in addresses:
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if not addr.is_global or addr.is_multicast:
            raise UnsafeTarget(f"{host} is {addr}, a loopback, private, link-local or reserved address; webhooks "
                               "must reach a public address (an operator can allow private ones with "
                               "CRUCIBLE_WEBHOOK_ALLOW_PRIVATE=true)")


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
