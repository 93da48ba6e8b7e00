"""MSF performance: our step vs a reference-style step, and the bank neighbour search vs bank size K.

(a) One training step (forward, backward, SGD) of the same MSF model, batch and bank, two ways:

* ours - target side: chunked top-k over the bank (never more than ``B x 65,536`` similarities at once);
  online side: gather the k selected rows and take ``B x k`` dot products (``msf_loss``);
* reference-style - the reference's structure: clone the queue, build BOTH dense ``B x K`` distance
  matrices (``2 - 2 u M^T`` and ``2 - 2 q M^T``), top-k on the first, gather from the second (whose
  ``B x K`` gradient autograd then also materialises).

Both start from identical copies (same seed) and are timed interleaved, median of ``--steps`` steps after a
warm-up; printed as the ratio reference / ours (> 1: ours is faster).

(b) Neighbour search alone for K = 8k, 64k, 256k: ours (chunked) vs dense (``u M^T`` then top-k), and the
online side's loss forward + backward: gather (``B x k x d``) vs dense (``B x K``). Ratios dense / ours, plus
the size of one dense ``B x K`` fp32 matrix.

    python -m bench.msf_perf [--steps 10] [--batch 128] [--bank 65536] [--image-size 32] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from bench.common import machine
from workers.ssl_trainer.msf import MSF, msf_loss
from workers.vision.backbones import create_backbone
from workers.vision.bank import MemoryBank
from workers.vision.ema import ema_update


def reference_style_step(model: MSF, v_t: Tensor, v_o: Tensor) -> Tensor:
    """The reference's forward (train_msf.py structure) on our modules: dense B x K matrices on both sides."""
    q = torch.nn.functional.normalize(model.predictor(model.online(v_o)), dim=1)
    ema_update(model.target, model.online, model.ema_momentum)
    with torch.no_grad():
        u = torch.nn.functional.normalize(model.target(v_t), dim=1)
        model.bank.push(u)
    targets = model.bank.rows.clone().detach()
    dist_t = 2 - 2 * torch.einsum("bc,kc->bk", u, targets)
    dist_q = 2 - 2 * torch.einsum("bc,kc->bk", q, targets)
    _, nn_index = dist_t.topk(model.topk, dim=1, largest=False)
    return torch.gather(dist_q, 1, nn_index).mean()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def bench_step(args: argparse.Namespace, device: torch.device) -> None:
    torch.manual_seed(args.seed)
    base = MSF(create_backbone("resnet18", stem=args.stem), topk=args.topk, bank_size=args.bank,
               bank_generator=torch.Generator().manual_seed(args.seed)).to(device)
    models = {"ours": base, "reference-style": copy.deepcopy(base)}
    opts = {k: torch.optim.SGD(m.trainable_parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
            for k, m in models.items()}
    g = torch.Generator().manual_seed(args.seed)
    batches = [(torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g).to(device),
                torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g).to(device))
               for _ in range(args.steps + args.warmup)]

    def one(name: str, v_t: Tensor, v_o: Tensor) -> None:
        m, opt = models[name], opts[name]
        loss = m.step(v_t, v_o).loss if name == "ours" else reference_style_step(m, v_t, v_o)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():
        m.train()
    for i, (v_t, v_o) in enumerate(batches):
        for name in models:  # interleaved, so drift in machine load hits both alike
            dt = _timed(partial(one, name, v_t, v_o), device)
            if i >= args.warmup:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"(a) MSF step, resnet18/{args.stem} stem, {args.image_size}px, batch {args.batch}, bank {args.bank} x "
          f"{base.bank.dim}, k={args.topk}, median of {args.steps} steps:")
    for k, v in med.items():
        print(f"    {k:16s} {v * 1000:9.1f} ms/step")
    print(f"    ratio reference-style / ours: {med['reference-style'] / med['ours']:.2f}x")


def bench_search(args: argparse.Namespace, device: torch.device) -> None:
    print(f"(b) neighbour search and online-side loss vs bank size, batch {args.batch}, d={args.dim}, k={args.topk}, "
          f"median of {args.reps}:")
    print(f"    {'K':>8s} {'search ours':>12s} {'search dense':>13s} {'ratio':>6s}   {'loss ours':>10s} "
          f"{'loss dense':>11s} {'ratio':>6s}   dense BxK matrix")
    for k_rows in (8_192, 65_536, 262_144):
        bank = MemoryBank(k_rows, args.dim, generator=torch.Generator().manual_seed(0)).to(device)
        g = torch.Generator().manual_seed(1)
        u = torch.nn.functional.normalize(torch.randn(args.batch, args.dim, generator=g), dim=1).to(device)
        raw = torch.randn(args.batch, args.dim, generator=g).to(device)

        def search_ours(u: Tensor = u, bank: MemoryBank = bank) -> Tensor:
            return bank.topk_neighbours(u, args.topk)[1]

        def search_dense(u: Tensor = u, bank: MemoryBank = bank) -> Tensor:
            return (2 - 2 * u @ bank.rows.T).topk(args.topk, dim=1, largest=False)[1]

        idx = search_ours()

        def loss_ours(bank: MemoryBank = bank, idx: Tensor = idx, raw: Tensor = raw) -> None:
            q = torch.nn.functional.normalize(raw.clone().requires_grad_(True), dim=1)
            msf_loss(q, bank.gather(idx)).backward()

        def loss_dense(bank: MemoryBank = bank, idx: Tensor = idx, raw: Tensor = raw) -> None:
            q = torch.nn.functional.normalize(raw.clone().requires_grad_(True), dim=1)
            torch.gather(2 - 2 * q @ bank.rows.T, 1, idx).mean().backward()

        res = {}
        for name, fn in (("so", search_ours), ("sd", search_dense), ("lo", loss_ours), ("ld", loss_dense)):
            fn()  # warm-up
            res[name] = statistics.median(_timed(fn, device) for _ in range(args.reps))
        mib = args.batch * k_rows * 4 / 2**20
        print(f"    {k_rows:8d} {res['so'] * 1e3:10.2f}ms {res['sd'] * 1e3:11.2f}ms {res['sd'] / res['so']:5.2f}x   "
              f"{res['lo'] * 1e3:8.2f}ms {res['ld'] * 1e3:9.2f}ms {res['ld'] / res['lo']:5.2f}x   {mib:7.1f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--bank", type=int, default=65_536)
    ap.add_argument("--topk", type=int, default=5)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--stem", choices=("imagenet", "cifar"), default="imagenet")
    ap.add_argument("--dim", type=int, default=128, help="embedding width for (b)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = ap.parse_args()
    if args.bank % args.batch:
        raise SystemExit(f"--bank {args.bank} must be a multiple of --batch {args.batch}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"machine: {machine()}; device {device}, {torch.get_num_threads()} torch threads")
    bench_step(args, device)
    bench_search(args, device)


if __name__ == "__main__":
    main()
