"""Control-plane speed against real Postgres and Redis: this tree's code beside a baseline commit, same run.

For each variant (this tree, then ``--baseline`` checked out in a temporary clone, each on its own database
and API processes) it measures, with a load generator that is not the bottleneck (several client processes,
each an asyncio loop of keep-alive connections speaking bare HTTP/1.1):

* closed loop at 8 and 32 concurrent clients: ``POST /v1/jobs``, ``GET /v1/jobs/{id}`` and ``GET /healthz``
  (the framework + HTTP floor): requests/s, p50, p99;
* open loop at a fixed rate (300 requests/s): p50/p99 measured from each request's *scheduled* start, so a
  stall is not hidden by the client waiting (no coordinated omission);
* submit → claimed: the median time from a submission to the worker's claim (``started_at``) with a scheduler
  and an idle worker, one job at a time.

    python -m bench.control_plane [--seconds 5] [--api-workers 2] [--baseline 44a7c1e] [--no-baseline]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from bench.common import ROOT, machine, processes, real_stack
from services import localstack
from tests.stack import wait_http

SPEC = {"kind": "ssl-train", "dataset": "builtin://shapes", "limit_train": 256, "batch_size": 64, "bank_size": 128,
        "epochs": 1, "experiment": "bench"}
CLIENT_PROCS = 2


# --- the load generator --------------------------------------------------------------------------------------
class Conn:
    """One keep-alive HTTP/1.1 connection; a few microseconds of client CPU per request."""

    def __init__(self, host: str, port: int, token: str) -> None:
        self.host, self.port, self.token = host, port, token
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nAuthorization: Bearer {self.token}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        assert self.reader is not None
        raw = await self.reader.readuntil(b"\r\n\r\n")
        status = int(raw[9:12])
        length = 0
        for line in raw.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if length:
            await self.reader.readexactly(length)
        return status


def _client_proc(host: str, port: int, token: str, method: str, path: str, body: bytes, conns: int,
                 seconds: float, rate: float, start_at: float, out: Any) -> None:
    async def main() -> tuple[list[float], int]:
        lat: list[float] = []
        errors = 0
        pool = [Conn(host, port, token) for _ in range(conns)]
        while time.time() < start_at:
            await asyncio.sleep(0.005)
        t0 = time.perf_counter()
        stop = t0 + seconds

        async def closed(c: Conn) -> None:
            nonlocal errors
            while (now := time.perf_counter()) < stop:
                try:
                    code = await c.request(method, path, body)
                except (OSError, asyncio.IncompleteReadError):
                    code, c.writer = 599, None
                if code >= 400:
                    errors += 1
                else:
                    lat.append(time.perf_counter() - now)

        async def open_loop() -> None:  # request i is due at t0 + i / rate, whatever happened before
            nonlocal errors
            free: asyncio.Queue[Conn] = asyncio.Queue()
            for c in pool:
                free.put_nowait(c)
            tasks = []

            async def one(due: float) -> None:
                nonlocal errors
                c = await free.get()
                try:
                    code = await c.request(method, path, body)
                except (OSError, asyncio.IncompleteReadError):
                    code, c.writer = 599, None
                free.put_nowait(c)
                if code >= 400:
                    errors += 1
                else:
                    lat.append(time.perf_counter() - due)

            i = 0
            while (due := t0 + i / rate) < stop:
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.ensure_future(one(due)))
                i += 1
            await asyncio.gather(*tasks)

        if rate > 0:
            await open_loop()
        else:
            await asyncio.gather(*(closed(c) for c in pool))
        return lat, errors

    out.put(asyncio.run(main()))


def load(url: str, token: str, method: str, path: str, *, clients: int, seconds: float, rate: float = 0,
         body: dict[str, Any] | None = None) -> dict[str, float]:
    """Closed loop with ``clients`` connections (rate=0), or open loop at ``rate`` requests/s in total."""
    host, port = url.removeprefix("http://").split(":")
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    start_at = time.time() + 0.5
    raw = json.dumps(body).encode() if body is not None else b""
    procs = [ctx.Process(target=_client_proc, args=(host, int(port), token, method, path, raw,
                                                    max(1, clients // CLIENT_PROCS), seconds, rate / CLIENT_PROCS,
                                                    start_at, out)) for _ in range(CLIENT_PROCS)]
    for p in procs:
        p.start()
    results = [out.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join()
    lat = sorted(x for r in results for x in r[0])
    errors = sum(r[1] for r in results)
    q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [float("nan")] * 99
    return {"rps": len(lat) / seconds, "p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000, "errors": float(errors)}


# --- one variant: its code, its database, its processes -------------------------------------------------------
@contextmanager
def variant_tree(commit: str | None) -> Iterator[Path]:
    if commit is None:
        yield ROOT
        return
    with tempfile.TemporaryDirectory(prefix="crucible-bench-baseline-") as tmp:
        subprocess.run(["git", "clone", "-q", "--shared", "--no-checkout", str(ROOT), tmp], check=True)
        subprocess.run(["git", "-C", tmp, "checkout", "-q", commit], check=True)
        yield Path(tmp)


def _py(tree: Path, env: dict[str, str], code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], cwd=tree, env={**env, "PYTHONPATH": str(tree)},
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return r.stdout.strip()


def claim_latency(url: str, token: str, env: dict[str, str], *, samples: int) -> float:
    """Median submit → claimed (the job row's started_at - created_at), one job at a time, idle worker."""
    import httpx
    from sqlalchemy import create_engine, text

    engine = create_engine(env["CRUCIBLE_DATABASE_URL"])
    delays: list[float] = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        def idle() -> bool:
            with engine.connect() as c:
                return bool(c.execute(text("SELECT count(*) FROM workers WHERE current_job_id IS NULL AND "
                                           "last_heartbeat_at > now() - interval '10 seconds'")).scalar())

        def claimed(job_id: str) -> bool:
            return bool(http.get(f"/v1/jobs/{job_id}").json()["started_at"])

        def ended(job_id: str) -> bool:
            return http.get(f"/v1/jobs/{job_id}").json()["status"] in ("cancelled", "succeeded", "failed")

        for _ in range(samples):
            localstack.wait_until(idle, timeout=120, what="an idle worker", interval=0.2)
            time.sleep(0.5)
            job = http.post("/v1/jobs", json=SPEC).json()
            localstack.wait_until(partial(claimed, job["id"]), timeout=60, what="the claim", interval=0.02)
            with engine.connect() as c:
                delays.append(float(c.execute(text("SELECT extract(epoch FROM started_at - created_at) FROM jobs "
                                                   "WHERE id = :i"), {"i": job["id"]}).scalar_one()))
            http.post(f"/v1/jobs/{job['id']}/cancel")
            localstack.wait_until(partial(ended, job["id"]), timeout=120, what="the job's end")
    engine.dispose()
    return statistics.median(delays) * 1000


def run_variant(tree: Path, base_env: dict[str, str], db: str, args: argparse.Namespace) -> dict[str, Any]:
    import psycopg

    admin = base_env["CRUCIBLE_DATABASE_URL"].rsplit("/", 1)[0].replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(f"{admin}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{db}"')
    env = {**os.environ, **base_env, "CRUCIBLE_DATABASE_URL": base_env["CRUCIBLE_DATABASE_URL"].rsplit("/", 1)[0]
           + f"/{db}", "CRUCIBLE_SCHEDULER_INTERVAL_SECONDS": "1.0"}
    _py(tree, env, "from shared.db import upgrade_to_head; upgrade_to_head()")
    token = _py(tree, env, "from services.projects.service import create_key; from shared.db import session_scope\n"
                           "with session_scope() as s: print(create_key(session=s, project_name='bench')[1])")
    out: dict[str, Any] = {}
    port = localstack.free_port()
    url = f"http://127.0.0.1:{port}"
    # No scheduler while the API is measured: this is the API + Postgres path, not dispatch.
    with processes(["api", "--port", str(port), "--workers", str(args.api_workers)], tree=tree, env=env):
        wait_http(f"{url}/healthz", timeout=60)
        import httpx

        job_id = httpx.post(f"{url}/v1/jobs", json=SPEC, headers={"Authorization": f"Bearer {token}"}).json()["id"]
        s = args.seconds
        load(url, token, "GET", "/healthz", clients=8, seconds=1)  # warm-up
        load(url, token, "POST", "/v1/jobs", clients=8, seconds=1, body=SPEC)
        for clients in (8, 32):
            out[f"GET /healthz @{clients}"] = load(url, token, "GET", "/healthz", clients=clients, seconds=s)
            out[f"GET /v1/jobs/{{id}} @{clients}"] = load(url, token, "GET", f"/v1/jobs/{job_id}", clients=clients,
                                                          seconds=s)
            out[f"POST /v1/jobs @{clients}"] = load(url, token, "POST", "/v1/jobs", clients=clients, seconds=s,
                                                    body=SPEC)
        for name, method, path, body in (("GET /healthz", "GET", "/healthz", None),
                                         ("GET /v1/jobs/{id}", "GET", f"/v1/jobs/{job_id}", None),
                                         ("POST /v1/jobs", "POST", "/v1/jobs", SPEC)):
            out[f"{name} @{args.rate:.0f}/s"] = load(url, token, method, path, clients=64, seconds=s, rate=args.rate,
                                                     body=body)
    if args.claim_samples:
        port = localstack.free_port()
        url = f"http://127.0.0.1:{port}"
        with _py_cleanup(tree, env), processes(["api", "--port", str(port)], ["scheduler"],
                                               ["worker", "--kind", "ssl-trainer"], tree=tree, env=env):
            wait_http(f"{url}/healthz", timeout=60)
            out["claim_ms"] = claim_latency(url, token, env, samples=args.claim_samples)
    return out


@contextmanager
def _py_cleanup(tree: Path, env: dict[str, str]) -> Iterator[None]:
    # the measured submissions are still queued: cancel them so the worker sees only the probe jobs
    _py(tree, env, "from sqlalchemy import text; from shared.db import session_scope\n"
                   "with session_scope() as s:\n"
                   "    s.execute(text(\"UPDATE outbox SET published_at = now() WHERE published_at IS NULL\"))\n"
                   "    s.execute(text(\"UPDATE jobs SET status = 'cancelled' \"\n"
                   "                   \"WHERE status IN ('queued', 'pending')\"))")
    yield


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--api-workers", type=int, default=2)
    ap.add_argument("--rate", type=float, default=300.0)
    ap.add_argument("--claim-samples", type=int, default=9)
    ap.add_argument("--baseline", default="44a7c1e", help="commit to compare against")
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args()
    results: dict[str, dict[str, Any]] = {}
    with real_stack() as env:
        base_env = {k: v for k, v in env.items() if k.startswith("CRUCIBLE_")}
        results["this tree"] = run_variant(ROOT, base_env, "crucible_bench_new", args)
        if not args.no_baseline:
            with variant_tree(args.baseline) as tree:
                results["baseline"] = run_variant(tree, base_env, "crucible_bench_base", args)
    new, base = results["this tree"], results.get("baseline")
    print(f"\ncontrol plane: {args.api_workers} API worker process(es), {args.seconds:.0f}s per row, "
          f"{CLIENT_PROCS} client processes; machine: {machine()}")
    if base:
        print(f"baseline: {args.baseline} (same run, same stack, its own database)")
    head = f"{'endpoint @ load':30} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'err':>5}"
    if base:
        head += f" | {'base req/s':>10} {'base p99':>9} {'req/s x':>8} {'p99 x':>7}"
    print(head)
    for name, r in new.items():
        if name == "claim_ms":
            continue
        line = f"{name:30} {r['rps']:8.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {r['errors']:5.0f}"
        if base and name in base:
            b = base[name]
            line += (f" | {b['rps']:10.1f} {b['p99_ms']:9.1f} {r['rps'] / b['rps']:7.2f}x "
                     f"{b['p99_ms'] / r['p99_ms']:6.2f}x")
        print(line)
    if "claim_ms" in new:
        line = f"submit -> claimed median (idle worker): {new['claim_ms']:.0f} ms"
        if base and "claim_ms" in base:
            line += f"; baseline {base['claim_ms']:.0f} ms ({base['claim_ms'] / new['claim_ms']:.1f}x faster)"
        print(line)
    print("(p99 x: baseline p99 / this p99, above 1 is better; open-loop rows count from each request's due time)")


if __name__ == "__main__":
    main()
