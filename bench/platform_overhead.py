"""Platform overhead: the same MSF training through the full job path vs a direct call, fitted per epoch.

Same spec and seed on every path, at several epoch counts (default 1, 3 and 10):

* **direct** - a fresh ``python`` process that imports, loads the dataset and calls
  ``workers.ssl_trainer.train.train`` with a ``LocalContext`` writing its checkpoints to local disk; timed from
  process start to exit (what a user running the script by hand pays);
* **job, cold worker** - POST /v1/jobs → scheduler → Redis → Celery worker → a fresh child process per job
  (``CRUCIBLE_WARM_CHILD=false``) → checkpoints to S3, metrics to MLflow → status read back as succeeded;
* **job, warm worker** - the same with the worker's pre-started child (torch and the methods imported).

Every path shares one local cache directory and the caches are filled once before timing, so the random-init
k-NN baseline (content-addressed, identical on every path) and the builtin dataset are counted the same way on
all three: looked up, not recomputed. ``time = fixed + per_epoch x epochs`` is fitted per path by least squares;
the table prints both and their ratios to the direct call. Run on the real services (as in the tests).

    python -m bench.platform_overhead [--limit-train 512] [--epochs 1 3 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import ROOT, machine, new_key, processes, real_stack
from services import localstack
from tests.stack import wait_http


def spec_for(limit_train: int, epochs: int) -> dict:
    return {"kind": "ssl-train", "method": "msf", "experiment": "bench-overhead", "dataset": "builtin://shapes",
            "limit_train": limit_train, "limit_test": 500, "backbone": "resnet18", "stem": "imagenet",
            "batch_size": 64, "bank_size": min(512, limit_train), "topk": 5, "epochs": epochs, "knn_every": 0,
            "seed": 0}


def direct_child(spec_json: str, checkpoint_dir: str) -> None:
    """The direct call, as its own process (``--direct-child``)."""
    from shared.data import load_dataset
    from shared.specs import SslTrainSpec, parse_spec
    from workers.runtime.local import LocalContext
    from workers.ssl_trainer.train import train

    spec = parse_spec(json.loads(spec_json), SslTrainSpec)
    data = load_dataset({"uri": spec.dataset}, image_size=spec.image_size, limit_train=spec.limit_train,
                        limit_test=spec.limit_test)
    train(spec, data, ctx=LocalContext(spec, checkpoint_dir=Path(checkpoint_dir)))


def run_direct(spec: dict) -> float:
    with tempfile.TemporaryDirectory(prefix="crucible-bench-direct-") as d:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "bench.platform_overhead", "--direct-child", json.dumps(spec), d],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - t0


def run_job(http: httpx.Client, spec: dict) -> float:
    t0 = time.perf_counter()
    job = http.post("/v1/jobs", json=spec).json()
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.1)
        job = http.get(f"/v1/jobs/{job['id']}").json()
    elapsed = time.perf_counter() - t0
    if job["status"] != "succeeded":
        raise SystemExit(f"benchmark job {job['status']}: {job['status_reason']}")
    return elapsed


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares ``t = fixed + per_epoch * epochs``."""
    n = len(points)
    mx, my = sum(e for e, _ in points) / n, sum(t for _, t in points) / n
    sxx = sum((e - mx) ** 2 for e, _ in points)
    slope = sum((e - mx) * (t - my) for e, t in points) / sxx if sxx else float("nan")
    return my - slope * mx, slope


def job_path(warm: bool, epochs: list[int], limit_train: int, port: int) -> list[tuple[int, float]]:
    os.environ["CRUCIBLE_WARM_CHILD"] = "true" if warm else "false"
    with processes(["api", "--port", str(port)], ["scheduler"], ["worker", "--kind", "ssl-trainer"]):
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz", timeout=60)
        http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {new_key()}"}, timeout=30)
        time.sleep(8)  # the worker finishes starting (and pre-starts its child); not part of a job's cost
        run_job(http, spec_for(limit_train, 1))  # the first job of a worker process: not timed
        return [(e, run_job(http, spec_for(limit_train, e))) for e in epochs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--limit-train", type=int, default=512)
    ap.add_argument("--epochs", type=int, nargs="+", default=[1, 3, 10])
    ap.add_argument("--direct-child", nargs=2, metavar=("SPEC", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.direct_child:
        return direct_child(*args.direct_child)
    results: dict[str, list[tuple[int, float]]] = {}
    with real_stack():
        run_direct(spec_for(args.limit_train, 1))  # fills the shared caches (dataset, baseline k-NN)
        results["direct (fresh process, local ckpts)"] = [(e, run_direct(spec_for(args.limit_train, e)))
                                                          for e in args.epochs]
        results["job path, cold worker"] = job_path(False, args.epochs, args.limit_train, localstack.free_port())
        results["job path, warm worker"] = job_path(True, args.epochs, args.limit_train, localstack.free_port())
    print(f"platform overhead: MSF, resnet18 (imagenet stem), {args.limit_train} shapes images at 32 px, batch 64, "
          f"seed 0; epochs {args.epochs}; machine: {machine()}")
    d_fixed, d_epoch = fit(next(iter(results.values())))
    print(f"  {'path':38s} {'runs (epochs: s)':34s} {'fixed s':>8s} {'s/epoch':>8s} {'fixed-direct':>12s} "
          f"{'epoch ratio':>11s}")
    for name, pts in results.items():
        fixed, per_epoch = fit(pts)
        runs = ", ".join(f"{e}: {t:.1f}" for e, t in pts)
        print(f"  {name:38s} {runs:34s} {fixed:8.2f} {per_epoch:8.2f} {fixed - d_fixed:+12.2f} "
              f"{per_epoch / d_epoch:10.3f}x")


if __name__ == "__main__":
    main()
