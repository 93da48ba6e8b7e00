"""Several processes (one per GPU, or several CPU processes with gloo) training one model.

When ``resources.gpus > 1`` the supervisor starts the method under ``torchrun --standalone``, which sets
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. ``setup`` joins that process
group (NCCL on CUDA, gloo on CPU) and returns a ``Comm``: the handful of collectives the trainers need,
which degrade to no-ops in a single process - so method code calls them unconditionally.

BatchNorm: the reference's "shuffle BN" permutes the target batch so that online and target see different
BN groups across ``DataParallel`` GPUs; on one device (and in DDP, where each process normalises its own
sub-batch) a permutation changes nothing (ssl.md 1.4). We synchronise BN statistics across processes
instead (``convert_sync_batchnorm``): every BN layer normalises with the statistics of the GLOBAL batch,
as one large-batch process would. torch's ``nn.SyncBatchNorm`` only runs on accelerators, so on CPU
(the 2-process gloo tests) ``GlobalBatchNorm`` does the same with an autograd-aware all-reduce.
"""

from __future__ import annotations

import datetime
import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class Comm:
    """Rank, world size and the collectives used by the trainers (identity when ``world_size == 1``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone reports events, evaluates and writes checkpoints."""
        return self.rank == 0

    def all_gather(self, t: Tensor) -> Tensor:
        """Concatenate every rank's ``t`` along dim 0, in rank order (no gradient flows back)."""
        if not self.distributed:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.detach().contiguous())
        return torch.cat(parts)

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        if self.distributed:
            t = t.clone()
            dist.all_reduce(t)
        return t

    def any(self, flag: bool, device: torch.device | None = None) -> bool:
        """True on every rank if it is true on one (e.g. a stop request seen by one process only)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device or torch.device("cpu"))
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def broadcast_(self, t: Tensor, src: int = 0) -> Tensor:
        """In place: every rank ends with rank ``src``'s values."""
        if self.distributed:
            dist.broadcast(t, src)
        return t

    def broadcast_module_(self, module: nn.Module, src: int = 0) -> None:
        """Copy parameters and buffers of ``module`` from rank ``src`` (work done on one rank only)."""
        if self.distributed:
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t.data, src)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def env_world() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from the torchrun environment; ``(0, 0, 1)`` outside it."""
    try:
        return (int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")),
                int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise ValueError("RANK / LOCAL_RANK / WORLD_SIZE must be integers (set by torchrun)") from None


def setup(device: torch.device | None = None, *, timeout_s: float = 1800.0) -> tuple[Comm, torch.device, bool]:
    """Join the torchrun process group if there is one.

    Returns ``(comm, device, owns_group)``: the device is ``cuda:LOCAL_RANK`` on a GPU machine (or the
    given one), and ``owns_group`` tells the caller to ``teardown`` the group it created.
    """
    rank, local_rank, world = env_world()
    if device is None:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if world <= 1:
        return Comm(), device, False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        owns = True
    return Comm(rank=rank, world_size=world, local_rank=local_rank), device, owns


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel`` that syncs module state once (at construction) but not on every forward:
    memory banks and caches are kept identical by all-gathered writes, and re-broadcasting them each step
    would move K x d floats per step for nothing."""
    from torch.nn.parallel import DistributedDataParallel

    kwargs: dict[str, Any] = {"device_ids": [device.index] if device.type == "cuda" else None}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        kwargs["forward_sync_buffers"] = False  # torch >= 2.9 (broadcast_buffers is deprecated there)
    else:
        kwargs["broadcast_buffers"] = False
    return DistributedDataParallel(model, **kwargs)


def teardown(owns_group: bool) -> None:
    if owns_group and dist.is_initialized():
        dist.destroy_process_group()


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the incoming gradients over ranks too (d(sum_r x_r)/dx_r = 1 for
    every rank's loss, so each rank needs the total of all ranks' gradients)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        g = grad.clone()
        dist.all_reduce(g)
        return g


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of all processes, on any device (torch's SyncBatchNorm is GPU-only).

    Training: one all-reduce of ``[sum, sum of squares, count]`` per layer; the all-reduce is autograd-aware
    (its backward all-reduces the gradient of the statistics), so the gradients equal those of one process
    holding the whole batch. Eval mode and single processes use plain ``F.batch_norm``.
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        count = torch.full((1,), x.numel() / c, device=x.device, dtype=torch.float32)
        stats = _AllReduceSum.apply(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0.0)  # biased, used to normalise (as BN does)
        if (self.track_running_stats and self.running_mean is not None and self.running_var is not None
                and self.num_batches_tracked is not None):
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1.0), alpha=m)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm layer of ``module`` -> a synchronised one sharing its parameters and buffers.

    CUDA: torch's ``nn.SyncBatchNorm`` (fused kernels). Other devices: ``GlobalBatchNorm``. State-dict keys
    are unchanged, so checkpoints move freely between single- and multi-process runs.
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_cpu(module)


def _convert_cpu(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert_cpu(child))
    return out

