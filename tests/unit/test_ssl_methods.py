"""Every ssl-train method through the generic loop: 1-2 epoch smoke runs on 128 shapes, exports, exact resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from shared.data import load_dataset
from shared.specs import SslTrainSpec
from workers.runtime.context import JobConfigError
from workers.runtime.local import LocalContext
from workers.ssl_trainer.train import Trainer, train

torch.set_num_threads(1)

TINY: dict[str, Any] = {
    "kind": "ssl-train", "dataset": "builtin://shapes", "limit_train": 128, "limit_test": 64, "image_size": 32,
    "backbone": "resnet18", "stem": "imagenet", "batch_size": 32, "bank_size": 64, "epochs": 1, "knn_k": [1, 5],
    "proj_hidden_dim": 128, "proj_dim": 32,
}
CROSS_REF = "artifact:00000000-0000-0000-0000-0000000000aa"


@pytest.fixture(scope="module")
def dataset() -> Any:
    return load_dataset({"uri": "builtin://shapes"}, image_size=32, limit_train=128, limit_test=64)


def _run(dataset: Any, extra: dict[str, Any], tmp: Path | None = None, **ctx_kw: Any) -> tuple[LocalContext, dict]:
    spec = SslTrainSpec.model_validate(TINY | extra)
    ctx = LocalContext(spec, checkpoint_dir=tmp, **ctx_kw)
    return ctx, train(spec, dataset, ctx=ctx, device=torch.device("cpu"))


def _epoch_metrics(ctx: LocalContext) -> list[dict[str, float]]:
    return [m for _, m in ctx.metrics if "epoch_loss" in m]


@pytest.fixture(scope="module")
def byol_checkpoint(dataset: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LocalContext, dict]:
    tmp = tmp_path_factory.mktemp("byol")
    ctx, result = _run(dataset, {"method": "byol"}, tmp)
    return Path(ctx.checkpoints[-1]["path"]), ctx, result


def test_byol_run_exports_backbone_and_projector(byol_checkpoint: Any) -> None:
    path, ctx, result = byol_checkpoint
    assert 0.0 < result["final_loss"] < 4.0 and {"knn_top1_k1", "baseline_knn_top1_k5"} <= set(result)
    assert _epoch_metrics(ctx)[-1]["epoch_purity"] == 1.0  # k = 1: the only neighbour is the target itself
    state = torch.load(path, weights_only=False)
    assert {"backbone", "projector", "meta", "model"} <= set(state)
    assert state["meta"]["projector"] == {"in": 512, "hidden": 128, "out": 32}
    assert set(state["projector"]) == {k.removeprefix("online.projector.") for k in state["model"]
                                       if k.startswith("online.projector.")}
    assert torch.equal(state["projector"]["3.weight"], state["model"]["online.projector.3.weight"])
    assert {"method", "backbone", "stem", "out_dim", "image_size", "normalization", "classes"} <= set(state["meta"])


def test_cmsf_supervised_uses_only_same_class_neighbours(dataset: Any) -> None:
    ctx, result = _run(dataset, {"method": "cmsf", "cmsf": {"constraint": "supervised"}})
    last = _epoch_metrics(ctx)[-1]
    assert last["epoch_purity"] == 1.0 and 0.0 < result["final_loss"] < 4.0
    assert 0.0 <= last["epoch_constraint_short"] < 1.0  # early steps: the bank holds < k rows of some classes


def test_cmsf_kmeans_clusters_after_epoch_one(dataset: Any) -> None:
    ctx, _ = _run(dataset, {"method": "cmsf", "epochs": 2, "cmsf": {"constraint": "kmeans", "kmeans_clusters": 4}})
    first, second = _epoch_metrics(ctx)
    assert first["epoch_loss"] == pytest.approx(first["epoch_loss_constrained"])  # epoch 1: plain MSF
    assert first["kmeans_clusters_used"] >= 2 and "kmeans_objective" in first
    assert "kmeans_objective" not in second  # nothing would use clusters after the last epoch


def test_cmsf_semi_supervised_records_its_split_and_pseudo_labels(dataset: Any) -> None:
    cmsf = {"constraint": "semi-supervised", "label_fraction": 0.25, "head_epochs": 3, "pseudo_head": "linear"}
    ctx, result = _run(dataset, {"method": "cmsf", "cmsf": cmsf})
    (artifact,) = ctx.artifacts
    assert artifact["name"] == "labelled-split.json" and artifact["meta"]["count"] > 0
    counts = [m for _, m in ctx.metrics if "labelled_count" in m]
    assert counts and counts[0]["labelled_count"] == artifact["meta"]["count"]
    assert any("pseudo_head_train_accuracy" in m for _, m in ctx.metrics)  # the mid-epoch re-training
    last = _epoch_metrics(ctx)[-1]
    assert {"epoch_pseudo_accuracy", "epoch_pseudo_confident_fraction"} <= set(last)
    assert 0.0 < result["final_loss"] < 4.0


def test_cmsf_cross_modal_from_another_checkpoint(dataset: Any, byol_checkpoint: Any) -> None:
    path = byol_checkpoint[0]
    inputs = {"checkpoints": {"cmsf.cross_modal_checkpoint": {"path": str(path)}}}
    cmsf = {"constraint": "cross-modal", "topk_constraint": 8, "cross_modal_checkpoint": CROSS_REF,
            "cross_modal_features": "projection"}
    ctx, result = _run(dataset, {"method": "cmsf", "cmsf": cmsf}, inputs=inputs)
    assert 0.0 < result["final_loss"] < 4.0 and "epoch_purity_msf" in _epoch_metrics(ctx)[-1]
    with pytest.raises(JobConfigError, match="not provided"):
        _run(dataset, {"method": "cmsf", "cmsf": cmsf})


def _assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("extra", [
    {"method": "cmsf", "cmsf": {"constraint": "2q", "topk_constraint": 5}},
    {"method": "isd", "isd": {"recipe": "plus"}},
], ids=["cmsf-2q", "isd-plus"])
def test_resume_from_epoch_one_ends_in_the_same_state(dataset: Any, tmp_path: Path, extra: dict[str, Any]) -> None:
    ctx, result = _run(dataset, extra | {"epochs": 2, "checkpoint_every": 1}, tmp_path / "a")
    assert [c["epoch"] for c in ctx.checkpoints] == [1, 2]
    spec = SslTrainSpec.model_validate(TINY | extra | {"epochs": 2, "checkpoint_every": 1})
    resumed = LocalContext(spec, checkpoint_dir=tmp_path / "b", resume=Path(ctx.checkpoints[0]["path"]))
    trainer = Trainer(spec, dataset, ctx=resumed, device=torch.device("cpu"))
    assert trainer.fit() == result
    final, final_b = ctx.checkpoint_state(-1), resumed.checkpoint_state(-1)
    _assert_same(final["model"], final_b["model"])  # bank, pointer, 2Q pool + toggles, EMA target, heads
    assert final["model"]["bank._extra_state"] == final_b["model"]["bank._extra_state"]


def test_isd_r18_runs_with_its_recipe(dataset: Any) -> None:
    ctx, result = _run(dataset, {"method": "isd", "isd": {"recipe": "r18"}})
    spec = ctx.spec
    assert (spec.lr, spec.lr_schedule, spec.ema_momentum, spec.augmentation) == (0.01, "step", 0.999,
                                                                                "strong/strong")
    assert spec.isd.temperature_student == spec.isd.temperature_teacher == 0.02
    last = _epoch_metrics(ctx)[-1]
    assert 0.0 < last["epoch_teacher_entropy_ratio"] < 1.0 and result["final_loss"] >= 0.0
    state = ctx.checkpoint_state(-1)
    assert state["projector"] is None and state["meta"]["projector"] is None


def test_spec_validation_names_the_fix() -> None:
    with pytest.raises(ValueError, match=r"batch_size=30 must be a multiple of resources.gpus=4"):
        SslTrainSpec.model_validate(TINY | {"method": "msf", "batch_size": 30, "bank_size": 60,
                                            "resources": {"gpus": 4}})
    spec = SslTrainSpec.model_validate(TINY | {"method": "cmsf", "cmsf": {"constraint": "kmeans",
                                                                          "kmeans_clusters": 500}})
    assert [f for f, _ in spec.dataset_problems(128)] == ["cmsf.kmeans_clusters"]
