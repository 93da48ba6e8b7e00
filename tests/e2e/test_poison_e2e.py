"""poison through the REST API on a tiny dataset: the job registers a new dataset (train/, test/, the manifest and
the patched test set as sidecars), a later ssl-train consumes it by name, and an eval with protocol 'attack'
reads the manifest from it."""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e.conftest import TERMINAL

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def _succeeded(platform: Any, job_id: str, timeout: float) -> dict[str, Any]:
    job = platform.wait_status(job_id, TERMINAL, timeout=timeout)
    assert job["status"] == "succeeded", platform.diagnostics(job_id)
    return job


def test_poison_then_ssl_train_then_attack_eval(platform):
    platform.start_worker("all")
    poison = platform.submit({"kind": "poison", "experiment": "e2e-poison", "dataset": "builtin://shapes",
                              "limit_train": 96, "limit_test": 40, "image_size": 16, "target_class": "circle",
                              "rate": 1.0, "trigger": {"builtin": "random-colors", "size": 5},
                              "output_name": "e2e-poisoned", "seed": 1})
    poison = _succeeded(platform, poison["id"], timeout=180)
    assert poison["result"]["poisoned"] >= 1 and poison["result"]["train"] == 96
    made = platform.http.get("/v1/datasets", params={"name": "e2e-poisoned"}).json()
    items = made["items"] if isinstance(made, dict) else made
    assert items and items[0]["name"] == "e2e-poisoned"

    train = platform.submit({"kind": "ssl-train", "experiment": "e2e-poison", "method": "simclr",
                             "dataset": "e2e-poisoned", "image_size": 16, "backbone": "resnet18", "stem": "cifar",
                             "batch_size": 32, "epochs": 1, "knn_k": [1], "proj_hidden_dim": 64, "proj_dim": 16})
    evaluation = platform.submit({"kind": "eval", "experiment": "e2e-poison", "checkpoint": f"job:{train['id']}",
                                  "dataset": "e2e-poisoned", "protocols": ["attack"], "linear": {"epochs": 2}})
    _succeeded(platform, train["id"], timeout=240)
    ev = _succeeded(platform, evaluation["id"], timeout=240)["result"]
    assert ev["attack_patched_images"] > 0 and 0 <= ev["attack_asr"] <= 1 and "attack_fp_clean" in ev
    assert ev["attack_probe_images"] < 96  # the poisoned images are not in the probe's training set
