"""``POST /v1/route``, ``POST /v1/generate`` and ``GET /v1/router/replicas``: thin over services/serving/service."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from services.api.deps import ProjectDep
from services.serving import service
from services.serving.schemas import GenerateIn, GenerateOut, ReplicasOut, RouteIn, RouteOut

router = APIRouter(tags=["serving"])


@router.post("/route", response_model=RouteOut)
async def route(body: RouteIn, project: ProjectDep) -> RouteOut:
    """The expert a text goes to, with the cosine margin between the two nearest centroids as confidence."""
    return await service.route(project_id=project.id, body=body)


@router.post("/generate", response_model=GenerateOut,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "JSON, or Server-Sent Events (route, text, done | error) with "
                                             "`stream: true`"}})
async def generate(body: GenerateIn, project: ProjectDep) -> object:
    """Route the prompt, apply the expert's adapter to the shared base on a replica holding it, and generate."""
    if not body.stream:
        return await service.generate(project_id=project.id, body=body)
    events = await service.generate_stream(project_id=project.id, body=body)
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/router/replicas", response_model=ReplicasOut)
async def replicas(project: ProjectDep,
                   expert_set: Annotated[str, Query(min_length=1, max_length=200)]) -> ReplicasOut:
    """The placement table: live replicas of an expert set, the experts each holds, state and queue depth."""
    return await service.replicas(project_id=project.id, expert_set=expert_set)
