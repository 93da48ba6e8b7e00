"""OpenAPI examples for job submission (kept beside the router, generated from the spec models' defaults)."""

from __future__ import annotations

from typing import Any

SUBMIT_EXAMPLES: dict[str, dict[str, Any]] = {
    "msf-shapes": {
        "summary": "MSF on the built-in shapes dataset (CPU-sized)",
        "value": {"kind": "ssl-train", "method": "msf", "experiment": "msf-shapes", "dataset": "builtin://shapes",
                  "limit_train": 2048, "backbone": "resnet18", "stem": "imagenet", "epochs": 5, "batch_size": 128,
                  "bank_size": 1024, "topk": 5, "lr": 0.05, "knn_every": 1},
    },
    "byol-mnist-gpu": {
        "summary": "BYOL (MSF with k=1) on MNIST on one GPU, high priority",
        "value": {"kind": "ssl-train", "method": "byol", "experiment": "byol-mnist", "dataset": "builtin://mnist",
                  "epochs": 50, "batch_size": 256, "bank_size": 16384, "priority": 10,
                  "resources": {"gpus": 1, "max_runtime_s": 7200}},
    },
}
