"""Router throughput and latency: adapter cache + per-expert batching vs cache without batching vs loading the
adapter for every request, at 1, 8 and 32 concurrent clients, plus the time to route alone.

One run, one command. A private redis-server carries the requests (as in production); each configuration is one
replica process (workers/router/replica.py, the same code a router job runs) serving an expert set of
``--experts`` random LoRA adapters on ``--base`` (``tiny-random`` by default; ``smollm2-135m`` for the real
135M LM). Clients are the control plane's own dispatcher (services/serving/dispatch.py) in asyncio tasks, each
sending generation requests for a uniformly random expert back to back.

    python -m bench.router_perf [--base tiny-random] [--experts 8] [--new-tokens 8] [--requests 24]

``--requests`` is per client count x client (capped: 1 client sends it, 8 send 2x it in all, 32 send 4x).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CONFIGS: dict[str, dict[str, Any]] = {
    "a: cache + per-expert batching": {"adapter_cache": True, "batching": "per-expert"},
    "b: cache, no batching": {"adapter_cache": True, "batching": "off"},
    "c: load adapter per request": {"adapter_cache": False, "batching": "off"},
}
CLIENTS = (1, 8, 32)
PROMPTS = ["the court ruled on the appeal", "def parse(x): return", "the striker scored twice",
           "mix the flour and sugar", "stock markets fell sharply", "the patient was given"]


def serve(args: argparse.Namespace) -> None:
    """Child mode: one replica serving until SIGTERM."""
    import redis
    import torch

    from shared.specs.router import RouterSpec
    from workers.router.replica import Replica
    from workers.text import expert_set as es

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    spec = RouterSpec.model_validate({"kind": "router", "expert_set": "artifact:" + "0" * 8 + "-0000-0000-0000-"
                                      + "0" * 12, **json.loads(args.config)})
    replica = Replica(spec, es.load(args.set), redis.Redis.from_url(args.redis), job_id=args.name,
                      expert_set_id=args.name).start()
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    replica.serve(lambda: stop["now"])


async def _clients(redis_url: str, set_id: str, n: int, total: int, experts: list[str], op: str,
                   new_tokens: int) -> tuple[float, list[float]]:
    import redis.asyncio

    from services.serving.dispatch import Dispatcher, call, new_request

    client = redis.asyncio.Redis.from_url(redis_url)
    d = Dispatcher(client)
    rng = random.Random(n)
    latencies: list[float] = []
    per = max(1, total // n)

    async def one() -> None:
        for _ in range(per):
            fields: dict[str, Any] = {"expert": rng.choice(experts), "max_new_tokens": new_tokens} \
                if op == "generate" else {}
            t0 = time.perf_counter()
            await call(d, set_id, new_request(op, rng.choice(PROMPTS), timeout_s=600, **fields))
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    wall = time.perf_counter() - t0
    await client.aclose()
    return len(latencies) / wall, latencies


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def _wait_ready(redis_url: str, name: str, proc: subprocess.Popen[bytes], timeout: float = 600) -> None:
    import redis

    from shared import serving

    r = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for rid in r.smembers(serving.set_index_key(name)):
            raw = r.get(serving.replica_key(rid.decode() if isinstance(rid, bytes) else str(rid)))
            if raw and serving.Announcement.model_validate_json(raw).state == "ready":
                return
        if proc.poll() is not None:
            raise RuntimeError(f"replica {name} exited with {proc.returncode}")
        time.sleep(0.2)
    raise TimeoutError(f"replica {name} not ready after {timeout}s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="tiny-random")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--requests", type=int, default=24, help="requests at 1 client (x2 at 8, x4 at 32)")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--set"), p.add_argument("--redis"), p.add_argument("--config"), p.add_argument("--name")
    args = p.parse_args()
    if args.serve:
        serve(args)
        return

    from bench.common import ROOT, machine
    from services import localstack
    from tests import router_set
    from workers.text import expert_set as es

    work = Path(tempfile.mkdtemp(prefix="crucible-router-perf-"))
    port = localstack.free_port()
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    redis_proc = subprocess.Popen([server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly",
                                   "no", "--dir", str(work)], stdout=subprocess.DEVNULL, start_new_session=True)
    redis_url = f"redis://127.0.0.1:{port}/0"
    rows: list[tuple[str, int, float, float, float]] = []
    route_rows: list[tuple[int, float, float, float]] = []
    try:
        localstack.wait_until(lambda: localstack.port_open("127.0.0.1", port), timeout=20, what="redis")
        t0 = time.perf_counter()
        set_dir = router_set.build(work / "set", n_experts=args.experts, base=args.base, rank=8)
        experts = es.load(set_dir).expert_ids
        print(f"# {machine()}\n# base {args.base}, {args.experts} experts (LoRA r=8 on q,v), "
              f"{args.new_tokens} new tokens per request, set built in {time.perf_counter() - t0:.1f}s", flush=True)
        scale = {1: 1, 8: 2, 32: 4}
        for i, (label, cfg) in enumerate(CONFIGS.items()):
            name = f"cfg{i}"
            config = {**cfg, "memory_budget_mb": 1024, "max_batch": 32, "batch_window_ms": 5,
                      "max_new_tokens": args.new_tokens, "heartbeat_s": 1.0}
            proc = subprocess.Popen([sys.executable, "-m", "bench.router_perf", "--serve", "--set", str(set_dir),
                                     "--redis", redis_url, "--config", json.dumps(config), "--name", name],
                                    cwd=ROOT, start_new_session=True)
            try:
                _wait_ready(redis_url, name, proc)
                asyncio.run(_clients(redis_url, name, 4, 8, experts, "generate", args.new_tokens))  # warm-up
                for n in CLIENTS:
                    rps, lat = asyncio.run(_clients(redis_url, name, n, args.requests * scale[n], experts,
                                                    "generate", args.new_tokens))
                    rows.append((label, n, rps, _pct(lat, 0.5), _pct(lat, 0.99)))
                    print(f"{label:32s} {n:3d} clients  {rps:7.2f} req/s  p50 {_pct(lat, .5) * 1e3:8.1f} ms  "
                          f"p99 {_pct(lat, .99) * 1e3:8.1f} ms", flush=True)
                if i == 0:
                    for n in CLIENTS:
                        rps, lat = asyncio.run(_clients(redis_url, name, n, args.requests * 4 * scale[n], experts,
                                                        "route", 0))
                        route_rows.append((n, rps, _pct(lat, 0.5), _pct(lat, 0.99)))
            finally:
                localstack.stop(proc, timeout=20)
    finally:
        localstack.stop(redis_proc)
        shutil.rmtree(work, ignore_errors=True)
    _report(rows, route_rows)


def _report(rows: list[tuple[str, int, float, float, float]],
            route_rows: list[tuple[int, float, float, float]]) -> None:
    by = {(label, n): (rps, p50, p99) for label, n, rps, p50, p99 in rows}
    labels = list(CONFIGS)
    print("\n| configuration | clients | req/s | p50 ms | p99 ms |\n|---|---:|---:|---:|---:|")
    for label in labels:
        for n in CLIENTS:
            rps, p50, p99 = by[(label, n)]
            print(f"| {label} | {n} | {rps:.2f} | {p50 * 1e3:.1f} | {p99 * 1e3:.1f} |")
    a, b, c = labels
    print("\n| clients | req/s a/c | req/s b/c | req/s a/b | p99 c/a |\n|---:|---:|---:|---:|---:|")
    for n in CLIENTS:
        print(f"| {n} | {by[(a, n)][0] / by[(c, n)][0]:.2f}x | {by[(b, n)][0] / by[(c, n)][0]:.2f}x | "
              f"{by[(a, n)][0] / by[(b, n)][0]:.2f}x | {by[(c, n)][2] / by[(a, n)][2]:.2f}x |")
    print("\nroute only (embed + nearest centroid, through Redis; configuration a's replica):\n"
          "| clients | req/s | p50 ms | p99 ms |\n|---:|---:|---:|---:|")
    for n, rps, p50, p99 in route_rows:
        print(f"| {n} | {rps:.1f} | {p50 * 1e3:.1f} | {p99 * 1e3:.1f} |")


if __name__ == "__main__":
    main()
