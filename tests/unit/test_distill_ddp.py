"""distill with 2 CPU processes (gloo), as torchrun runs it for ``resources.gpus: 2``.

Checks the multi-process contract on the shared loop: both ranks end with identical students, heads, CompRess
banks (+ pointers) and 2q EMA students; the banks were written with the all-gathered GLOBAL batch; BatchNorm
is synchronised; only rank 0 wrote checkpoints and reported; every rank returns the same result.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.unit.conftest import TINY

T0, T1 = "job:00000000-0000-0000-0000-000000000001", "job:00000000-0000-0000-0000-000000000002"
RUNS: dict[str, dict[str, Any]] = {
    "compress": {"kind": "distill", "method": "compress", **TINY, "teachers": [T0], "epochs": 1, "bank_size": 64,
                 "compress": {"variant": "2q"}, "resources": {"gpus": 2}},
    "simreg": {"kind": "distill", "method": "simreg", **TINY, "teachers": [T0, T1], "epochs": 1,
               "resources": {"gpus": 2}},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, tmp: str, teachers: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from shared.data import load_dataset
    from shared.specs import DistillSpec
    from workers.common.loop import TrainingLoop
    from workers.distiller.train import DistillMethod, loop_config
    from workers.runtime.local import LocalContext

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        dataset = load_dataset({"uri": TINY["dataset"]}, image_size=32, limit_train=128, limit_test=64)
        for name, raw in RUNS.items():
            spec = DistillSpec.model_validate(raw)
            ctx = LocalContext(spec, checkpoint_dir=Path(tmp) / name / f"rank{rank}")
            method = DistillMethod(spec, dataset, teachers[:len(spec.teachers)])
            loop = TrainingLoop(method, ctx, loop_config(spec), device=torch.device("cpu"))
            assert method.local_batch == 16 and loop.steps_per_epoch == 4
            result = loop.fit()
            assert type(method.model.student.bn1).__name__ == "GlobalBatchNorm"
            torch.save({"model": method.model.state_dict(), "result": result, "metrics": ctx.metrics},
                       Path(tmp) / f"{name}{rank}.pt")
    finally:
        dist.destroy_process_group()


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert (torch.equal(v, b[k]) if isinstance(v, torch.Tensor) else v == b[k]), k


def test_two_process_distill_keeps_ranks_identical(tmp_path: Path, msf_checkpoints: list[Path]) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), [str(p) for p in msf_checkpoints]), nprocs=2,
             join=True)
    for name in RUNS:
        s0, s1 = (torch.load(tmp_path / f"{name}{r}.pt", weights_only=False) for r in (0, 1))
        _same(s0["model"], s1["model"])  # student, heads / linear map, banks + pointers, EMA student
        assert s0["result"] == s1["result"] and {"knn_top1_k1", "teacher0_knn_top1_k1"} <= set(s0["result"])
        assert list((tmp_path / name / "rank0").glob("*.pt")) and not (tmp_path / name / "rank1").exists()
        assert s0["metrics"] and not s1["metrics"]  # only rank 0 reports
    model = torch.load(tmp_path / "compress0.pt", weights_only=False)["model"]
    for bank in ("criterion.teacher_bank", "criterion.student_bank"):
        extra = model[f"{bank}._extra_state"]
        assert extra["num_pushed"] == 4 * 32 and extra["ptr"] == 0  # 4 GLOBAL batches of 32 into 64 rows
    assert any(k.startswith("student_ema.") for k in model)
    simreg = torch.load(tmp_path / "simreg0.pt", weights_only=False)
    assert any(k.startswith("heads.1.") for k in simreg["model"]) and "final_loss" in simreg["result"]


def test_the_global_batch_must_split_over_the_gpus() -> None:
    import pytest

    from shared.specs import DistillSpec

    with pytest.raises(ValueError, match=r"batch_size=30 must be a multiple of resources.gpus=4.*try batch_size=32"):
        DistillSpec.model_validate(RUNS["simreg"] | {"batch_size": 30, "resources": {"gpus": 4}})
