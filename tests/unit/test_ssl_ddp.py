"""ssl-train with 2 CPU processes (gloo), as torchrun runs it for ``resources.gpus: 2``.

Checks the multi-process contract: synchronised BatchNorm equals one BN over the global batch; after
training both ranks hold identical weights, EMA targets, banks (+ pointer) and CMSF caches; only rank 0
wrote checkpoints; every rank returns the same result.
"""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.testing import assert_close

SPEC: dict[str, Any] = {
    "kind": "ssl-train", "method": "cmsf", "cmsf": {"constraint": "2q", "topk_constraint": 5},
    "dataset": "builtin://shapes", "limit_train": 128, "limit_test": 64, "image_size": 32, "backbone": "resnet18",
    "stem": "imagenet", "batch_size": 32, "bank_size": 64, "epochs": 1, "knn_k": [1, 5], "proj_hidden_dim": 128,
    "proj_dim": 32, "resources": {"gpus": 2},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _check_global_batchnorm(rank: int, world: int) -> None:
    """GlobalBatchNorm on each rank's half == BatchNorm2d on the whole batch (outputs, grads, running stats)."""
    from workers.common.distributed import convert_sync_batchnorm

    g = torch.Generator().manual_seed(0)
    x_full, w_full = torch.randn(8, 4, 3, 3, generator=g), torch.randn(8, 4, 3, 3, generator=g)
    ref = nn.BatchNorm2d(4)
    with torch.no_grad():
        ref.weight.copy_(torch.rand(4, generator=g) + 0.5)
        ref.bias.copy_(torch.randn(4, generator=g))
    mine = convert_sync_batchnorm(nn.Sequential(copy.deepcopy(ref)), torch.device("cpu"))
    assert type(mine[0]).__name__ == "GlobalBatchNorm"
    x_ref = x_full.clone().requires_grad_(True)
    (ref(x_ref) * w_full).sum().backward()
    part = slice(rank * 8 // world, (rank + 1) * 8 // world)
    x = x_full[part].clone().requires_grad_(True)
    y = mine(x)
    (y * w_full[part]).sum().backward()
    assert_close(y, _eval_free(ref, x_full)[part])
    assert_close(x.grad, x_ref.grad[part])
    grad_w = mine[0].weight.grad.clone()
    dist.all_reduce(grad_w)  # DDP sums (then averages) the per-rank parameter gradients
    assert_close(grad_w, ref.weight.grad)
    assert_close(mine[0].running_mean, ref.running_mean)
    assert_close(mine[0].running_var, ref.running_var)


def _eval_free(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """Batch-statistics output of ``bn`` without touching its running stats."""
    with torch.no_grad():
        return nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from shared.data import load_dataset
    from shared.specs import SslTrainSpec
    from workers.runtime.local import LocalContext
    from workers.ssl_trainer.train import Trainer

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _check_global_batchnorm(rank, world)
        spec = SslTrainSpec.model_validate(SPEC)
        dataset = load_dataset({"uri": spec.dataset}, image_size=32, limit_train=128, limit_test=64)
        ctx = LocalContext(spec, checkpoint_dir=Path(tmp) / f"rank{rank}")
        trainer = Trainer(spec, dataset, ctx=ctx, device=torch.device("cpu"))
        assert trainer.local_batch == 16 and trainer.steps_per_epoch == 4
        result = trainer.fit()
        assert type(trainer.model.online.backbone.bn1).__name__ == "GlobalBatchNorm"
        torch.save({"model": trainer.model.state_dict(), "result": result, "metrics": ctx.metrics},
                   Path(tmp) / f"state{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_keeps_ranks_identical(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    s0, s1 = (torch.load(tmp_path / f"state{r}.pt", weights_only=False) for r in (0, 1))
    assert s0["model"].keys() == s1["model"].keys()
    for k, v in s0["model"].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, s1["model"][k]), k  # weights, EMA target, bank rows/labels/indices, 2Q pool
        else:
            assert v == s1["model"][k], k  # bank pointer and push count
    assert s0["model"]["bank._extra_state"]["num_pushed"] == 4 * 32  # global batches went into the bank
    assert int((s0["model"]["bank.indices"] >= 0).sum()) == 64
    assert s0["result"] == s1["result"] and "knn_top1_k1" in s0["result"]
    assert list((tmp_path / "rank0").glob("*.pt")) and not (tmp_path / "rank1").exists()
    assert s0["metrics"] and not s1["metrics"]  # only rank 0 reports
