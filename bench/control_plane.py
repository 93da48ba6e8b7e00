"""Control-plane throughput: job submissions per second and latency percentiles at 32 concurrent clients
against real Postgres, side by side with two baselines on the same server in the same run:
``GET /healthz`` (framework + HTTP floor, no database) and ``GET /v1/jobs/{id}`` (one authenticated read).

    python -m bench.control_plane [--clients 32] [--seconds 10] [--api-workers 2]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable

import httpx

from bench.common import machine, new_key, processes, real_stack
from services import localstack
from tests.stack import wait_http

SPEC = {"kind": "ssl-train", "dataset": "builtin://shapes", "limit_train": 256, "batch_size": 64, "bank_size": 128,
        "epochs": 1, "experiment": "bench"}


def hammer(make_request: Callable[[httpx.Client], httpx.Response], *, url: str, token: str, clients: int,
           seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client_loop() -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
            local, bad = [], 0
            while time.monotonic() < stop_at:
                t0 = time.perf_counter()
                r = make_request(http)
                dt = time.perf_counter() - t0
                if r.status_code >= 400:
                    bad += 1
                else:
                    local.append(dt)
            with lock:
                latencies.extend(local)
                errors[0] += bad

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    latencies.sort()
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [float("nan")] * 99
    return {"rps": len(latencies) / wall, "p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000,
            "n": float(len(latencies)), "errors": float(errors[0])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--api-workers", type=int, default=2)
    args = ap.parse_args()
    with real_stack():
        port = localstack.free_port()
        # No scheduler: this measures the API + Postgres write path, not dispatch.
        with processes(["api", "--port", str(port), "--workers", str(args.api_workers)]):
            url = f"http://127.0.0.1:{port}"
            wait_http(f"{url}/healthz", timeout=60)
            token = new_key()
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as h:
                job_id = h.post("/v1/jobs", json=SPEC).json()["id"]
            run = {"url": url, "token": token, "clients": args.clients, "seconds": args.seconds}
            hammer(lambda h: h.get("/healthz"), **{**run, "seconds": 2})  # warm-up
            health = hammer(lambda h: h.get("/healthz"), **run)
            read = hammer(lambda h: h.get(f"/v1/jobs/{job_id}"), **run)
            submit = hammer(lambda h: h.post("/v1/jobs", json=SPEC), **run)
    print(f"control plane, {args.clients} concurrent clients, {args.seconds:.0f}s each, "
          f"{args.api_workers} API worker process(es); machine: {machine()}")
    print(f"{'endpoint':28} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'req/s vs healthz':>17}")
    for name, r in (("GET /healthz (baseline)", health), ("GET /v1/jobs/{id}", read), ("POST /v1/jobs", submit)):
        print(f"{name:28} {r['rps']:8.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {r['errors']:7.0f} "
              f"{r['rps'] / health['rps']:16.2f}x")


if __name__ == "__main__":
    main()
