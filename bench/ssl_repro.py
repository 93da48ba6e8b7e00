"""Small-scale reproduction benchmark of the lab's SSL methods (issue 3), one command, 2 CPU cores.

Same budget for every method (dataset, epochs, batch, backbone, seed): random init, BYOL, MSF,
CMSF-supervised, ISD, and SimReg students distilled from the MSF teacher with and without the MLP head.
Each model is evaluated the same way: 20-NN (unweighted majority, the reference protocol) and the reference
linear probe (L2-normalise → standardise → linear) on frozen backbone features.

Expected from the papers: MSF > BYOL > random init; CMSF-supervised > MSF; SimReg with MLP head >= without.
The table says which of these held at this scale - the numbers are printed as measured, not tuned to agree.

    python -m bench.ssl_repro [--epochs 8] [--limit-train 5000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench.common import machine

NIL = "artifact:00000000-0000-0000-0000-000000000000"  # specs need a ref; the benchmark passes states directly


def ssl_spec(method: str, args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    return {"kind": "ssl-train", "method": method, "dataset": args.dataset, "limit_train": args.limit_train,
            "limit_test": args.limit_test, "backbone": "resnet18", "stem": "imagenet", "epochs": args.epochs,
            "batch_size": args.batch_size, "bank_size": args.bank_size, "lr": args.lr,
            "weight_decay": args.weight_decay, "augmentation": args.augmentation, "color_jitter": args.color_jitter,
            "seed": args.seed, "knn_every": 0, "knn_k": [1, 20], **extra}


def distill_spec(head: str, args: argparse.Namespace) -> dict[str, Any]:
    return {"kind": "distill", "method": "simreg", "teachers": [NIL], "head": head, "dataset": args.dataset,
            "limit_train": args.limit_train, "limit_test": args.limit_test, "backbone": "resnet18", "stem": "imagenet",
            "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
            "seed": args.seed, "knn_every": 0, "knn_k": [1, 20]}


def random_init_checkpoint(data: Any, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from workers.vision.backbones import create_backbone
    from workers.vision.checkpoints import model_payload

    torch.manual_seed(args.seed)
    mean, std = data.channel_stats()
    meta = {"method": "random-init", "backbone": "resnet18", "stem": "imagenet", "image_size": data.image_size,
            "normalization": {"mean": list(mean), "std": list(std)}, "classes": data.classes}
    return model_payload(create_backbone("resnet18", stem="imagenet"), meta=meta)


def evaluate(checkpoint: dict[str, Any], data: Any, args: argparse.Namespace) -> dict[str, float]:
    from shared.specs import parse_spec
    from workers.evaluator.run import evaluate as run_eval

    spec = parse_spec({"kind": "eval", "checkpoint": NIL, "dataset": args.dataset, "knn_k": [1, 20],
                       "linear": {"epochs": args.probe_epochs, "milestones": [int(args.probe_epochs * 0.6),
                                                                              int(args.probe_epochs * 0.85)],
                                  "augment": False}, "seed": args.seed})
    return run_eval(spec, data, checkpoint)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="builtin://shapes")
    ap.add_argument("--limit-train", type=int, default=5000)
    ap.add_argument("--limit-test", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--bank-size", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=0.00625)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--augmentation", default="weak/strong", help="target/online views (MSF w/s)")
    ap.add_argument("--color-jitter", type=float, nargs=4, default=[0.4, 0.4, 0.4, 0.5])
    ap.add_argument("--probe-epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="1 epoch on 512 images: a smoke run, not a result")
    ap.add_argument("--json", type=Path, help="also write the table as JSON here")
    args = ap.parse_args()
    if args.quick:
        args.limit_train, args.limit_test, args.epochs, args.probe_epochs, args.bank_size = 512, 200, 1, 3, 256

    from shared.data import load_dataset
    from shared.specs import parse_spec
    from workers.common.device import configure_threads
    from workers.distiller.train import train as distill
    from workers.runtime.local import LocalContext
    from workers.ssl_trainer.train import train as ssl_train

    configure_threads()
    data = load_dataset({"uri": args.dataset}, image_size=32, limit_train=args.limit_train,
                        limit_test=args.limit_test)
    rows: list[tuple[str, float, dict[str, float]]] = []
    t_all = time.perf_counter()

    def record(name: str, checkpoint: dict[str, Any], seconds: float) -> None:
        res = evaluate(checkpoint, data, args)
        rows.append((name, seconds, res))
        print(f"  {name:28} 20-NN {res['knn_top1_k20']:.3f}  linear {res['linear_top1']:.3f}  "
              f"({seconds:.0f}s training)", flush=True)

    record("random init", random_init_checkpoint(data, args), 0.0)
    checkpoints: dict[str, dict[str, Any]] = {}
    for name, method, extra in (("BYOL (MSF k=1)", "byol", {}), ("MSF (k=5)", "msf", {"topk": 5}),
                                ("CMSF-supervised (k=5)", "cmsf", {"topk": 5, "cmsf": {"constraint": "supervised"}}),
                                ("ISD (plus recipe)", "isd", {"isd": {"recipe": "plus"}})):
        spec = parse_spec(ssl_spec(method, args, **extra))
        ctx = LocalContext(spec)
        t0 = time.perf_counter()
        ssl_train(spec, data, ctx=ctx)
        checkpoints[method] = ctx.checkpoint_state(-1)
        record(name, checkpoints[method], time.perf_counter() - t0)
    for name, head in (("SimReg from MSF, MLP head", "mlp"), ("SimReg from MSF, linear head", "linear")):
        spec = parse_spec(distill_spec(head, args))
        ctx = LocalContext(spec)
        t0 = time.perf_counter()
        distill(spec, data, [checkpoints["msf"]], ctx=ctx)
        record(name, ctx.checkpoint_state(-1), time.perf_counter() - t0)

    total = time.perf_counter() - t_all
    print(f"\nssl_repro: {args.dataset} ({len(data.train_images)} train / {len(data.test_images)} test, 32 px), "
          f"resnet18 (ImageNet stem), {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, "
          f"wd {args.weight_decay}, {args.augmentation} views, seed {args.seed}; probe {args.probe_epochs} epochs")
    print(f"machine: {machine()}; total {total / 60:.1f} min\n")
    print(f"| {'model':28} | 20-NN | linear | train s |")
    print(f"|{'-' * 30}|-------|--------|---------|")
    for name, seconds, res in rows:
        print(f"| {name:28} | {res['knn_top1_k20']:.3f} | {res['linear_top1']:.3f}  | {seconds:7.0f} |")
    acc = {name: res for name, _, res in rows}
    checks = [("MSF > BYOL", "MSF (k=5)", "BYOL (MSF k=1)"), ("BYOL > random init", "BYOL (MSF k=1)", "random init"),
              ("CMSF-supervised > MSF", "CMSF-supervised (k=5)", "MSF (k=5)"),
              ("SimReg MLP head >= linear head", "SimReg from MSF, MLP head", "SimReg from MSF, linear head")]
    print()
    for claim, a, b in checks:
        for metric in ("knn_top1_k20", "linear_top1"):
            held = acc[a][metric] >= acc[b][metric] if ">=" in claim else acc[a][metric] > acc[b][metric]
            print(f"{claim:34} on {metric:13}: {'held' if held else 'DID NOT HOLD'} "
                  f"({acc[a][metric]:.3f} vs {acc[b][metric]:.3f})")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "json"},
                                         "rows": [{"model": n, "train_s": s, **r} for n, s, r in rows]}, indent=2))


if __name__ == "__main__":
    main()
