"""PatchSearch at toy scale (methods file §1.8 / §2.9), one command on 2 CPU cores.

1. Data: the builtin shapes at 16 px (``--train`` images, 10 classes), written as an ImageFolder ("clean"), and
   poisoned by the ``poison`` job's own function (SSL-Backdoor: 5-px built-in trigger, 100 % of the target class
   ``circle``, train corners in [0.25 S, 0.75 S - w], patched non-target test images in [0.1 S, 0.9 S - w]).
2. Two models trained identically with ``ssl-train`` (SimCLR, ``--epochs`` epochs, batch 128, crop scale
   0.4-1, same seed): one on the clean, one on the poisoned data.
3. Attack check (is the backdoor learned at all? PatchSearch needs it to be): 20-NN on the frozen features, fit on
   the training images; target-class false positives FP among the non-target test images, clean vs with the
   trigger, for both models.
4. PatchSearch with the poisoned model on the poisoned data (detection metrics against the manifest) and with the
   clean model on the clean data (every removed image is a clean image sacrificed).

Everything is cached under ``--cache``; training checkpoints itself, so ``--budget-min N`` stops after about N
minutes and a rerun of the same command continues (the shared machine's rule: no locked command over 8 minutes).
The table is printed when every stage is done.

    python -m bench.patchsearch_repro [--epochs 200] [--train 1500] [--budget-min 7] [--quick]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.common import machine

TARGET = "circle"
NIL = "artifact:00000000-0000-0000-0000-000000000000"


class OutOfBudget(Exception):  # noqa: N818 - control flow
    pass


def _write_clean(ds: Any, out: Path) -> None:
    for split, images, labels in (("train", ds.train_images, ds.train_labels), ("test", ds.test_images,
                                                                                ds.test_labels)):
        for i, (img, y) in enumerate(zip(images, labels, strict=True)):
            d = out / split / ds.classes[int(y)]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i:06d}.png")


def make_data(cache: Path, n_train: int, n_test: int) -> tuple[Path, Path]:
    from shared.data import load_dataset
    from shared.specs.poison import PoisonSpec
    from workers.poison_scanner.poison import load_trigger, poison_dataset

    clean, poisoned = cache / "data" / "clean", cache / "data" / "poisoned"
    if not (clean / "train").is_dir():
        ds = load_dataset({"uri": "builtin://shapes"}, image_size=16, limit_train=n_train, limit_test=n_test)
        _write_clean(ds, clean)
    if not (poisoned / "poison_manifest.json").is_file():
        from shared.data.imagefolder import load_image_folder

        ds = load_image_folder(clean, image_size=16)
        spec = PoisonSpec(dataset="builtin://shapes", target_class=TARGET, rate=1.0, image_size=16,
                          trigger={"size": 5}, seed=0)
        poison_dataset(spec, ds, poisoned, trigger=load_trigger(spec, dataset_root=None), source="clean-16px")
    return clean, poisoned


def train_model(name: str, data: Path, cache: Path, args: argparse.Namespace, deadline: float) -> Path:
    """An ssl-train SimCLR model (cached); resumes from its last checkpoint; raises OutOfBudget at the deadline."""
    from shared.data.imagefolder import load_image_folder
    from shared.specs.ssl_train import SslTrainSpec
    from workers.runtime.context import Preempted
    from workers.runtime.local import LocalContext
    from workers.ssl_trainer.train import train

    out = cache / "models" / f"{name}.pt"
    if out.is_file():
        return out
    spec = SslTrainSpec.model_validate({
                       "kind": "ssl-train", "method": "simclr", "dataset": "builtin://shapes", "image_size": 16,
                       "backbone": args.backbone, "batch_size": 128, "epochs": args.epochs, "lr": 0.06,
                       "temperature": 0.2, "augment": {"crop_scale": [0.4, 1.0]}, "seed": 0, "knn_every": 0,
                       "checkpoint_every": 1})
    ckpts = cache / "ckpt" / name
    found = sorted(ckpts.glob("checkpoint-epoch*.pt"), key=lambda p: int(p.stem.removeprefix("checkpoint-epoch")))
    ctx = LocalContext(spec, checkpoint_dir=ckpts, resume=found[-1] if found else None)
    ds = load_image_folder(data, image_size=16)
    timer = threading.Timer(max(0.0, deadline - time.monotonic()), lambda: setattr(ctx, "stop_requested", True))
    timer.daemon = True
    timer.start()
    t0 = time.perf_counter()
    try:
        train(spec, ds, ctx=ctx)
    except Preempted:
        done = max(int(p.stem.removeprefix("checkpoint-epoch")) for p in ckpts.glob("checkpoint-epoch*.pt"))
        for p in ckpts.glob("checkpoint-epoch*.pt"):  # keep only the newest
            if int(p.stem.removeprefix("checkpoint-epoch")) != done:
                p.unlink()
        raise OutOfBudget(f"{name}: epoch {done}/{args.epochs} after {time.perf_counter() - t0:.0f}s") from None
    finally:
        timer.cancel()
    state = ctx.checkpoint_state(-1)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: state[k] for k in ("backbone", "projector", "meta")}, out)
    for p in ckpts.glob("checkpoint-epoch*.pt"):
        p.unlink()
    return out


def attack_check(model_path: Path, data: Path) -> dict[str, float]:
    """20-NN (fit on the training images) accuracy, and target FP among non-target test images clean vs patched."""
    from shared.data.imagefolder import load_image_folder
    from shared.specs.poison import PoisonManifest, load_patched_test
    from workers.poison_scanner.patchsearch.inputs import load_model, to_pixels

    ds = load_image_folder(data, image_size=16)
    manifest = PoisonManifest.load(data) if (data / "poison_manifest.json").is_file() else None
    model = load_model(torch.load(model_path, weights_only=False), source=str(model_path), device=torch.device("cpu"))
    target = ds.classes.index(TARGET)

    def predict(images: np.ndarray) -> np.ndarray:
        db = model.embed(to_pixels(ds.train_images))
        q = model.embed(to_pixels(images))
        idx = (q @ db.T).topk(20, dim=1).indices.numpy()
        votes = ds.train_labels[idx]
        return np.array([np.bincount(v, minlength=ds.num_classes).argmax() for v in votes])

    non_target = ds.test_labels != target
    clean_pred = predict(ds.test_images)
    out = {"knn20_acc": float((clean_pred == ds.test_labels).mean()),
           "fp_clean": float((clean_pred[non_target] == target).sum()), "non_target_test": float(non_target.sum())}
    # the patched non-target test images (the poisoned dataset's sidecar) serve both models
    root = data if manifest is not None else data.parent / "poisoned"
    images, _, _ = load_patched_test(root)
    out["fp_patched"] = float((predict(np.asarray(images)) == target).sum())
    out["patched_test"] = float(len(images))
    return out


def run_patchsearch(model_path: Path, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    from shared.specs.patchsearch import PatchSearchSpec
    from workers.poison_scanner.patchsearch.inputs import load_model, load_training_set
    from workers.poison_scanner.patchsearch.job import patchsearch
    from workers.runtime.local import LocalContext

    spec = PatchSearchSpec.model_validate({
                       "kind": "patchsearch", "checkpoint": NIL, "dataset": "bench", "clusters": args.clusters,
                       "test_images": args.test_images, "window": 6, "samples_per_iteration": 2,
                       "prune_fraction": 0.25, "batch_size": 512,
                       "classifier": {"models": args.models, "max_iterations": args.iterations}})
    training = load_training_set({"uri": str(data), "name": data.name, "path": str(data)}, image_size=16)
    model = load_model(torch.load(model_path, weights_only=False), source=str(model_path), device=torch.device("cpu"))
    ctx = LocalContext(spec)
    outcome = patchsearch(spec, training, model, ctx=ctx)
    return {"result": outcome.result, "report": outcome.report}


def _stage(cache: Path, name: str, fn: Any) -> Any:
    path = cache / "results" / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    value = fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1))
    return value


def table(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [f"PatchSearch toy reproduction ({machine()}): shapes 16 px, {args.train} train images, SimCLR "
             f"{args.backbone} {args.epochs} epochs; trigger 5 px on 100% of '{TARGET}'", "",
             "| model | 20-NN acc | FP target clean | FP target patched (of non-target test) |",
             "| --- | --- | --- | --- |"]
    for name in ("clean", "poisoned"):
        a = results[f"attack-{name}"]
        lines.append(f"| {name}-data model | {a['knn20_acc']:.3f} | {a['fp_clean']:.0f} | {a['fp_patched']:.0f} "
                     f"(of {a['patched_test']:.0f}) |")
    lines += ["", "| PatchSearch run | images | poisons | scored | rounds | top-5 / 10 / 20 / 50 / 100 prec. | "
              "removed | poisons removed | recall | precision | clean removed | score AUROC | seconds |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, label in (("ps-poisoned", "poisoned data, poisoned model"), ("ps-clean", "clean data, clean model")):
        r = results[name]["result"]
        tops = " / ".join(f"{r[f'top{k}_precision']:.2f}" if f"top{k}_precision" in r else "-"
                          for k in (5, 10, 20, 50, 100))
        pois = r.get("poisons", 0.0)
        clean_removed = r.get("clean_removed_fraction", r["images_removed"] / r["images"])
        lines.append(
            f"| {label} | {r['images']:.0f} | {pois:.0f} | {r['scored_fraction']:.1%} | {r['search_rounds']:.0f} | "
            f"{tops if pois else '-'} | {r['images_removed']:.0f} | {r.get('poisons_removed', 0):.0f} | "
            f"{r.get('removal_recall', float('nan')):.2f} | {r.get('removal_precision', float('nan')):.2f} | "
            f"{clean_removed:.1%} | {r.get('score_auroc', float('nan')):.2f} | {r['seconds_total']:.0f} |")
    base = results["ps-poisoned"]["result"].get("poison_base_rate")
    if base is not None:
        lines.append(f"\npoison base rate {base:.1%}; PatchSearch settings: {args.clusters} clusters, "
                     f"{args.test_images} test images, window 6, 2 samples/round, 25% pruned/round, "
                     f"{args.models} classifiers x {args.iterations} iterations")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=Path("bench/out/patchsearch"))
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--train", type=int, default=1500)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--backbone", default="vit_micro_p2")
    p.add_argument("--clusters", type=int, default=50)
    p.add_argument("--test-images", type=int, default=300)
    p.add_argument("--models", type=int, default=3)
    p.add_argument("--iterations", type=int, default=150)
    p.add_argument("--budget-min", type=float, default=0, help="stop after about this many minutes (0: none)")
    p.add_argument("--quick", action="store_true", help="3 epochs, 300 images: a smoke run, no claims")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.train, args.test, args.clusters, args.test_images, args.iterations = 3, 300, 100, 10, 50, 20
        args.cache = args.cache.with_name(args.cache.name + "-quick")
    torch.set_num_threads(2)
    deadline = time.monotonic() + (args.budget_min * 60 if args.budget_min else 10**9)
    cache = args.cache
    clean, poisoned = make_data(cache, args.train, args.test)
    results: dict[str, Any] = {}
    try:
        # poisoned first: its PatchSearch run is the headline; the clean-data run follows
        for name, data in (("poisoned", poisoned), ("clean", clean)):
            model = train_model(name, data, cache, args, deadline)
            results[f"attack-{name}"] = _stage(cache, f"attack-{name}", lambda m=model, d=data: attack_check(m, d))
            if time.monotonic() > deadline - 60 and not (cache / "results" / f"ps-{name}.json").is_file():
                raise OutOfBudget(f"PatchSearch on {name} not started: under a minute of budget left")
            results[f"ps-{name}"] = _stage(cache, f"ps-{name}", lambda m=model, d=data: run_patchsearch(m, d, args))
            print(f"{name}: attack {results[f'attack-{name}']}; PatchSearch {results[f'ps-{name}']['result']}",
                  flush=True)
    except OutOfBudget as stop:
        print(f"budget reached ({stop}); run the same command again to continue")
        return 3
    print(table(results, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
