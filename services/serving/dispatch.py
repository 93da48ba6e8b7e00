"""Sending one request to a router replica and waiting for its replies, over Redis (shared/serving.py).

No database here: the API's service layer resolves the expert set first, and bench/router_perf.py drives this
directly. ``exchange`` picks a ready replica that holds the expert (fewest queued requests first), pushes the
request onto its queue and yields the replies. While it waits it checks, every ``POLL_S``, that the replica is
still in the placement table:

* it vanished (killed, or stopping) or answered "stopping, retry" before its first reply: the request goes to
  the next replica holding the expert; when none is left, ``ReplicaLost`` (503);
* it vanished after replies were already relayed (a stream under way): ``ReplicaLost`` too, and the caller ends
  the stream with an error event: half a generation is never silently retried;
* the deadline passed: ``DeadlineExceeded`` (504), and the request is taken off the queue if still there.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from services.errors import DomainError, Unavailable
from shared import serving

POLL_S = 0.25
MAX_TRIES = 3


class DeadlineExceeded(DomainError):
    status_code = 504
    error_type = "timeout"


class ReplicaLost(Unavailable):
    """The replica serving a request went away and no other one could take it over."""


class ReplicaError(DomainError):
    """An error reply from a replica; ``status_code`` is the one it chose (422 bad input, 500, ...)."""

    def __init__(self, reply: serving.Reply) -> None:
        super().__init__(reply.message or "the router replica failed the request", loc=["body", "text"]
                         if reply.status == 422 else None)
        self.status_code = reply.status
        self.error_type = {422: "value_error", 503: "unavailable"}.get(reply.status, "router_error")


class Dispatcher:
    def __init__(self, redis: Any, *, allow: Callable[[serving.Announcement], bool] | None = None) -> None:
        self.redis = redis  # a redis.asyncio.Redis
        self.allow = allow  # which replicas this caller may use (the API: its project's router jobs)

    async def table(self, expert_set_id: str) -> list[serving.Announcement]:
        """The live replicas of an expert set (entries whose announcement expired are pruned)."""
        index = serving.set_index_key(expert_set_id)
        ids = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in await self.redis.smembers(index))
        if not ids:
            return []
        raws = await self.redis.mget([serving.replica_key(i) for i in ids])
        out, dead = [], []
        for rid, raw in zip(ids, raws, strict=True):
            if raw is None:
                dead.append(rid)
            else:
                out.append(serving.Announcement.model_validate_json(raw))
        if dead:
            await self.redis.srem(index, *dead)
        return [a for a in out if self.allow is None or self.allow(a)]

    async def exchange(self, expert_set_id: str, req: serving.Request, *,
                       table: list[serving.Announcement] | None = None) -> AsyncGenerator[serving.Reply, None]:
        """Send ``req`` to a ready replica holding ``req.expert`` (any for a route) and yield its replies up to
        the last one (``route``, ``done`` or an error, which is raised as ``ReplicaError``)."""
        tried: list[str] = []
        while True:
            live = table if table is not None else await self.table(expert_set_id)
            table = None  # a retry reads the table again
            holders = [a for a in live if a.state == "ready" and a.replica_id not in tried
                       and (req.op == "route" or a.holds(req.expert))]
            if not holders:
                raise self._nobody(expert_set_id, req, live, tried)
            low = min(a.queue_depth for a in holders)
            target = random.choice([a for a in holders if a.queue_depth == low])
            tried.append(target.replica_id)
            relayed = False
            try:
                async for reply in self._one(target, req):
                    relayed = True
                    yield reply
                return
            except ReplicaLost:
                if relayed or len(tried) >= MAX_TRIES:
                    raise
            except ReplicaError as e:
                if e.status_code != 503 or relayed or len(tried) >= MAX_TRIES:
                    raise
            req = req.model_copy(update={"id": uuid.uuid4().hex})

    async def _one(self, target: serving.Announcement, req: serving.Request) -> AsyncIterator[serving.Reply]:
        queue, reply_key, alive_key = (serving.queue_key(target.replica_id), serving.reply_key(req.id),
                                       serving.replica_key(target.replica_id))
        payload = req.model_copy(update={"sent_at": time.time()}).model_dump_json()
        pipe = self.redis.pipeline()
        pipe.rpush(queue, payload)
        pipe.expire(queue, serving.REPLY_TTL_S)  # a dead replica's queue does not outlive its requests
        await pipe.execute()
        try:
            while True:
                left = req.deadline - time.time()
                if left <= 0:
                    await self.redis.lrem(queue, 0, payload)
                    raise DeadlineExceeded(f"no answer from router replica {target.replica_id} before the deadline "
                                           f"({req.op}); raise timeout_s or add replicas", loc=["body", "timeout_s"])
                got = await self.redis.blpop([reply_key], timeout=max(0.01, min(POLL_S, left)))
                if got is None:
                    if not await self.redis.exists(alive_key):
                        await self.redis.lrem(queue, 0, payload)
                        raise ReplicaLost(f"router replica {target.replica_id} stopped while serving this {req.op} "
                                          f"request", retry_after=1)
                    continue
                reply = serving.Reply.model_validate_json(got[1])
                if reply.type == "error":
                    raise ReplicaError(reply)
                yield reply
                if reply.type in ("route", "done"):
                    return
        finally:
            await self.redis.delete(reply_key)

    @staticmethod
    def _nobody(expert_set_id: str, req: serving.Request, live: list[serving.Announcement],
                tried: list[str]) -> Unavailable:
        what = "route" if req.op == "route" else (
            "the base model" if req.expert is None else f"expert {req.expert!r}")
        if tried:
            return ReplicaLost(f"router replica(s) {', '.join(tried)} stopped while serving this request and no "
                               f"other ready replica holds {what}; retry shortly", retry_after=2)
        loading = [a.replica_id for a in live if a.state == "loading"]
        hint = (f" ({len(loading)} replica(s) still loading: retry shortly)" if loading else
                "; start one with a router job (shared/specs/examples/router-expert-set.yaml)")
        return Unavailable(f"no ready router replica of this expert set ({expert_set_id[:12]}) serves {what}{hint}",
                           loc=["body", "expert_set"], retry_after=2)


async def call(dispatcher: Dispatcher, expert_set_id: str, req: serving.Request,
               table: list[serving.Announcement] | None = None) -> serving.Reply:
    """The last reply of a request that streams nothing (a route, or a generation without ``stream``)."""
    last: serving.Reply | None = None
    async for reply in dispatcher.exchange(expert_set_id, req, table=table):
        last = reply
    assert last is not None
    return last


def new_request(op: str, text: str, *, timeout_s: float, **fields: Any) -> serving.Request:
    return serving.Request(id=uuid.uuid4().hex, op=op, text=text, deadline=time.time() + timeout_s,
                           **fields)
