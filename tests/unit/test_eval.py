"""The eval job: labelled subsets, the linear-probe protocol (train statistics only), k-NN, exact resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from shared.specs import EvalSpec
from workers.evaluator.linear import LinearProbe, ProbeData, feature_stats, train_probe
from workers.evaluator.run import labelled_subset, run
from workers.runtime.local import LocalContext

torch.set_num_threads(1)

CKPT = "job:00000000-0000-0000-0000-000000000001"


def test_labelled_subset_is_class_balanced_and_seeded() -> None:
    labels = np.repeat(np.arange(4), [40, 20, 10, 30])
    sub = labelled_subset(labels, 0.1, seed=3)
    assert np.bincount(labels[sub]).tolist() == [4, 2, 1, 3]
    assert np.array_equal(sub, labelled_subset(labels, 0.1, seed=3)) and np.all(np.diff(sub) > 0)
    assert not np.array_equal(sub, labelled_subset(labels, 0.1, seed=4))
    assert np.bincount(labels[labelled_subset(labels, 0.01, seed=0)]).tolist() == [1, 1, 1, 1]  # >= 1 per class
    assert np.array_equal(labelled_subset(labels, 1.0, seed=0), np.arange(100))


def test_probe_standardises_with_train_statistics_only() -> None:
    g = torch.Generator().manual_seed(0)
    train = torch.randn(64, 6, generator=g) + torch.tensor([3.0, 0, 0, 0, 0, 0])
    test = torch.randn(32, 6, generator=g) * 5 - 2.0  # a very different distribution
    labels = (train[:, 1] > 0).long()
    opts = EvalSpec.model_validate({"kind": "eval", "checkpoint": CKPT, "linear": {
        "epochs": 3, "batch_size": 16, "lr": 0.1, "milestones": [1, 2], "augment": False}}).linear
    ctx = LocalContext(None)
    result = train_probe(ProbeData(train, labels, test, (test[:, 1] > 0).long(), 2), opts, encoder=nn.Identity(),
                         ctx=ctx, device=torch.device("cpu"), seed=0)
    probe = result.probe
    assert probe is not None
    z = F.normalize(train, dim=1)
    mean, var = z.mean(dim=0), z.var(dim=0)  # unbiased, as torch.var_mean
    assert_close(probe.mean, mean)
    assert_close(probe.inv_std, 1.0 / torch.sqrt(var + 1e-5))
    assert not torch.allclose(probe.mean, feature_stats(test)[0], atol=0.05)
    # forward = fc(standardise(L2-normalise(x)))
    x = torch.randn(5, 6)
    assert_close(probe(x), probe.fc((F.normalize(x, dim=1) - mean) / torch.sqrt(var + 1e-5)))
    # MultiStep x0.1 at the milestones; one metrics record per epoch; the last epoch is the reported one.
    assert [h["lr"] for h in result.history] == pytest.approx([0.1, 0.01, 0.001])
    assert [m["epoch"] for _, m in ctx.metrics] == [1.0, 2.0, 3.0]
    assert [step for step, _ in ctx.metrics] == [1, 2, 3]  # per-epoch records on the epoch axis
    assert result.last_top1 == result.history[-1]["linear_top1"] and result.best_top1 >= result.last_top1
    # from_features takes its standardisation from the features it is given (the train set), nothing else
    fresh = LinearProbe.from_features(train, 3)
    assert_close(fresh.mean, mean)
    assert_close(fresh.inv_std, 1.0 / torch.sqrt(var + 1e-5))
    assert fresh.fc.in_features == 6 and fresh.fc.out_features == 3


def test_eval_job_knn_and_probe_resume_exactly(job_context: Any, msf_checkpoints: list[Path]) -> None:
    spec = {"kind": "eval", "checkpoint": CKPT, "dataset": "builtin://shapes", "limit_train": 128, "limit_test": 64,
            "train_fraction": 0.5, "knn_k": [1, 20],
            "linear": {"epochs": 3, "batch_size": 32, "milestones": [2], "augment": True}}
    ctx, events, store = job_context("a", "eval", spec, checkpoints={"checkpoint": msf_checkpoints[-1]})
    run(ctx)
    (result,) = [e["values"] for e in events if e["type"] == "result"]
    assert {"knn_top1_k1", "knn_top1_k20", "knn_weighted_top1_k200", "linear_top1", "linear_top1_best",
            "labelled_train_images"} <= set(result)
    assert result["labelled_train_images"] < 128
    assert all(0.0 <= v <= 1.0 for k, v in result.items() if k.endswith(("top1", "_k1", "_k20", "_k200", "best")))
    assert 1 <= result["linear_top1_best_epoch"] <= 3
    # No image_size in the spec: the dataset is loaded at the size the checkpoint was trained at (32 px).
    assert any(", 32px" in e.get("message", "") for e in events if e["type"] == "log")
    ckpts = [e for e in events if e["type"] == "checkpoint"]
    assert [(c["epoch"], c["final"]) for c in ckpts] == [(1, False), (2, False), (3, True)]
    epochs = [e["values"] for e in events if e["type"] == "metrics" and "linear_top1" in e["values"]]
    assert len(epochs) == 3 and epochs[-1]["linear_top1"] == result["linear_top1"]
    (artifact,) = [e for e in events if e["type"] == "artifact"]
    assert artifact["name"] == "linear-probe" and artifact["artifact_kind"] == "model"
    saved_probe = torch.load(store.path(artifact["key"]), weights_only=False)
    assert saved_probe["meta"]["num_classes"] == 10 and "fc.weight" in saved_probe["probe"]

    # Attempt 2 from the epoch-1 probe checkpoint: k-NN is not recomputed and the probe ends identical.
    ctx_b, events_b, _ = job_context("b", "eval", spec, checkpoints={"checkpoint": msf_checkpoints[-1]},
                                     resume=store.path(ckpts[0]["key"]))
    run(ctx_b)
    (result_b,) = [e["values"] for e in events_b if e["type"] == "result"]
    assert result_b == result
    assert not any("knn_top1_k1" in e["values"] for e in events_b if e["type"] == "metrics")
    final_b = [e for e in events_b if e["type"] == "checkpoint"][-1]
    probe_a = torch.load(store.path(ckpts[-1]["key"]), weights_only=False)["probe"]
    probe_b = torch.load(store.path(final_b["key"]), weights_only=False)["probe"]
    assert all(torch.equal(probe_a[k], probe_b[k]) for k in probe_a)


def test_eval_knn_only_on_a_distill_style_checkpoint(job_context: Any, tmp_path: Path,
                                                      msf_checkpoints: list[Path]) -> None:
    state = torch.load(msf_checkpoints[0], weights_only=False)
    student = {"backbone": state["backbone"], "meta": state["meta"] | {"method": "simreg", "projector": None}}
    path = tmp_path / "student.pt"
    torch.save(student, path)
    spec = {"kind": "eval", "checkpoint": CKPT, "limit_train": 128, "limit_test": 64, "protocols": ["knn"],
            "knn_k": [1, 5]}
    ctx, events, _ = job_context("k", "eval", spec, checkpoints={"checkpoint": path})
    run(ctx)
    (result,) = [e["values"] for e in events if e["type"] == "result"]
    assert set(result) == {"labelled_train_images", "knn_top1_k1", "knn_top1_k5", "knn_weighted_top1_k200"}
    assert not [e for e in events if e["type"] in ("checkpoint", "artifact")]
