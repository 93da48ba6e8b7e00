"""The contrastive loss with features gathered over 2 CPU processes (gloo), as under torchrun: each rank's rows
against every rank's columns (open_clip ``local_loss`` + ``gather_with_grad``), gradients averaged like DDP, equal
the gradient of the one-process loss over the global batch."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.testing import assert_close


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _setup() -> tuple[torch.nn.Linear, torch.nn.Linear, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    img_tower, txt_tower = torch.nn.Linear(5, 4), torch.nn.Linear(6, 4)
    for p in [*img_tower.parameters(), *txt_tower.parameters()]:
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g))
    return img_tower, txt_tower, torch.randn(8, 5, generator=g), torch.randn(8, 6, generator=g), torch.tensor(2.5)


def _loss(img_tower, txt_tower, x, t, log_scale, rank=0, world=1):  # type: ignore[no-untyped-def]
    from workers.clip_bow.loss import clip_loss

    return clip_loss(F.normalize(img_tower(x), dim=1), F.normalize(txt_tower(t), dim=1), log_scale.exp(),
                     rank=rank, world_size=world)


def _worker(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        img_tower, txt_tower, x, t, s = _setup()
        ref_i, ref_t = _setup()[:2]
        _loss(ref_i, ref_t, x, t, s).backward()
        part = slice(rank * 4, rank * 4 + 4)
        _loss(img_tower, txt_tower, x[part], t[part], s, rank, world).backward()
        for mine, ref in zip([*img_tower.parameters(), *txt_tower.parameters()],
                             [*ref_i.parameters(), *ref_t.parameters()], strict=True):
            g = mine.grad.clone()
            dist.all_reduce(g)
            assert_close(g / world, ref.grad, rtol=1e-4, atol=1e-5)
    finally:
        dist.destroy_process_group()


def test_gathered_loss_gradient_equals_the_global_batch_gradient() -> None:
    mp.spawn(_worker, args=(2, _free_port()), nprocs=2, join=True)
