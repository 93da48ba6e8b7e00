"""Projects, their API keys and experiments."""

from __future__ import annotations

import hashlib
import secrets
import uuid

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.errors import NotFound, Unauthorized
from shared.models import ApiKey, Experiment, Project, utcnow

KEY_PREFIX = "crk_"


def hash_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def get_or_create_project(*, session: Session, name: str) -> Project:
    """The project called ``name``, created if missing."""
    project = session.scalars(select(Project).where(Project.name == name)).first()
    if project is None:
        project = Project(name=name)
        session.add(project)
        session.flush()
    return project


def create_key(*, session: Session, project_name: str, name: str = "default") -> tuple[ApiKey, str]:
    """A new API key for the project (created if missing). The plaintext is returned once, never stored."""
    project = get_or_create_project(session=session, name=project_name)
    token = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(project_id=project.id, name=name, prefix=token[:12], key_hash=hash_key(token))
    session.add(key)
    session.flush()
    return key, token


def authenticate(*, session: Session, token: str) -> Project:
    """The project a bearer token belongs to; Unauthorized if unknown or revoked."""
    key = session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_key(token))).first()
    if key is None or key.revoked_at is not None:
        raise Unauthorized("invalid or revoked API key; create one with `crucible keys create --project NAME`")
    return key.project


def revoke_key(*, session: Session, prefix: str) -> int:
    """Revoke every key starting with ``prefix``; returns how many."""
    keys = session.scalars(select(ApiKey).where(ApiKey.prefix == prefix[:12], ApiKey.revoked_at.is_(None))).all()
    for k in keys:
        k.revoked_at = utcnow()
    return len(keys)


def get_or_create_experiment(*, session: Session, project_id: uuid.UUID, name: str) -> Experiment:
    """The project's experiment called ``name``, created if missing (safe under concurrent submits)."""
    stmt = select(Experiment).where(Experiment.project_id == project_id, Experiment.name == name)
    exp = session.scalars(stmt).first()
    if exp is not None:
        return exp
    try:
        with session.begin_nested():
            exp = Experiment(project_id=project_id, name=name)
            session.add(exp)
        return exp
    except IntegrityError:  # a concurrent request created it first
        exp = session.scalars(stmt).first()
        assert exp is not None
        return exp


def list_experiments(*, session: Session, project_id: uuid.UUID) -> list[Experiment]:
    return list(session.scalars(select(Experiment).where(Experiment.project_id == project_id)
                                .order_by(Experiment.created_at)))


def get_experiment(*, session: Session, project_id: uuid.UUID, name_or_id: str) -> Experiment:
    stmt = select(Experiment).where(Experiment.project_id == project_id)
    try:
        exp = session.scalars(stmt.where(Experiment.id == uuid.UUID(name_or_id))).first()
    except ValueError:
        exp = session.scalars(stmt.where(Experiment.name == name_or_id)).first()
    if exp is None:
        raise NotFound(f"experiment {name_or_id!r} not found in this project", loc=["path", "experiment"])
    return exp
