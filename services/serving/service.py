"""Serving: resolve the caller's expert set, route on a replica, generate on a replica holding the expert.

Keyword-only functions over ``Dispatcher`` (services/serving/dispatch.py). An expert set is named by its
artifact (id or ``artifact:<id>``) or by name (the newest expert-set artifact of that name); one outside the
caller's project is indistinguishable from a missing one (404). Routing and generation share one deadline.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select

from services.errors import DomainError, Invalid, NotFound, Unavailable
from services.serving import dispatch
from services.serving.schemas import GenerateIn, GenerateOut, ReplicasOut, RouteIn, RouteOut
from shared import serving
from shared.config import get_settings
from shared.db import session_scope
from shared.models import Artifact

ARTIFACT_KIND = "expert-set"  # workers.text.expert_set.ARTIFACT_KIND (the control plane imports no worker code)
_clients: dict[tuple[int, str], Any] = {}


_JOBS_TTL_S = 5.0
_project_jobs: dict[tuple[uuid.UUID, str], tuple[float, bool]] = {}


def _jobs_of(project_id: uuid.UUID, job_ids: set[str]) -> set[str]:
    from shared.models import Job

    ids = []
    for j in job_ids:
        try:
            ids.append(uuid.UUID(j))
        except ValueError:
            continue
    if not ids:
        return set()
    with session_scope() as s:
        return {str(i) for i in s.scalars(select(Job.id).where(Job.id.in_(ids), Job.project_id == project_id))}


async def _scope(project_id: uuid.UUID, table: list[serving.Announcement]) -> None:
    """Learn which announced replicas are router jobs of this project (cached a few seconds)."""
    now = time.monotonic()
    unknown = {a.job_id for a in table if (hit := _project_jobs.get((project_id, a.job_id))) is None
               or now - hit[0] > _JOBS_TTL_S}
    if unknown:
        mine = await run_in_threadpool(_jobs_of, project_id, unknown)
        if len(_project_jobs) > 10_000:
            _project_jobs.clear()
        for j in unknown:
            _project_jobs[(project_id, j)] = (now, j in mine)


async def _scoped(project_id: uuid.UUID, set_id: str) -> tuple[dispatch.Dispatcher, list[serving.Announcement]]:
    """A dispatcher that only uses this project's replicas, and the placement table it sees now."""
    d = _dispatcher()
    await _scope(project_id, await d.table(set_id))
    d.allow = lambda a: _project_jobs.get((project_id, a.job_id), (0.0, False))[1]
    return d, await d.table(set_id)


def _dispatcher() -> dispatch.Dispatcher:
    url = get_settings().BROKER_URL
    if not url.startswith(("redis://", "rediss://")):
        raise Unavailable("serving needs a Redis broker (CRUCIBLE_BROKER_URL=redis://...); this control plane runs "
                          "on the embedded broker", loc=["body", "expert_set"])
    key = (id(asyncio.get_running_loop()), url)  # an asyncio client belongs to one event loop
    client = _clients.get(key)
    if client is None:
        import redis.asyncio

        timeout = get_settings().BROKER_TIMEOUT_SECONDS
        client = redis.asyncio.Redis.from_url(url, socket_connect_timeout=timeout,
                                              socket_timeout=dispatch.POLL_S + timeout)
        if len(_clients) > 64:
            _clients.clear()
        _clients[key] = client
    return dispatch.Dispatcher(client)


def _resolve(project_id: uuid.UUID, ref: str) -> tuple[str, str]:
    ident = ref.removeprefix("artifact:")
    with session_scope() as s:
        art: Artifact | None
        try:
            art = s.get(Artifact, uuid.UUID(ident))
        except ValueError:
            art = s.scalars(select(Artifact).where(Artifact.project_id == project_id, Artifact.kind == ARTIFACT_KIND,
                                                   Artifact.name == ref)
                            .order_by(Artifact.created_at.desc()).limit(1)).first()
        if art is None or art.project_id != project_id or art.kind != ARTIFACT_KIND:
            raise NotFound(f"unknown expert set {ref[:80]!r}: no expert-set artifact with that id or name in this "
                           "project (GET /v1/artifacts?kind=expert-set lists them)", loc=["body", "expert_set"])
        return str(art.id), art.sha256 or str(art.id)


async def resolve_expert_set(*, project_id: uuid.UUID, ref: str) -> tuple[str, str]:
    """(artifact id, placement key) of the caller's expert set ``ref``; NotFound otherwise. Replicas announce
    under the set's content hash (its tar's sha256), the same whether they were started from the artifact or
    from the expert-set job's checkpoint."""
    return await run_in_threadpool(_resolve, project_id, ref)


async def replicas(*, project_id: uuid.UUID, expert_set: str) -> ReplicasOut:
    """The placement table of an expert set: every live replica, what it holds and its state."""
    art_id, key = await resolve_expert_set(project_id=project_id, ref=expert_set)
    _, table = await _scoped(project_id, key)
    return ReplicasOut(expert_set=art_id, replicas=table)


async def route(*, project_id: uuid.UUID, body: RouteIn) -> RouteOut:
    art_id, set_id = await resolve_expert_set(project_id=project_id, ref=body.expert_set)
    t0 = time.monotonic()
    d, table = await _scoped(project_id, set_id)
    reply = await dispatch.call(d, set_id, dispatch.new_request("route", body.text, timeout_s=body.timeout_s),
                                table=table)
    return RouteOut(expert_set=art_id, expert=str(reply.expert), margin=float(reply.margin or 0.0),
                    fallback=reply.fallback, replica=reply.replica_id, seconds=round(time.monotonic() - t0, 4))


async def _choose(d: dispatch.Dispatcher, set_id: str, body: GenerateIn, deadline: float,
                  table: list[serving.Announcement]) -> tuple[str | None, str | None, float | None]:
    """(expert to generate with, None = base; the routed expert; margin)."""
    if body.expert is not None:
        known = {e for a in table for e in a.all_experts}
        if known and body.expert not in known:
            raise Invalid(f"expert {body.expert!r} is not in the expert set (it has {sorted(known)[:20]})",
                          loc=["body", "expert"])
        return body.expert, None, None
    req = serving.Request(id=uuid.uuid4().hex, op="route", text=body.text, deadline=deadline)
    reply = await dispatch.call(d, set_id, req, table=table)
    return (None if reply.fallback else reply.expert), reply.expert, reply.margin


async def _prepare(project_id: uuid.UUID, body: GenerateIn, *, stream: bool) -> tuple[
        str, str, dispatch.Dispatcher, list[serving.Announcement], serving.Request, str | None]:
    """Resolve the set, find its replicas, route (unless the expert is given): ``(artifact id, set id,
    dispatcher, table, the generate request, the routed expert)``; the request carries the deadline."""
    art_id, set_id = await resolve_expert_set(project_id=project_id, ref=body.expert_set)
    deadline = time.time() + body.timeout_s
    d, table = await _scoped(project_id, set_id)
    expert, routed, margin = await _choose(d, set_id, body, deadline, table)
    req = serving.Request(id=uuid.uuid4().hex, op="generate", text=body.text, expert=expert, margin=margin,
                          max_new_tokens=body.max_new_tokens or 0, stream=stream, deadline=deadline)
    return art_id, set_id, d, table, req, routed


async def generate(*, project_id: uuid.UUID, body: GenerateIn) -> GenerateOut:
    t0 = time.monotonic()
    art_id, set_id, d, table, req, routed = await _prepare(project_id, body, stream=False)
    expert, margin = req.expert, req.margin
    reply = await dispatch.call(d, set_id, req, table=table)
    return GenerateOut(expert_set=art_id, expert=expert, routed_to=routed, margin=margin,
                       fallback=expert is None, text=reply.text, tokens=reply.tokens, finish=reply.finish,
                       replica=reply.replica_id, seconds=round(time.monotonic() - t0, 4))


async def generate_stream(*, project_id: uuid.UUID, body: GenerateIn) -> AsyncIterator[str]:
    """Server-Sent Events: ``route``, then ``text`` pieces, then ``done`` (or ``error``, also mid-stream).

    Everything up to the replica's first reply happens before this returns, so an unknown set, no replica,
    a prompt longer than the context or a deadline are plain HTTP errors, not a 200 stream that fails."""
    t0 = time.monotonic()
    art_id, set_id, d, table, req, routed = await _prepare(project_id, body, stream=True)
    expert, margin = req.expert, req.margin
    replies: AsyncGenerator[serving.Reply, None] = d.exchange(set_id, req, table=table)
    first = await replies.__anext__()
    head = {"expert_set": art_id, "expert": expert, "routed_to": routed, "margin": margin, "fallback": expert is None}

    async def events() -> AsyncIterator[str]:
        yield _sse("route", head)
        reply = first
        try:
            while True:
                if reply.type == "text":
                    yield _sse("text", {"text": reply.text})
                else:
                    yield _sse("done", {**head, "text": reply.text, "tokens": reply.tokens, "finish": reply.finish,
                                        "replica": reply.replica_id, "seconds": round(time.monotonic() - t0, 4)})
                    return
                reply = await replies.__anext__()
        except DomainError as e:
            yield _sse("error", {"status": e.status_code, "detail": e.detail()})
        except StopAsyncIteration:
            yield _sse("error", {"status": 502, "detail": [{"msg": "the replica ended the stream without 'done'"}]})
        finally:
            await replies.aclose()

    return events()


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"
