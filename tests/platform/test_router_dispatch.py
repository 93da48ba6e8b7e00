"""The router's request path over a real (private) Redis: replicas in threads of this process, the control plane's
Dispatcher, and replicas that die, stall or stop mid-request. No database: the HTTP path is tests/e2e/."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services import localstack
from services.serving.dispatch import DeadlineExceeded, Dispatcher, ReplicaError, call, new_request
from shared import serving
from shared.specs.router import RouterSpec
from tests import router_set
from workers.router.replica import Replica
from workers.text import expert_set as es

SET_ID = "set-under-test"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    port = localstack.free_port()
    proc = subprocess.Popen([server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path_factory.mktemp("redis"))], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        localstack.wait_until(lambda: localstack.port_open("127.0.0.1", port), timeout=20, what="redis", proc=proc)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        localstack.stop(proc)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory: pytest.TempPathFactory) -> es.ExpertSet:
    import torch

    torch.set_num_threads(2)
    return es.load(router_set.build(tmp_path_factory.mktemp("set") / "set", n_experts=3))


class Running:
    """A replica serving in a thread until ``stop()``."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=replica.serve, args=(self.stopping.is_set,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=30)


@pytest.fixture
def start(redis_url: str, tiny_set: es.ExpertSet) -> Iterator[Any]:
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    running: list[Running] = []

    def _start(**spec: Any) -> Running:
        s = RouterSpec.model_validate({"kind": "router", "expert_set": "artifact:" + "0" * 8 + "-0000-0000-0000-"
                                       + "0" * 12, "heartbeat_s": 0.2, **spec})
        r = Running(Replica(s, tiny_set, redis.Redis.from_url(redis_url), job_id="test-job-" + str(len(running)),
                            expert_set_id=SET_ID).start())
        running.append(r)
        return r

    yield _start
    for r in running:
        r.stop()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _dispatcher(redis_url: str) -> Dispatcher:
    import redis.asyncio

    return Dispatcher(redis.asyncio.Redis.from_url(redis_url))


def test_route_and_generate_reach_a_replica_holding_the_expert(start: Any, redis_url: str) -> None:
    a = start(experts=["e0", "e1"])
    b = start(experts=["e2"], fallback_margin=0.0)

    async def go() -> tuple[Any, ...]:
        d = await _dispatcher(redis_url)
        routed = await call(d, SET_ID, new_request("route", router_set.topic_text(2), timeout_s=20))
        gen = await call(d, SET_ID, new_request("generate", "hello", expert="e2", max_new_tokens=5, timeout_s=20))
        pieces = [r async for r in d.exchange(SET_ID, new_request("generate", "hi", expert="e0", max_new_tokens=4,
                                                                   stream=True, timeout_s=20))]
        table = await d.table(SET_ID)
        return routed, gen, pieces, table

    routed, gen, pieces, table = run(go())
    assert routed.expert == "e2" and routed.margin > 0
    assert gen.replica_id == b.replica.id and gen.tokens == 5 and gen.finish == "length"
    assert pieces[-1].type == "done" and pieces[-1].replica_id == a.replica.id
    assert "".join(p.text for p in pieces[:-1]) == pieces[-1].text and len(pieces) >= 2
    assert {t.replica_id: t.experts for t in table} == {a.replica.id: ["e0", "e1"], b.replica.id: ["e2"]}
    assert all(t.state == "ready" for t in table)
    # per-expert Prometheus metrics on the replica's own /metrics (its URL is in the announcement)
    import urllib.request

    url = next(t.metrics_url for t in table if t.replica_id == b.replica.id)
    assert url is not None
    port = url.rsplit(":", 1)[1]
    scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}", timeout=5).read().decode()
    assert 'crucible_router_requests_total{expert="e2",op="generate"} 1.0' in scraped
    assert 'crucible_router_adapter_loads_total{expert="e2"} 1.0' in scraped
    assert 'crucible_router_adapter_resident{expert="e2"} 1.0' in scraped
    assert "crucible_router_latency_seconds_bucket" in scraped


def test_a_replica_that_dies_mid_request_is_retried_on_another_holder(start: Any, redis_url: str) -> None:
    import redis

    good = start(experts=["e1"])
    r = redis.Redis.from_url(redis_url)
    # a dead replica: announced as ready and holding e1, but nothing serves its queue; its entry then lapses
    dead = serving.Announcement(replica_id="dead-1", job_id="x", expert_set=SET_ID, expert_set_name="tiny",
                                experts=["e1"], all_experts=["e0", "e1", "e2"], state="ready", fallback_margin=0,
                                context_length=128, max_new_tokens=64, queue_depth=-1)  # sorts first: picked
    r.set(serving.replica_key("dead-1"), dead.model_dump_json(), ex=1)
    r.sadd(serving.set_index_key(SET_ID), "dead-1")

    async def go() -> Any:
        d = await _dispatcher(redis_url)
        t0 = time.monotonic()
        reply = await call(d, SET_ID, new_request("generate", "x", expert="e1", max_new_tokens=2, timeout_s=30))
        return reply, time.monotonic() - t0

    reply, took = run(go())
    assert reply.type == "done" and reply.replica_id == good.replica.id
    assert took < 5, "the lapse of the dead replica's entry (1 s TTL) is noticed, not the 30 s deadline"
    good.stop()

    async def nobody() -> None:
        d = await _dispatcher(redis_url)
        await call(d, SET_ID, new_request("generate", "x", expert="e1", max_new_tokens=2, timeout_s=30))

    with pytest.raises(Exception, match="no ready router replica .* serves expert 'e1'") as e:
        run(nobody())
    assert getattr(e.value, "status_code", None) == 503


def test_a_stalled_replica_times_out_at_the_deadline_and_a_stopped_one_sends_requests_elsewhere(
        start: Any, redis_url: str) -> None:
    import redis

    r = redis.Redis.from_url(redis_url)
    stalled = serving.Announcement(replica_id="stalled", job_id="x", expert_set=SET_ID, expert_set_name="tiny",
                                   experts=["e0"], all_experts=["e0"], state="ready", fallback_margin=0,
                                   context_length=128, max_new_tokens=64)
    r.set(serving.replica_key("stalled"), stalled.model_dump_json(), ex=60)
    r.sadd(serving.set_index_key(SET_ID), "stalled")

    async def go() -> None:
        d = await _dispatcher(redis_url)
        await call(d, SET_ID, new_request("route", "anything", timeout_s=1.0))

    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="before the deadline"):
        run(go())
    assert time.monotonic() - t0 < 3
    assert r.llen(serving.queue_key("stalled")) == 0  # the expired request was taken back
    r.delete(serving.replica_key("stalled"))

    # requests queued at a replica that stops are turned away with "retry" and served by the other holder
    first, second = start(experts=["e0"]), start(experts=["e0"])
    req = new_request("generate", "queued", expert="e0", max_new_tokens=2, timeout_s=20)
    first.stop()
    r.rpush(serving.queue_key(first.replica.id), req.model_dump_json())  # as if sent just before it stopped
    first.replica.stop()
    got = r.blpop([serving.reply_key(req.id)], timeout=5)
    assert got is not None and serving.Reply.model_validate_json(got[1]).status == 503

    async def retried() -> Any:
        d = await _dispatcher(redis_url)
        return await call(d, SET_ID, new_request("generate", "again", expert="e0", max_new_tokens=2, timeout_s=20))

    assert run(retried()).replica_id == second.replica.id


def test_bad_input_gets_a_clear_error_and_the_replica_keeps_serving(start: Any, redis_url: str) -> None:
    start(experts=["e0", "e1", "e2"])

    async def go() -> tuple[Any, Any]:
        d = await _dispatcher(redis_url)
        with pytest.raises(ReplicaError, match="context is 512 tokens") as too_long:
            await call(d, SET_ID, new_request("generate", "z" * 600, expert="e0", max_new_tokens=4, timeout_s=20))
        after = await call(d, SET_ID, new_request("generate", "short", expert="e0", max_new_tokens=3, timeout_s=20))
        return too_long.value, after

    err, after = run(go())
    assert err.status_code == 422 and err.loc == ["body", "text"]
    assert after.type == "done" and after.tokens == 3


def test_low_margin_falls_back_to_the_base_model(start: Any, redis_url: str, tiny_set: es.ExpertSet) -> None:
    start(experts=["e0"], fallback_margin=2.0)  # every margin is below 2: always the base

    async def go() -> Any:
        d = await _dispatcher(redis_url)
        return await call(d, SET_ID, new_request("route", router_set.topic_text(0), timeout_s=20))

    reply = run(go())
    assert reply.expert == "e0" and reply.fallback is True


def test_replica_refuses_experts_the_set_does_not_have(redis_url: str, tiny_set: es.ExpertSet) -> None:
    import redis

    from workers.router.replica import ReplicaConfigError

    spec = RouterSpec.model_validate({"kind": "router", "expert_set": "artifact:" + "0" * 8 + "-0000-0000-0000-"
                                      + "0" * 12, "experts": ["e0", "e9"]})
    with pytest.raises(ReplicaConfigError, match=r"experts \['e9'\] are not in expert set"):
        Replica(spec, tiny_set, redis.Redis.from_url(redis_url), job_id="j", expert_set_id=SET_ID)


def test_placement_shards_cover_the_set_once(tiny_set: es.ExpertSet) -> None:
    from workers.router.replica import held_experts

    base = {"kind": "router", "expert_set": "artifact:" + "0" * 8 + "-0000-0000-0000-" + "0" * 12}
    shards = [held_experts(RouterSpec.model_validate({**base, "placement": {"shard": i, "shards": 2}}), tiny_set)
              for i in range(2)]
    assert shards == [["e0", "e2"], ["e1"]]
    assert Path(tiny_set.root).is_dir()
