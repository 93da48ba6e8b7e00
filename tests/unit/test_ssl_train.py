"""The ssl-train method through the platform interface: events, checkpoints, exact resume, preemption."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from shared.data import load_dataset
from shared.specs import SslTrainSpec
from workers.runtime.context import JobConfigError, Preempted
from workers.runtime.local import LocalContext
from workers.ssl_trainer.train import run, train

torch.set_num_threads(1)

SPEC: dict[str, Any] = {
    "kind": "ssl-train", "method": "msf", "dataset": "builtin://shapes", "limit_train": 128, "limit_test": 64,
    "image_size": 32, "backbone": "resnet18", "stem": "imagenet", "batch_size": 32, "bank_size": 64,
    "epochs": 2, "knn_every": 1, "knn_k": [1, 5], "checkpoint_every": 1, "proj_hidden_dim": 128,
    "proj_dim": 32,
}


def _of(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == kind]


def _assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        elif isinstance(a[k], dict):
            _assert_same_state(a[k], b[k])
        elif isinstance(a[k], list):
            assert len(a[k]) == len(b[k])
            for x, y in zip(a[k], b[k], strict=True):
                if isinstance(x, dict):
                    _assert_same_state(x, y)
                else:
                    assert x == y
        else:
            assert a[k] == b[k], k


def test_run_reports_checkpoints_and_resumes_exactly(job_context: Any) -> None:
    ctx, events, store = job_context("a", "ssl-train", SPEC)
    run(ctx)

    progress = _of(events, "progress")
    assert progress[-1]["done"] == progress[-1]["total"] == 8  # 2 epochs x 4 steps
    metrics = [e["values"] for e in _of(events, "metrics")]
    assert "baseline_knn_top1_k1" in metrics[0]
    assert any("epoch_loss" in m and "knn_top1_k5" in m for m in metrics)
    ckpts = _of(events, "checkpoint")
    assert [(c["epoch"], c["final"]) for c in ckpts] == [(1, False), (2, True)]
    assert ckpts[0]["critical"]["bank_size"] == 64
    (result,) = _of(events, "result")
    values = result["values"]
    assert {"knn_top1_k1", "knn_top1_k5", "knn_weighted_top1_k200", "baseline_knn_top1_k1", "final_loss"} <= set(values)
    assert 0.0 <= values["knn_top1_k1"] <= 1.0 and 0.0 < values["final_loss"] < 4.0

    epoch1 = torch.load(store.path(ckpts[0]["key"]), weights_only=False)
    final = torch.load(store.path(ckpts[1]["key"]), weights_only=False)
    assert epoch1["epoch"] == 1 and epoch1["model"]["bank._extra_state"]["ptr"] == 0
    online_keys = {k.removeprefix("online.backbone.") for k in final["model"] if k.startswith("online.backbone.")}
    assert set(final["backbone"]) == online_keys  # plain torchvision keys for downstream loading
    assert final["baseline_knn"] == epoch1["baseline_knn"]

    # A second attempt resumes from the epoch-1 checkpoint and ends in exactly the same state.
    ctx_b, events_b, _ = job_context("b", "ssl-train", SPEC, resume=store.path(ckpts[0]["key"]))
    run(ctx_b)
    assert _of(events_b, "progress")[0]["done"] == 5  # first step of epoch 2
    assert not any("baseline_knn_top1_k1" in e["values"] for e in _of(events_b, "metrics"))
    ckpts_b = _of(events_b, "checkpoint")
    assert [(c["epoch"], c["final"]) for c in ckpts_b] == [(2, True)]
    final_b = torch.load(store.path(ckpts_b[0]["key"]), weights_only=False)
    for part in ("model", "optimizer", "backbone", "baseline_knn", "knn"):
        _assert_same_state({part: final[part]}, {part: final_b[part]})
    assert _of(events_b, "result")[0]["values"] == values

    # The plain training function (what benchmarks call) gives the job path's numbers exactly.
    spec = SslTrainSpec.model_validate(SPEC)
    dataset = load_dataset({"uri": spec.dataset}, image_size=32, limit_train=128, limit_test=64)
    local = LocalContext(spec)
    assert train(spec, dataset, ctx=local) == values == local.result
    _assert_same_state({"model": local.checkpoint_state(-1)["model"]}, {"model": final["model"]})


def test_stop_request_checkpoints_then_raises_preempted(job_context: Any) -> None:
    ctx, events, store = job_context("p", "ssl-train", SPEC | {"epochs": 1, "knn_every": 0})
    original = ctx.progress

    def progress(done: int, total: int, **kw: Any) -> None:
        original(done, total, **kw)
        if done == 2:  # mid-epoch 1
            ctx.stop_requested = True

    ctx.progress = progress  # type: ignore[method-assign]
    with pytest.raises(Preempted):
        run(ctx)
    (ckpt,) = _of(events, "checkpoint")
    assert ckpt["epoch"] == 0 and not ckpt["final"]  # resumes at the start of epoch 1
    assert not _of(events, "result")
    state = torch.load(store.path(ckpt["key"]), weights_only=False)
    assert state["model"]["bank._extra_state"]["num_pushed"] == 64 and "knn_top1_k1" in state["baseline_knn"]


def test_bank_larger_than_the_dataset_is_a_config_error(job_context: Any) -> None:
    ctx, _, _ = job_context("c", "ssl-train", SPEC | {"limit_train": 64, "bank_size": 128})
    with pytest.raises(JobConfigError, match="bank_size=128 exceeds the 64 training images"):
        run(ctx)


def test_color_jitter_option_defaults_to_moco_and_is_validated() -> None:
    base = {"kind": "ssl-train", "method": "msf", "dataset": "builtin://shapes"}
    assert SslTrainSpec(**{**base, "dataset": "my-photos"}).color_jitter == [0.4, 0.4, 0.4, 0.1]  # natural preset
    spec = SslTrainSpec(**base, color_jitter=[0.4, 0.4, 0.2, 0.5])
    assert spec.critical_config()["augment"]["color_jitter"] == [0.4, 0.4, 0.2, 0.5]  # a resume must not change it
    for bad in ([0.4, 0.4, 0.4, 0.6], [-0.1, 0.4, 0.4, 0.1], [0.4, 0.4, 0.4]):
        with pytest.raises(ValueError):
            SslTrainSpec(**base, color_jitter=bad)

