"""Projects, their API keys and experiments.

Keys: only the sha256 of a key is stored; ``prefix`` (its first 12 characters) is shown in listings. A key may
expire (``expires_at``); ``last_used_at`` is written at most once a minute per key, so authentication is a read.
Revoking names exactly one key (its id, or the whole key); the API's key cache forgets a revoked key within
``CRUCIBLE_API_KEY_CACHE_SECONDS`` (services/api/deps.py).
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.errors import Invalid, NotFound, Unauthorized
from shared.models import ApiKey, Experiment, Project, utcnow

KEY_PREFIX = "crk_"
LAST_USED_WRITE_SECONDS = 60.0
_INVALID = "invalid, expired or revoked API key; create one with `crucible keys create --project NAME`"


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


def create_key(*, session: Session, project_name: str, name: str = "default",
               expires_in: timedelta | None = None) -> tuple[ApiKey, str]:
    """A new API key for the project (created if missing). The plaintext is returned once, never stored."""
    if expires_in is not None and expires_in <= timedelta(0):
        raise Invalid("a key's lifetime must be positive", loc=["expires_in"])
    project = get_or_create_project(session=session, name=project_name)
    token = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(project_id=project.id, name=name, prefix=token[:12], key_hash=hash_key(token),
                 expires_at=utcnow() + expires_in if expires_in is not None else None)
    session.add(key)
    session.flush()
    return key, token


@dataclass(frozen=True)
class KeyGrant:
    """What a valid key grants: its project (detached, read-only) and until when."""

    key_id: uuid.UUID
    project: Project
    expires_at: datetime | None


def authenticate_hash(*, session: Session, key_hash: str) -> KeyGrant:
    """The grant of a key (by its sha256); Unauthorized if unknown, revoked or expired. Records use, throttled."""
    key = session.scalars(select(ApiKey).where(ApiKey.key_hash == key_hash)).first()
    now = utcnow()
    if key is None or key.revoked_at is not None or (key.expires_at is not None and key.expires_at <= now):
        raise Unauthorized(_INVALID, loc=["header", "authorization"])
    if key.last_used_at is None or key.last_used_at < now - timedelta(seconds=LAST_USED_WRITE_SECONDS):
        session.execute(update(ApiKey).where(ApiKey.id == key.id).values(last_used_at=now)
                        .execution_options(synchronize_session=False))
    project = key.project
    session.expunge(project)
    return KeyGrant(key.id, project, key.expires_at)


def authenticate(*, session: Session, token: str) -> Project:
    """The project a bearer token belongs to; Unauthorized if unknown, revoked or expired."""
    return authenticate_hash(session=session, key_hash=hash_key(token)).project


def list_keys(*, session: Session, project_id: uuid.UUID) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).where(ApiKey.project_id == project_id)
                                .order_by(ApiKey.created_at, ApiKey.id)))


def find_key(*, session: Session, ref: str, project_id: uuid.UUID | None = None) -> ApiKey:
    """Exactly one key: by id, by the whole key, or by a prefix that only one key has (within the project
    when one is given). An ambiguous prefix is an error listing the candidates' ids, never a mass revoke."""
    stmt = select(ApiKey)
    if project_id is not None:
        stmt = stmt.where(ApiKey.project_id == project_id)
    try:
        matches = list(session.scalars(stmt.where(ApiKey.id == uuid.UUID(ref))))
    except ValueError:
        matches = list(session.scalars(stmt.where(ApiKey.key_hash == hash_key(ref))))
        if not matches and len(ref) >= 8:
            matches = list(session.scalars(stmt.where(ApiKey.prefix == ref[:12]).limit(10)))
    if not matches:
        raise NotFound(f"no API key {ref[:16]!r}" + (" in this project" if project_id else ""), loc=["key"])
    if len(matches) > 1:
        raise Invalid(f"{ref[:16]!r} matches {len(matches)} keys ({', '.join(str(k.id) for k in matches)}); "
                      "name one by its id (`crucible keys list --project NAME`)", loc=["key"])
    return matches[0]


def revoke_key(*, session: Session, ref: str, project_id: uuid.UUID | None = None) -> ApiKey:
    """Revoke exactly one key (see ``find_key``); revoking it twice is a no-op."""
    key = find_key(session=session, ref=ref, project_id=project_id)
    if key.revoked_at is None:
        key.revoked_at = utcnow()
    forget_key(key.key_hash)
    return key


# --- caches: the hot path reads neither the key nor the experiment row on every request --------------------
_cache_lock = threading.Lock()
_forgotten: list[str] = []  # key hashes revoked in this process, for the API's key cache
_experiments: dict[tuple[uuid.UUID, str], uuid.UUID] = {}
_MAX_EXPERIMENTS = 10_000


def forget_key(key_hash: str) -> None:
    with _cache_lock:
        _forgotten.append(key_hash)


def take_forgotten() -> list[str]:
    with _cache_lock:
        out = _forgotten[:]
        _forgotten.clear()
        return out


def forget_experiment(project_id: uuid.UUID, name: str) -> None:
    """Drop a cached experiment id whose row is being rolled back (a dry-run submission that was refused)."""
    with _cache_lock:
        _experiments.pop((project_id, name), None)


def experiment_id(*, session: Session, project_id: uuid.UUID, name: str) -> uuid.UUID:
    """The id of the project's experiment ``name`` (created if missing), cached: experiments are never
    renamed or deleted apart from their project."""
    cached = _experiments.get((project_id, name))
    if cached is not None:
        return cached
    exp_id = get_or_create_experiment(session=session, project_id=project_id, name=name).id
    with _cache_lock:
        if len(_experiments) >= _MAX_EXPERIMENTS:
            _experiments.clear()
        _experiments[(project_id, name)] = exp_id
    return exp_id


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
