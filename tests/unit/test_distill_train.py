"""The distill job on tiny data: teachers made by ssl-train, results, exported student, exact resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from shared.specs import DistillSpec
from tests.unit.conftest import TINY
from workers.distiller.train import run, train
from workers.runtime.context import JobConfigError
from workers.runtime.local import LocalContext
from workers.vision.checkpoints import load_encoder

torch.set_num_threads(1)

T0, T1 = "job:00000000-0000-0000-0000-000000000001", "job:00000000-0000-0000-0000-000000000002"
SIMREG: dict[str, Any] = {"kind": "distill", "method": "simreg", **TINY, "teachers": [T0, T1], "epochs": 2,
                          "knn_every": 1}


def _equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], k


def test_simreg_two_teachers_exports_the_student_and_resumes_exactly(tmp_path: Path, tiny_dataset: Any,
                                                                       msf_checkpoints: list[Path]) -> None:
    spec = DistillSpec.model_validate(SIMREG)
    teachers = msf_checkpoints  # two different teachers: the MSF run after epoch 1 and after epoch 2
    ctx = LocalContext(spec, checkpoint_dir=tmp_path / "a")
    result = train(spec, tiny_dataset, teachers, ctx=ctx)

    expected = {"knn_top1_k1", "knn_top1_k20", "knn_weighted_top1_k200", "baseline_knn_top1_k20",
                "teacher0_knn_top1_k20", "teacher1_knn_top1_k20", "final_loss", "epochs"}
    assert expected <= set(result) and result == ctx.result
    assert 0.0 < result["final_loss"] < 4.0
    assert all(0.0 <= v <= 1.0 for k, v in result.items() if "knn" in k)
    # The teacher's own k-NN is the one ssl-train reported for it (same protocol, same data).
    teacher_state = torch.load(teachers[1], weights_only=False)
    assert result["teacher1_knn_top1_k20"] == pytest.approx(teacher_state["knn"]["knn_top1_k20"])
    per_teacher = [m for _, m in ctx.metrics if "epoch_loss_teacher1" in m]  # per epoch (4 steps < LOG_EVERY)
    assert len(per_teacher) == 2 and all(0.0 <= m["epoch_loss_teacher0"] <= 4.0 for m in per_teacher)
    assert [(c["epoch"], c["final"]) for c in ctx.checkpoints] == [(1, False), (2, True)]

    # The exported student follows the model-checkpoint contract: evaluable, or distillable again.
    final = ctx.checkpoint_state(-1)
    student, meta = load_encoder(final)
    assert meta["method"] == "simreg" and meta["projector"] is None and student.out_dim == 512
    assert meta["distill"]["teachers"] == [T0, T1] and meta["distill"]["head"] == "mlp"
    assert {k.removeprefix("student.") for k in final["model"] if k.startswith("student.")} == set(final["backbone"])
    assert any(k.startswith("heads.1.") for k in final["model"])  # heads are kept for resume, not exported

    # A second attempt from the epoch-1 checkpoint ends in exactly the same state and result.
    resumed = LocalContext(spec, checkpoint_dir=tmp_path / "b", resume=ctx.checkpoints[0]["path"])
    assert train(spec, tiny_dataset, teachers, ctx=resumed) == result
    assert [(c["epoch"], c["final"]) for c in resumed.checkpoints] == [(2, True)]
    final_b = resumed.checkpoint_state(-1)
    _equal(final["model"], final_b["model"])
    _equal(final["backbone"], final_b["backbone"])
    assert not any("baseline_knn_top1_k1" in m for _, m in resumed.metrics)  # baselines come from the checkpoint


def test_compress_2q_job_reads_its_teacher_input(job_context: Any, msf_checkpoints: list[Path]) -> None:
    spec = {"kind": "distill", "method": "compress", **TINY, "teachers": [T0], "epochs": 1, "bank_size": 64,
            "compress": {"variant": "2q"}}
    ctx, events, store = job_context("c", "distill", spec, checkpoints={"teachers.0": msf_checkpoints[-1]})
    run(ctx)
    (result,) = [e["values"] for e in events if e["type"] == "result"]
    assert {"knn_top1_k20", "teacher0_knn_top1_k20", "final_loss"} <= set(result)
    assert any("epoch_teacher_entropy" in e.get("values", {}) for e in events if e["type"] == "metrics")
    (ckpt,) = [e for e in events if e["type"] == "checkpoint"]
    state = torch.load(store.path(ckpt["key"]), weights_only=False)
    assert state["meta"]["distill"]["variant"] == "2q" and "student_ema.conv1.weight" in state["model"]
    assert state["model"]["criterion.student_bank._extra_state"]["ptr"] == 0  # 128 images: the 64-row bank wrapped
    load_encoder(state)


def test_teacher_inputs_must_be_model_checkpoints(job_context: Any, tmp_path: Path) -> None:
    spec = {"kind": "distill", "method": "simreg", **TINY, "teachers": [T0], "epochs": 1}
    probe = tmp_path / "probe.pt"
    torch.save({"probe": {}, "epoch": 1}, probe)  # e.g. the checkpoint of an eval job
    ctx, _, _ = job_context("bad", "distill", spec, checkpoints={"teachers.0": probe})
    with pytest.raises(JobConfigError, match="no 'backbone'.*ssl-train or distill job"):
        run(ctx)
    ctx, _, _ = job_context("missing", "distill", spec)
    with pytest.raises(JobConfigError, match="input teachers.0 was not provided"):
        run(ctx)


def test_stop_request_checkpoints_then_raises_preempted(job_context: Any, msf_checkpoints: list[Path]) -> None:
    from workers.runtime.context import Preempted

    spec = {"kind": "distill", "method": "simreg", **TINY, "teachers": [T0], "epochs": 1, "head": "linear"}
    ctx, events, store = job_context("p", "distill", spec, checkpoints={"teachers.0": msf_checkpoints[-1]})
    original = ctx.progress

    def progress(done: int, total: int, **kw: Any) -> None:
        original(done, total, **kw)
        if done == 2:  # mid-epoch 1
            ctx.stop_requested = True

    ctx.progress = progress  # type: ignore[method-assign]
    with pytest.raises(Preempted):
        run(ctx)
    (ckpt,) = [e for e in events if e["type"] == "checkpoint"]
    assert ckpt["epoch"] == 0 and not ckpt["final"]  # the next attempt replays epoch 1
    state = torch.load(store.path(ckpt["key"]), weights_only=False)
    assert "teacher0_knn_top1_k20" in state["teacher_knn"] and state["meta"]["distill"]["head"] == "linear"
    assert not [e for e in events if e["type"] == "result"]


def test_ssl_train_checkpoints_export_a_loadable_projector(msf_checkpoints: list[Path]) -> None:
    encoder, meta = load_encoder(msf_checkpoints[-1], features="projection")  # teacher_features: projection
    assert meta["projector"] == {"in": 512, "hidden": 128, "out": 32} and encoder.out_dim == 32
    assert encoder(torch.rand(2, 3, 32, 32)).shape == (2, 32)
