"""A router replica: the ``router`` service job's entry point (``run(ctx)``), and ``Replica``, its serving loop.

Start-up: unpack the expert set → announce ``loading`` with the experts it will hold → load the base once and
check every adapter fits it (a set trained on another base fails here, naming the expert) → load the pinned
adapters → announce ``ready``. Then it pops requests from its own queue (shared/serving.py), waits up to
``batch_window_ms`` for more, answers route requests in one embedding batch and generation requests grouped by
expert (``batching``), and keeps going on bad input: an error reply, never a stopped replica.

A stop (cancel, worker shutdown: SIGTERM sets ``ctx.stop_requested``) withdraws the announcement first, so no
new request comes, tells the requests still queued to go elsewhere (503, which the control plane retries on
another replica), and exits as preempted: a cancelled job ends cancelled, a preempted one is re-queued.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from shared import serving
from shared.specs.router import RouterSpec
from workers.router.announce import Announcer
from workers.router.embedder import QueryEmbedder
from workers.router.engine import Engine, PromptTooLong, Row
from workers.router.metrics import ReplicaMetrics, expert_label
from workers.text import expert_set as es
from workers.text.base_model import load_base

log = logging.getLogger("crucible.router")
POLL_S = 0.25


class ReplicaConfigError(ValueError):
    """The replica cannot serve as specified (wrong set, experts, base, budget); not retried."""


def held_experts(spec: RouterSpec, expert_set: es.ExpertSet) -> list[str]:
    """The experts this replica holds: ``spec.experts``, else shard ``placement.shard`` of ``placement.shards``."""
    ids = expert_set.expert_ids
    if spec.experts is not None:
        unknown = [e for e in spec.experts if e not in ids]
        if unknown:
            raise ReplicaConfigError(f"experts {unknown[:10]} are not in expert set {expert_set.name!r} "
                                     f"(it has {ids[:20]})")
        held = list(spec.experts)
    else:
        held = [e for i, e in enumerate(ids) if i % spec.placement.shards == spec.placement.shard]
    missing = [p for p in spec.pinned if p not in held]
    if missing:
        raise ReplicaConfigError(f"pinned experts {missing[:10]} are not held by this replica (held: {held[:20]})")
    return held


class Replica:
    def __init__(self, spec: RouterSpec, expert_set: es.ExpertSet, redis: Any, *, job_id: str,
                 expert_set_id: str, log_line: Callable[[str], None] = log.info) -> None:
        self.spec, self.expert_set, self.redis = spec, expert_set, redis
        self.held = held_experts(spec, expert_set)
        self.id = f"{job_id[:8]}-{uuid.uuid4().hex[:8]}"
        self.queue = serving.queue_key(self.id)
        self.metrics = ReplicaMetrics()
        self.log = log_line
        self.fallback_margin = (spec.fallback_margin if spec.fallback_margin is not None
                                else expert_set.manifest.fallback_margin)
        self.engine: Engine | None = None
        self.embedder: QueryEmbedder | None = None
        self.announcer = Announcer(redis, serving.Announcement(
            replica_id=self.id, job_id=job_id, expert_set=expert_set_id,
            expert_set_name=expert_set.name, experts=self.held, all_experts=expert_set.expert_ids, state="loading",
            fallback_margin=self.fallback_margin, context_length=0, max_new_tokens=spec.max_new_tokens,
            host=socket.gethostname(), pid=os.getpid(), started_at=time.time()),
            heartbeat_s=spec.heartbeat_s, refresh=self._refresh)

    # --- start-up ---------------------------------------------------------------------------
    def start(self) -> Replica:
        """Announce ``loading``, load everything, announce ``ready`` (withdrawn again if loading fails)."""
        self.announcer.start()
        try:
            self._load()
        except BaseException:
            self.announcer.withdraw()
            raise
        return self

    def _load(self) -> None:
        ref = self.expert_set.manifest.base_model.ref
        t0 = time.monotonic()
        # fault injection for the tests: hold "loading" this long, so a replica can be killed mid-load
        time.sleep(float(os.environ.get("CRUCIBLE_ROUTER_LOAD_DELAY_S", "0") or 0))
        try:
            base = load_base(ref)
        except (FileNotFoundError, OSError, ValueError) as e:
            raise ReplicaConfigError(str(e)) from e
        es.check_against_base(self.expert_set, base.model)  # ExpertSetError names the expert
        if self.spec.device == "cuda" or (self.spec.device == "auto" and _cuda()):
            base.model.to("cuda")
        budget = int(self.spec.memory_budget_mb * 2**20)
        from workers.router.adapters import AdapterBudgetError

        try:
            self.engine = Engine(base, self.expert_set, budget_bytes=budget, pinned=self.spec.pinned,
                                 cache=self.spec.adapter_cache, on_load=self.metrics.loaded,
                                 on_evict=self.metrics.evicted)
        except AdapterBudgetError as e:
            raise ReplicaConfigError(str(e)) from e
        self.embedder = QueryEmbedder(self.expert_set.manifest.embedder, self.expert_set.root, base=base,
                                      adapters_off=self.engine.adapters_off).load()
        port = self.spec.metrics_port or int(os.environ.get("CRUCIBLE_ROUTER_METRICS_PORT", "0") or 0)
        _, bound = self.metrics.serve(port)
        self.announcer.update(state="ready", context_length=base.max_positions,
                              metrics_url=f"http://{socket.gethostname()}:{bound}/metrics")
        self.log(f"router replica {self.id} ready in {time.monotonic() - t0:.1f}s: expert set "
                 f"{self.expert_set.name!r}, holds {len(self.held)} of {len(self.expert_set.expert_ids)} experts, "
                 f"pinned {self.spec.pinned}, metrics on port {bound}")

    def _refresh(self, a: serving.Announcement) -> None:
        a.resident = self.engine.cache.resident if self.engine is not None else []
        a.queue_depth = int(self.redis.llen(self.queue))

    # --- serving ----------------------------------------------------------------------------
    def serve(self, should_stop: Callable[[], bool]) -> None:
        """Answer requests until ``should_stop()``; then withdraw and turn the queued requests away."""
        try:
            while not should_stop():
                batch = self._collect()
                if batch:
                    self.handle(batch)
        finally:
            self.stop()

    def stop(self) -> None:
        self.announcer.withdraw()
        while raw := self.redis.lpop(self.queue):
            req = _parse(raw)
            if req is not None:
                self._reply(req, serving.Reply(type="error", status=503, message="the replica is stopping; retry"))
        self.redis.delete(self.queue)

    def _collect(self) -> list[serving.Request]:
        got = self.redis.blpop([self.queue], timeout=POLL_S)
        if got is None:
            return []
        raws = [got[1]]
        window_end = time.monotonic() + self.spec.batch_window_ms / 1000
        cap = self.spec.max_batch * 4  # route requests are cheap; a few generation batches per round
        while len(raws) < cap:
            more = self.redis.lpop(self.queue, cap - len(raws))
            if more:
                raws.extend(more)
                continue
            left = window_end - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, 0.002))
        now = time.time()
        out = []
        for raw in raws:
            req = _parse(raw)
            if req is None:
                continue
            if req.deadline < now:  # nobody waits for it any more
                self.metrics.errors.labels(req.op, expert_label(req.expert), "expired").inc()
                continue
            out.append(req)
        return out

    def handle(self, batch: Sequence[serving.Request]) -> None:
        routes = [r for r in batch if r.op == "route"]
        gens = [r for r in batch if r.op == "generate"]
        if routes:
            self._route(routes)
        if gens:
            self._generate(gens)

    def _route(self, reqs: Sequence[serving.Request]) -> None:
        assert self.embedder is not None
        try:
            vectors = self.embedder.embed([r.text for r in reqs])
            ids, margins = self.expert_set.route(vectors)
        except Exception as e:
            log.exception("routing failed")
            for r in reqs:
                self._fail(r, 500, "internal", f"routing failed on replica {self.id}: {type(e).__name__}: {e}")
            return
        self.metrics.batch.labels("route").observe(len(reqs))
        for r, expert, margin in zip(reqs, ids, margins, strict=True):
            m = float(margin)
            self._reply(r, serving.Reply(type="route", expert=expert, margin=m, fallback=m < self.fallback_margin))
            self._count(r, expert)

    def _generate(self, reqs: Sequence[serving.Request]) -> None:
        assert self.engine is not None
        ready: list[tuple[serving.Request, Row]] = []
        for r in reqs:
            if r.expert is not None and r.expert not in self.held:
                self._fail(r, 503, "not_held", f"replica {self.id} does not hold expert {r.expert!r}; retry")
                continue
            limit = min(r.max_new_tokens or self.spec.max_new_tokens, self.spec.max_new_tokens)
            try:
                self.engine.check_prompt(r.text, limit)
            except PromptTooLong as e:
                self._fail(r, 422, "bad_input", str(e))
                continue
            on_text = self._streamer(r) if r.stream else None
            ready.append((r, Row(r.text, r.expert, limit, on_text=on_text)))
        for group in self._groups(ready):
            self._run(group)

    def _groups(self, ready: list[tuple[serving.Request, Row]]) -> list[list[tuple[serving.Request, Row]]]:
        mode, cap = self.spec.batching, self.spec.max_batch
        if mode == "off":
            return [[item] for item in ready]
        if mode == "mixed":
            return [ready[i:i + cap] for i in range(0, len(ready), cap)]
        by_expert: dict[str | None, list[tuple[serving.Request, Row]]] = {}
        for item in ready:  # insertion order: the group of the oldest request goes first
            by_expert.setdefault(item[1].expert, []).append(item)
        return [g[i:i + cap] for g in by_expert.values() for i in range(0, len(g), cap)]

    def _run(self, group: list[tuple[serving.Request, Row]]) -> None:
        assert self.engine is not None
        self.metrics.batch.labels("generate").observe(len(group))
        try:
            self.engine.generate([row for _, row in group])
        except Exception as e:
            log.exception("generation failed")
            for r, _ in group:
                self._fail(r, 500, "internal", f"generation failed on replica {self.id}: {type(e).__name__}: {e}")
            return
        for r, row in group:
            if row.expert is None:
                self.metrics.fallbacks.inc()
            self._reply(r, serving.Reply(type="done", expert=row.expert, margin=r.margin, fallback=row.expert is None,
                                         text=row.text, tokens=len(row.tokens), finish=row.finish))
            self._count(r, row.expert)

    def _streamer(self, r: serving.Request) -> Callable[[str], None]:
        def push(piece: str) -> None:
            self._reply(r, serving.Reply(type="text", text=piece, expert=r.expert))

        return push

    def _reply(self, r: serving.Request, reply: serving.Reply) -> None:
        key = serving.reply_key(r.id)
        reply.replica_id = self.id
        pipe = self.redis.pipeline()
        pipe.rpush(key, reply.model_dump_json())
        pipe.expire(key, serving.REPLY_TTL_S)
        pipe.execute()

    def _count(self, r: serving.Request, expert: str | None) -> None:
        label = expert_label(expert)
        self.metrics.requests.labels(r.op, label).inc()
        self.metrics.latency.labels(r.op, label).observe(max(0.0, time.time() - r.sent_at))

    def _fail(self, r: serving.Request, status: int, reason: str, message: str) -> None:
        self.metrics.errors.labels(r.op, expert_label(r.expert), reason).inc()
        self._reply(r, serving.Reply(type="error", status=status, message=message, expert=r.expert))


def _parse(raw: bytes | str) -> serving.Request | None:
    try:
        return serving.Request.model_validate_json(raw)
    except ValidationError:
        log.warning("dropped a malformed router request: %.200r", raw)
        return None


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def redis_client(url: str | None = None) -> Any:
    """The broker's Redis (the router's requests travel over the broker); an error names the setting."""
    import redis

    from shared.config import get_settings

    url = url or get_settings().BROKER_URL
    if not url.startswith(("redis://", "rediss://")):
        raise ReplicaConfigError(f"the router needs a Redis broker (CRUCIBLE_BROKER_URL=redis://...), not {url!r}")
    return redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)


# --- the job -------------------------------------------------------------------------------------
def run(ctx: Any) -> None:
    """The ``router`` job: serve until cancelled (or the worker stops: the job is re-queued elsewhere)."""
    from workers.runtime.context import JobConfigError, Preempted

    spec: RouterSpec = ctx.spec
    try:
        tar = expert_set_tar(Path(ctx.inputs["checkpoints"]["expert_set"]["path"]), Path(ctx.workdir))
        expert_set = es.unpack(tar, Path(ctx.workdir) / "expert_set")
        replica = Replica(spec, expert_set, redis_client(), job_id=str(ctx.job_id), expert_set_id=sha256_file(tar),
                          log_line=ctx.log)
        replica.start()
    except (es.ExpertSetError, ReplicaConfigError) as e:
        raise JobConfigError(str(e)) from e
    replica.serve(lambda: bool(ctx.stop_requested))
    raise Preempted()  # stopped on request: cancel ends the job cancelled, a shutdown re-queues it


def expert_set_tar(path: Path, workdir: Path) -> Path:
    """The expert-set tar of an input: the ``expert-set`` artifact itself, or the expert-set job's checkpoint,
    which carries the same bytes (``expert_set_tar``). Replicas announce under the tar's sha256, which is the
    artifact's, so the control plane finds them from either."""
    import tarfile

    if tarfile.is_tarfile(path):
        return path
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ReplicaConfigError(f"the expert_set input is neither an expert-set tar nor a checkpoint: {e}") from e
    if not isinstance(state, dict) or "expert_set_tar" not in state:
        raise ReplicaConfigError("the expert_set input is a checkpoint of another kind of job (it carries no "
                                 "expert set): pass the expert-set artifact or the expert-set job")
    out = workdir / "expert_set.tar"
    out.write_bytes(state["expert_set_tar"])
    return out


def sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
