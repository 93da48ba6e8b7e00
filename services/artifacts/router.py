from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query

from services.api.deps import ProjectDep, SessionDep
from services.artifacts import service
from services.artifacts.schemas import ArtifactRead
from shared.storage import ObjectStore

router = APIRouter(prefix="/artifacts", tags=["artifacts"])


@router.get("/{artifact_id}", response_model=ArtifactRead)
def read_artifact(artifact_id: uuid.UUID, project: ProjectDep, session: SessionDep,
                  expires_s: Annotated[int, Query(ge=60, le=7 * 24 * 3600)] = 3600) -> ArtifactRead:
    """Metadata, lineage (parent artifacts) and a presigned download URL (prefix datasets have none)."""
    art = service.get(session=session, project_id=project.id, artifact_id=artifact_id)
    out = ArtifactRead.model_validate(art)
    out.parents = service.parents(session=session, artifact_id=art.id)
    if not art.key.endswith("/"):
        out.download_url = ObjectStore().presigned_get(art.key, bucket=art.bucket, expires_s=expires_s)
    return out


@router.get("", response_model=list[ArtifactRead])
def list_artifacts(project: ProjectDep, session: SessionDep, job_id: uuid.UUID | None = None,
                   kind: str | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                   offset: Annotated[int, Query(ge=0)] = 0) -> list[ArtifactRead]:
    arts = service.list_artifacts(session=session, project_id=project.id, job_id=job_id, kind=kind, limit=limit,
                                  offset=offset)
    out = []
    for a in arts:
        r = ArtifactRead.model_validate(a)
        r.parents = service.parents(session=session, artifact_id=a.id)
        out.append(r)
    return out
