"""Small-scale reproduction benchmark of the lab's SSL methods (issues 3 and 14), one command, 2 CPU cores.

Same budget for every method (dataset, epochs, batch, backbone, views): random init, BYOL, MSF,
CMSF-supervised, ISD, and SimReg students distilled from the MSF teacher with and without the MLP head, each
trained once per seed (seeds 0 .. N-1: never selected). Each model is evaluated the same way: 20-NN
(unweighted majority, the reference protocol) and the reference linear probe (L2-normalise -> standardise ->
linear) on frozen backbone features. Rows are mean +- sample std over the seeds.

The views follow the dataset family's recipe (shared/specs/recipes.py: no flips and grey jitter for digits,
a full hue rotation for shapes, MoCo-v2 for natural images); ``--crop-scale``, ``--hflip`` / ``--no-hflip``
and ``--color-jitter`` override it field by field, as a spec's ``augment`` block does.

Expected from the papers: MSF > BYOL > random init; CMSF-supervised > MSF; SimReg with MLP head >= without.
A claim "holds" only when the gap of the means exceeds the spread (the std of the difference of the means
over the seeds); the numbers are printed as measured, not tuned to agree.

    python -m bench.ssl_repro [--dataset builtin://mnist] [--seeds 3] [--epochs 8] [--quick]
    python -m bench.ssl_repro --dataset builtin://mnist --methods random,msf --seeds 3 --knn-every 1
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import machine

NIL = "artifact:00000000-0000-0000-0000-000000000000"  # specs need a ref; the benchmark passes states directly

# (key, row name, ssl-train method or None, extra spec fields)
SSL_ROWS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("byol", "BYOL (MSF k=1)", "byol", {}),
    ("msf", "MSF (k=5)", "msf", {"topk": 5}),
    ("cmsf", "CMSF-supervised (k=5)", "cmsf", {"topk": 5, "cmsf": {"constraint": "supervised"}}),
    ("isd", "ISD (plus recipe)", "isd", {"isd": {"recipe": "plus"}}),
]
SIMREG_ROWS = [("simreg-mlp", "SimReg from MSF, MLP head", "mlp"), ("simreg-linear", "SimReg from MSF, linear head",
                                                                     "linear")]
ROW_NAMES = {"random": "random init", **{k: n for k, n, _, _ in SSL_ROWS}, **{k: n for k, n, _ in SIMREG_ROWS}}
# (claim, a, b, strict): "a > b" holds when mean(a) - mean(b) exceeds the spread; "a >= b" unless b leads by more.
CLAIMS = [("MSF > BYOL", "msf", "byol", True), ("BYOL > random init", "byol", "random", True),
          ("MSF > random init", "msf", "random", True), ("CMSF-supervised > MSF", "cmsf", "msf", True),
          ("ISD > random init", "isd", "random", True),
          ("SimReg MLP head >= linear head", "simreg-mlp", "simreg-linear", False)]
METRICS = (("knn_top1_k20", "20-NN"), ("linear_top1", "linear"))


def augment_overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.crop_scale:
        out["crop_scale"] = args.crop_scale
    if args.hflip is not None:
        out["hflip"] = args.hflip
    if args.color_jitter:
        out["color_jitter"] = args.color_jitter
    return out


def common_fields(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    return {"dataset": args.dataset, "limit_train": args.limit_train or None, "limit_test": args.limit_test or None,
            "backbone": args.backbone, "stem": args.stem, "image_size": args.image_size, "epochs": args.epochs,
            "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay, "seed": seed,
            "knn_k": [1, 20], "num_workers": args.num_workers, "amp": args.amp, "channels_last": args.channels_last}


def ssl_spec(method: str, args: argparse.Namespace, seed: int, **extra: Any) -> dict[str, Any]:
    return {"kind": "ssl-train", "method": method, **common_fields(args, seed), "bank_size": args.bank_size,
            "augmentation": args.augmentation, "augment": augment_overrides(args), "knn_every": args.knn_every,
            "warmup_epochs": args.warmup_epochs, **extra}


def distill_spec(head: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    return {"kind": "distill", "method": "simreg", "teachers": [NIL], "head": head, **common_fields(args, seed),
            "knn_every": 0}


def random_init_checkpoint(data: Any, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    import torch

    from workers.vision.backbones import create_backbone
    from workers.vision.checkpoints import model_payload

    torch.manual_seed(seed)
    mean, std = data.channel_stats()
    meta = {"method": "random-init", "backbone": args.backbone, "stem": args.stem, "image_size": data.image_size,
            "normalization": {"mean": list(mean), "std": list(std)}, "classes": data.classes}
    return model_payload(create_backbone(args.backbone, stem=args.stem), meta=meta)


def evaluate(checkpoint: dict[str, Any], data: Any, args: argparse.Namespace, seed: int) -> dict[str, float]:
    from shared.specs import EvalSpec, parse_spec
    from workers.evaluator.run import evaluate as run_eval

    spec = parse_spec({"kind": "eval", "checkpoint": NIL, "dataset": args.dataset, "knn_k": [1, 20],
                       "linear": {"epochs": args.probe_epochs, "milestones": [int(args.probe_epochs * 0.6),
                                                                              int(args.probe_epochs * 0.85)],
                                  "augment": False}, "seed": seed}, EvalSpec)
    return run_eval(spec, data, checkpoint)


def curve_of(ctx: Any) -> list[dict[str, float]]:
    """Per-epoch k-NN of a run (epoch 0 = random init), from the metrics it logged."""
    out = []
    for _, m in ctx.metrics:
        if "baseline_knn_top1_k20" in m:
            out.append({"epoch": 0.0, "knn_top1_k1": m["baseline_knn_top1_k1"],
                        "knn_top1_k20": m["baseline_knn_top1_k20"]})
        elif "knn_top1_k20" in m:
            out.append({"epoch": m["epoch"], "knn_top1_k1": m["knn_top1_k1"], "knn_top1_k20": m["knn_top1_k20"]})
    return out


def summarise(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def judge(a: list[float], b: list[float], strict: bool) -> tuple[str, float, float]:
    """Verdict on the means of a vs b: the gap must exceed the std of the difference of the means."""
    (ma, sa), (mb, sb) = summarise(a), summarise(b)
    spread = math.sqrt(sa * sa / len(a) + sb * sb / len(b)) if len(a) > 1 and len(b) > 1 else 0.0
    gap = ma - mb
    if strict:
        verdict = "held" if gap > spread else ("**did not hold**" if gap < -spread else "within spread: not shown")
    else:
        verdict = "held" if gap >= -spread else "**did not hold**"
    return verdict, gap, spread


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="builtin://shapes", help="builtin://shapes, builtin://mnist, ...")
    ap.add_argument("--limit-train", type=int, default=5000, help="0: every training image")
    ap.add_argument("--limit-test", type=int, default=1000, help="0: every test image")
    ap.add_argument("--seeds", type=int, default=1, help="train every row with seeds 0 .. N-1 (none dropped)")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="start at this seed (seeds F .. F+N-1): split one table over processes or machines")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                    help="train nothing: print the table and claims over the runs in these --json files")
    ap.add_argument("--methods", default="random,byol,msf,cmsf,isd,simreg-mlp,simreg-linear",
                    help="comma-separated rows to run (simreg needs msf)")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--stem", default="imagenet", help="imagenet (cheap on CPU) or cifar (the GPU setting)")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--warmup-epochs", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--bank-size", type=int, default=1024)
    ap.add_argument("--lr", type=float, help="default: MSF's 0.05 at batch 256, scaled linearly to --batch-size")
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--augmentation", default="weak/strong", help="target/online views (MSF w/s)")
    ap.add_argument("--crop-scale", type=float, nargs=2, help="override the recipe's RandomResizedCrop scale")
    ap.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None,
                    help="override the recipe's horizontal flips")
    ap.add_argument("--color-jitter", type=float, nargs=4, help="override the recipe's strong-view ColorJitter")
    ap.add_argument("--knn-every", type=int, default=0, help="k-NN every N epochs: the learning curves")
    ap.add_argument("--probe-epochs", type=int, default=40)
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="mixed precision (CUDA only)")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                    help="channels-last memory format (CUDA only)")
    ap.add_argument("--quick", action="store_true", help="1 epoch on 512 images: a smoke run, not a result")
    ap.add_argument("--json", type=Path, help="also write every run (with its curve) and the table as JSON here")
    args = ap.parse_args()
    if args.quick:
        args.limit_train, args.limit_test, args.epochs, args.probe_epochs, args.bank_size = 512, 200, 1, 3, 256
    if args.lr is None:
        args.lr = 0.05 * args.batch_size / 256
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - set(ROW_NAMES)
    if unknown:
        ap.error(f"unknown --methods {sorted(unknown)}; choose from {', '.join(ROW_NAMES)}")
    if any(m.startswith("simreg") for m in args.methods) and "msf" not in args.methods:
        ap.error("the SimReg rows distil the MSF row: add msf to --methods")
    return args


def main() -> None:
    args = parse_args()
    if args.merge:
        merge(args.merge)
        return
    from shared.data import load_dataset
    from shared.specs import DistillSpec, SslTrainSpec, parse_spec
    from workers.common.device import configure_threads
    from workers.distiller.train import train as distill
    from workers.runtime.local import LocalContext
    from workers.ssl_trainer.train import train as ssl_train

    configure_threads()
    data = load_dataset({"uri": args.dataset}, image_size=args.image_size, limit_train=args.limit_train or None,
                        limit_test=args.limit_test or None)
    recipe = parse_spec(ssl_spec("msf", args, 0), SslTrainSpec).augment
    runs: list[dict[str, Any]] = []
    t_all = time.perf_counter()

    def record(key: str, seed: int, checkpoint: dict[str, Any], seconds: float, curve: list[Any]) -> None:
        res = evaluate(checkpoint, data, args, seed)
        runs.append({"model": key, "seed": seed, "train_s": seconds, "curve": curve, **res})
        print(f"  seed {seed} {ROW_NAMES[key]:28} 20-NN {res['knn_top1_k20']:.3f}  linear {res['linear_top1']:.3f}  "
              f"({seconds:.0f}s training)", flush=True)

    def save(**extra: Any) -> None:  # after every run, so a stopped process keeps what it measured
        if args.json:
            args.json.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v
                                                      for k, v in vars(args).items() if k not in ("json", "merge")},
                                             "recipe": recipe.model_dump(), "machine": machine(),
                                             "total_s": time.perf_counter() - t_all, "runs": runs, **extra},
                                            indent=2))

    for seed in range(args.first_seed, args.first_seed + args.seeds):
        if "random" in args.methods:
            record("random", seed, random_init_checkpoint(data, args, seed), 0.0, [])
            save()
        teacher: dict[str, Any] | None = None
        for key, _, method, extra in SSL_ROWS:
            if key not in args.methods:
                continue
            train_spec = parse_spec(ssl_spec(method, args, seed, **extra), SslTrainSpec)
            train_ctx = LocalContext(train_spec)
            t0 = time.perf_counter()
            ssl_train(train_spec, data, ctx=train_ctx)
            state = train_ctx.checkpoint_state(-1)
            teacher = state if key == "msf" else teacher
            record(key, seed, state, time.perf_counter() - t0, curve_of(train_ctx))
            save()
        for key, _, head in SIMREG_ROWS:
            if key not in args.methods or teacher is None:
                continue
            distill_ctx = LocalContext(parse_spec(distill_spec(head, args, seed), DistillSpec))
            t0 = time.perf_counter()
            distill(distill_ctx.spec, data, [teacher], ctx=distill_ctx)
            record(key, seed, distill_ctx.checkpoint_state(-1), time.perf_counter() - t0, [])
            save()

    total = time.perf_counter() - t_all
    last = args.first_seed + args.seeds - 1
    print(f"\nssl_repro: {args.dataset} ({len(data.train_images)} train / {len(data.test_images)} test, "
          f"{args.image_size} px), {args.backbone} ({args.stem} stem), {args.epochs} epochs (warm-up "
          f"{args.warmup_epochs}), batch {args.batch_size}, lr {args.lr:g}, wd {args.weight_decay}, bank "
          f"{args.bank_size}, {args.augmentation} views, seeds {args.first_seed}-{last}; probe {args.probe_epochs} "
          f"epochs; amp {args.amp}, channels_last {args.channels_last} (CUDA only)")
    print(f"recipe: {recipe.model_dump()}")
    print(f"machine: {machine()}; total {total / 60:.1f} min\n")
    save(claims=report(runs))


def report(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Print the mean ± std table and the claims judged on the means; returns the claims."""
    by_model: dict[str, dict[str, list[float]]] = {}
    for r in runs:
        for metric, _ in METRICS:
            by_model.setdefault(r["model"], {}).setdefault(metric, []).append(r[metric])
        by_model[r["model"]].setdefault("train_s", []).append(r["train_s"])
    seeds = sorted({int(r["seed"]) for r in runs})
    print(f"| {'model':28} | 20-NN (mean ± std) | linear (mean ± std) | train s |")
    print(f"|{'-' * 30}|--------------------|---------------------|---------|")
    for key in [k for k in ROW_NAMES if k in by_model]:
        cells = [f"{m:.3f} ± {s:.3f}" for m, s in (summarise(by_model[key][metric]) for metric, _ in METRICS)]
        print(f"| {ROW_NAMES[key]:28} | {cells[0]:18} | {cells[1]:19} | "
              f"{statistics.fmean(by_model[key]['train_s']):7.0f} |")
    print(f"\nclaims on the means over {len(seeds)} seed(s) {seeds}"
          + (" (1 seed: no spread, verdicts are provisional)" if len(seeds) < 2 else "") + ":")
    claims = []
    for claim, a, b, strict in CLAIMS:
        if a not in by_model or b not in by_model:
            continue
        for metric, label in METRICS:
            verdict, gap, spread = judge(by_model[a][metric], by_model[b][metric], strict)
            claims.append({"claim": claim, "metric": metric, "verdict": verdict, "gap": gap, "spread": spread})
            print(f"  {claim:32} {label:7}: {verdict} (gap {gap:+.3f}, spread {spread:.3f})")
    return claims


def merge(paths: list[Path]) -> None:
    """The table over several ``--json`` files (e.g. seeds run in parallel); a (model, seed) twice is an error."""
    runs: list[dict[str, Any]] = []
    for path in paths:
        payload = json.loads(path.read_text())
        print(f"{path}: {payload['args'].get('dataset')}, {len(payload['runs'])} runs, machine {payload['machine']}")
        runs += payload["runs"]
    keys = [(r["model"], r["seed"]) for r in runs]
    if len(keys) != len(set(keys)):
        raise SystemExit(f"the files repeat (model, seed) pairs: {sorted(k for k in set(keys) if keys.count(k) > 1)}")
    print()
    report(runs)


if __name__ == "__main__":
    main()
