"""Which object-store locations a project may register as datasets.

A registered prefix is read by the workers with the platform's own S3 credentials, so the API must decide
what a project may see. The rules:

* a location is normalised once (``parse_location``) and every check, the listing and the stored key use that
  one normalised form: ``./cas``, ``a/../cas``, ``cas//`` and ``/cas`` are all ``cas/``;
* it must lie inside a grant of the project (the ``storage_grants`` table, set with
  ``crucible admin grant-storage``, plus ``CRUCIBLE_STORAGE_GRANTS``);
* it must not overlap the platform's own areas (the bucket's ``cas/`` and ``mlflow-artifacts/``,
  ``CRUCIBLE_RESERVED_STORAGE``) nor another project's grant that this project does not share;
* a refusal and a missing location look the same to the caller (one generic 404), so nobody can probe which
  buckets or prefixes exist.
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.config import get_settings
from shared.models import Project, StorageGrant
from shared.storage import CAS_PREFIX

log = logging.getLogger("crucible.datasets")

# S3 bucket naming rules (3-63 characters: lowercase letters, digits, '.', '-'; alphanumeric at both ends).
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
MAX_PREFIX_CHARS = 1024
PLATFORM_AREAS = (CAS_PREFIX.split("/")[0] + "/", "mlflow-artifacts/")


@dataclass(frozen=True)
class Location:
    bucket: str
    prefix: str  # "a/b/": no empty, '.' or '..' parts, one trailing slash; "" is the whole bucket

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def contains(self, other: Location) -> bool:
        return self.bucket == other.bucket and other.prefix.startswith(self.prefix)

    def overlaps(self, other: Location) -> bool:
        return self.contains(other) or other.contains(self)


def parse_location(uri: str) -> Location:
    """``s3://bucket/prefix`` -> its normalised Location; ValueError says what is malformed."""
    if not uri.startswith("s3://"):
        raise ValueError("must be an s3://bucket/prefix/ URI")
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not _BUCKET_RE.fullmatch(bucket):
        raise ValueError("the bucket must be an S3 bucket name (3-63 lowercase letters, digits, '.' or '-')")
    parts: list[str] = []
    for part in key.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise ValueError("the prefix climbs above the bucket root ('..')")
            parts.pop()
        else:
            parts.append(part)
    prefix = "/".join(parts) + "/" if parts else ""
    if len(prefix) > MAX_PREFIX_CHARS:
        raise ValueError(f"the prefix is longer than {MAX_PREFIX_CHARS} characters")
    return Location(bucket, prefix)


def reserved_areas() -> list[Location]:
    """The platform's own areas: never granted, never registered."""
    settings = get_settings()
    return [Location(settings.S3_BUCKET, p) for p in PLATFORM_AREAS] + \
        [loc for u in settings.RESERVED_STORAGE if (loc := _configured(u)) is not None]


def _configured(uri: str) -> Location | None:
    """A location from the settings; a malformed one is logged and left out (it grants nothing)."""
    try:
        return parse_location(uri)
    except ValueError as e:
        log.error("ignoring malformed storage location %r in the settings: %s", uri, e)
        return None


def _all_grants(session: Session) -> list[tuple[str, Location]]:
    """(project name, location) of every grant, from the table and from the settings."""
    rows = session.execute(select(Project.name, StorageGrant.bucket, StorageGrant.prefix)
                           .join(Project, Project.id == StorageGrant.project_id)).all()
    out = [(name, Location(bucket, prefix)) for name, bucket, prefix in rows]
    for name, uris in get_settings().STORAGE_GRANTS.items():
        out += [(name, loc) for u in uris if (loc := _configured(u)) is not None]
    return out


def may_register(*, session: Session, project_id: uuid.UUID, location: Location) -> bool:
    """True when ``location`` lies inside one of the project's grants and touches nobody else's data."""
    if not location.prefix or any(area.overlaps(location) for area in reserved_areas()):
        return False
    project = session.get(Project, project_id)
    if project is None:
        return False
    grants = _all_grants(session)
    mine = {loc for name, loc in grants if name == project.name}
    if not any(g.contains(location) for g in mine):
        return False
    # Another project's area inside (or around) this one is off limits unless it is shared (granted to both).
    return all(name == project.name or loc in mine or not loc.overlaps(location) for name, loc in grants)


def grant(*, session: Session, project_name: str, uri: str) -> StorageGrant:
    """Let a project register datasets inside ``uri`` (an operator's decision; idempotent)."""
    location = parse_location(uri)
    if not location.prefix:
        raise ValueError("grant a prefix inside the bucket (s3://bucket/some/prefix/), not a whole bucket")
    for area in reserved_areas():
        if area.overlaps(location):
            raise ValueError(f"{location.uri} overlaps {area.uri}, which holds the platform's own objects")
    project = session.scalars(select(Project).where(Project.name == project_name)).first()
    if project is None:
        raise ValueError(f"no project named {project_name!r}; create it with `crucible keys create --project "
                         f"{project_name}`")
    for name, loc in _all_grants(session):
        if name != project_name and loc != location and loc.overlaps(location):
            raise ValueError(f"{location.uri} overlaps {loc.uri}, granted to project {name!r}; grant exactly "
                             "that prefix to share it, or a prefix that does not overlap it")
    existing = session.scalars(select(StorageGrant).where(
        StorageGrant.project_id == project.id, StorageGrant.bucket == location.bucket,
        StorageGrant.prefix == location.prefix)).first()
    if existing is not None:
        return existing
    row = StorageGrant(project_id=project.id, bucket=location.bucket, prefix=location.prefix)
    session.add(row)
    session.flush()
    return row


def revoke(*, session: Session, project_name: str, uri: str) -> int:
    """Withdraw a grant (datasets registered inside it can no longer be used by new jobs); returns how many."""
    location = parse_location(uri)
    rows = session.scalars(select(StorageGrant).join(Project, Project.id == StorageGrant.project_id).where(
        Project.name == project_name, StorageGrant.bucket == location.bucket,
        StorageGrant.prefix == location.prefix)).all()
    for row in rows:
        session.delete(row)
    return len(rows)


def list_grants(*, session: Session, project_name: str | None = None) -> list[tuple[str, str]]:
    """(project name, s3:// uri) of every grant, optionally of one project."""
    return sorted((name, loc.uri) for name, loc in _all_grants(session) if project_name in (None, name))
