"""Platform overhead: one MSF epoch through the full job path vs the same training function called directly.

Same spec, data and seed. "Direct" calls ``workers.ssl_trainer.train.train`` in this process (imports and
dataset loading excluded, no checkpoint upload). "Job path" is POST /v1/jobs → scheduler → Redis → Celery
worker → child process (imports, dataset load, training, checkpoint upload to S3, MLflow logging) → succeeded,
timed from the POST to the status read back over the API. Run on the real services (as in the tests).

    python -m bench.platform_overhead [--limit-train 1024] [--epochs 1]
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime

import httpx

from bench.common import machine, new_key, processes, real_stack
from services import localstack
from tests.stack import wait_http


def spec_for(args: argparse.Namespace) -> dict:
    return {"kind": "ssl-train", "method": "msf", "experiment": "bench-overhead", "dataset": "builtin://shapes",
            "limit_train": args.limit_train, "limit_test": 500, "backbone": "resnet18", "stem": "imagenet",
            "batch_size": 64, "bank_size": 512, "topk": 5, "epochs": args.epochs, "knn_every": 0, "seed": 0}


def run_direct(spec_dict: dict) -> tuple[float, float]:
    from shared.data import load_dataset
    from shared.specs import parse_spec
    from workers.ssl_trainer.train import train

    spec = parse_spec(spec_dict)
    t0 = time.perf_counter()
    data = load_dataset({"uri": spec.dataset}, image_size=spec.image_size, limit_train=spec.limit_train,
                        limit_test=spec.limit_test)
    t_data = time.perf_counter() - t0
    t0 = time.perf_counter()
    train(spec, data)
    return time.perf_counter() - t0, t_data


def _ts(value: str | None) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--limit-train", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=1)
    args = ap.parse_args()
    spec = spec_for(args)
    with real_stack():
        from workers.common.device import configure_threads

        configure_threads()
        direct_s, data_s = run_direct(spec)
        port = localstack.free_port()
        with processes(["api", "--port", str(port)], ["scheduler"], ["worker", "--kind", "ssl-trainer"]):
            url = f"http://127.0.0.1:{port}"
            wait_http(f"{url}/healthz", timeout=60)
            http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {new_key()}"}, timeout=30)
            time.sleep(5)  # let the worker finish starting; its start-up is not part of a job's cost
            t0 = time.perf_counter()
            job = http.post("/v1/jobs", json=spec).json()
            while job["status"] not in ("succeeded", "failed", "cancelled"):
                time.sleep(0.2)
                job = http.get(f"/v1/jobs/{job['id']}").json()
            path_s = time.perf_counter() - t0
            if job["status"] != "succeeded":
                raise SystemExit(f"benchmark job {job['status']}: {job['status_reason']}")
            events = http.get(f"/v1/jobs/{job['id']}/events", params={"type": ["progress"], "limit": 1}).json()
    first_progress = _ts(events[0]["ts"]) if events else float("nan")
    created, dispatched, started, finished = (_ts(job[k]) for k in ("created_at", "dispatched_at", "started_at",
                                                                   "finished_at"))
    print(f"platform overhead: MSF, resnet18, {args.limit_train} shapes images, {args.epochs} epoch(s), batch 64; "
          f"machine: {machine()}")
    print(f"  direct train() call                 {direct_s:7.1f} s   (dataset load {data_s:.1f} s, not counted)")
    print(f"  full job path, POST → succeeded     {path_s:7.1f} s")
    print(f"  ratio (job path / direct)           {path_s / direct_s:7.2f}x")
    print("  where the job path's time went:")
    print(f"    submit → dispatched               {dispatched - created:7.2f} s  (scheduler poll)")
    print(f"    dispatched → claimed              {started - dispatched:7.2f} s  (broker delivery)")
    print(f"    claimed → first progress          {first_progress - started:7.2f} s  "
          "(MLflow run, child process, torch import, dataset, baseline k-NN)")
    print(f"    first progress → finished         {finished - first_progress:7.2f} s  "
          "(training, final k-NN, checkpoint uploads)")


if __name__ == "__main__":
    main()
