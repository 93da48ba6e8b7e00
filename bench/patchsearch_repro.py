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
   clean model on the clean data (every removed image is a clean image sacrificed; the "no poison found" rule).
5. Defenses: the PatchSearch-defended model (``ssl-train`` MoCo v2 + ``icutmix`` on the filtered data, same
   budget), the KD-defended model (``distill`` ``compress`` from the poisoned model on a clean ``--kd-fraction``),
   and two controls (SimCLR on the filtered data; MoCo v2 + i-CutMix on the poisoned data; ``--no-controls``).
6. Every model evaluated the same way: the ``eval`` job's ``attack`` protocol (workers/evaluator/attack.py) with
   a clean 10 % probe, an all-clean probe and a probe with the poisons included, plus the 20-NN check with the
   poisoned and the clean training set as the database; rollout blocking (black / mean fill, random-block
   control) on the poisoned ViT with the 10 % and the poisons-included probe.

Everything is cached under ``--cache``; training checkpoints itself, so ``--budget-min N`` stops after about N
minutes and a rerun of the same command continues (the shared machine's rule: no locked command over 8 minutes).
The table is printed when every stage is done.

    python -m bench.patchsearch_repro [--epochs 200] [--train 1500] [--budget-min 7] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.patchsearch_table import PROBE, TARGET, table

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


def train_model(name: str, data: Path, cache: Path, args: argparse.Namespace, deadline: float,
                **overrides: Any) -> Path:
    """An ssl-train model (SimCLR unless ``overrides`` say otherwise; cached); resumes from its last checkpoint;
    raises OutOfBudget at the deadline."""
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
                       "checkpoint_every": 1} | overrides)
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


def run_patchsearch(model_path: Path, data: Path, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
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
    shutil.rmtree(workdir, ignore_errors=True)  # a half-written filtered tree from an interrupted run
    workdir.mkdir(parents=True)
    ctx = LocalContext(spec, workdir=workdir)
    outcome = patchsearch(spec, training, model, ctx=ctx)
    return {"result": outcome.result, "report": outcome.report, "filtered": str(outcome.filtered_dir)}


def attack_eval(model_path: Path, poisoned: Path, workdir: Path, fraction: float = PROBE,
                **attack: Any) -> dict[str, float]:
    """The eval job's ``attack`` protocol (workers/evaluator/attack.py), as bench.poison_attack runs it: linear
    probe on a class-balanced clean 10 % of the poisoned dataset's training images (the manifest's poisons left
    out), clean / patched accuracy, target FP without / with the trigger, ASR; ``attack`` options (``block``)."""
    from shared.data.imagefolder import load_image_folder
    from shared.specs import EvalSpec
    from workers.evaluator.run import evaluate
    from workers.runtime.local import LocalContext

    espec = EvalSpec.model_validate({"checkpoint": NIL, "protocols": ["attack"], "train_fraction": fraction,
                                     "linear": {"epochs": 40, "milestones": [15, 30]}, "attack": attack})
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = LocalContext(espec, workdir=workdir)
    state = torch.load(model_path, weights_only=False)
    return evaluate(espec, load_image_folder(poisoned, image_size=16), state, ctx=ctx, device=torch.device("cpu"),
                    dataset_root=poisoned)


def train_kd(teacher: Path, cache: Path, args: argparse.Namespace) -> Path:
    """The KD defense: a CompRess student (fresh backbone) of the poisoned model on a clean ~25 % subset (the
    builtin loader's first rows, class-mixed; the defender's clean unlabelled data). Not resumable mid-stage
    (a few minutes); cached when done."""
    from shared.data import load_dataset
    from shared.specs import DistillSpec
    from workers.distiller.train import train as distill
    from workers.runtime.local import LocalContext

    out = cache / "models" / "kd.pt"
    if out.is_file():
        return out
    subset = round(args.train * args.kd_fraction)
    spec = DistillSpec.model_validate({
        "kind": "distill", "method": "compress", "dataset": "builtin://shapes", "limit_train": subset,
        "limit_test": args.test, "image_size": 16, "backbone": args.backbone, "teachers": [NIL],
        "bank_size": subset // 64 * 64, "batch_size": 64, "epochs": args.kd_epochs, "knn_k": [20], "seed": 0})
    clean = load_dataset({"uri": "builtin://shapes"}, image_size=16, limit_train=subset, limit_test=args.test)
    ckdir = cache / "ckpt" / "kd"
    shutil.rmtree(ckdir, ignore_errors=True)
    ctx = LocalContext(spec, checkpoint_dir=ckdir)
    distill(spec, clean, [str(teacher)], ctx=ctx, device=torch.device("cpu"))
    state = torch.load(ctx.checkpoints[-1]["path"], weights_only=False)
    torch.save(state, out)
    shutil.rmtree(ckdir, ignore_errors=True)
    return out


def _stage(cache: Path, name: str, fn: Any) -> Any:
    path = cache / "results" / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    value = fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1))
    return value


def training_view(filtered: Path, out: Path) -> Path:
    """The filtered tree as the re-training reads it. With 100 % of the target class poisoned, PatchSearch may
    remove every training image of that class, and the ImageFolder loader refuses test classes without training
    images; SSL training uses no labels, so the view drops those test folders (and the attack evaluation runs on
    the poisoned dataset, which still has them)."""
    if not (out / "train").is_dir():
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(filtered, out)
        present = {d.name for d in (out / "train").iterdir() if d.is_dir() and any(d.iterdir())}
        for d in (out / "test").iterdir():
            if d.is_dir() and d.name not in present:
                print(f"defended training view: every '{d.name}' training image was removed; its test folder "
                      "is left out", flush=True)
                shutil.rmtree(d)
    return out


def extra_checks(stage: Any, name: str, model: Path, clean: Path, poisoned: Path, cache: Path) -> None:
    """Every model the same way: the eval `attack` protocol with the probe on a clean 10 % and on every clean
    training image, and the 20-NN check with the poisoned and with the clean training set as the database."""
    stage(f"eval-{name}", lambda: attack_eval(model, poisoned, cache / "eval" / name))
    stage(f"eval100-{name}", lambda: attack_eval(model, poisoned, cache / "eval" / f"{name}-100", fraction=1.0))
    stage(f"evalp-{name}", lambda: attack_eval(model, poisoned, cache / "eval" / f"{name}-p", fraction=1.0,
                                               probe_includes_poisons=True))
    for db, data in (("poisoned", poisoned), ("clean", clean)):
        stage(f"knn-{name}-{db}", lambda d=data: attack_check(model, d))


def _room(deadline: float, minutes: float, what: str) -> None:
    """Refuse to start a stage that cannot checkpoint itself with under ``minutes`` of budget left."""
    if time.monotonic() > deadline - minutes * 60:
        raise OutOfBudget(f"{what} not started: under {minutes:g} min of budget left")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=Path("bench/out/patchsearch"))
    p.add_argument("--epochs", type=int, default=200, help="SSL epochs of every model (clean, poisoned, defended)")
    p.add_argument("--train", type=int, default=1500)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--backbone", default="vit_micro_p2")
    p.add_argument("--clusters", type=int, default=50)
    p.add_argument("--test-images", type=int, default=300)
    p.add_argument("--models", type=int, default=3)
    p.add_argument("--iterations", type=int, default=150)
    p.add_argument("--kd-fraction", type=float, default=0.25, help="clean share the KD student is distilled on")
    p.add_argument("--kd-epochs", type=int, default=200)
    p.add_argument("--no-controls", dest="controls", action="store_false",
                   help="skip the two controls (SimCLR on the filtered data; MoCo v2 + i-CutMix on the poisoned)")
    p.add_argument("--budget-min", type=float, default=0, help="stop after about this many minutes (0: none)")
    p.add_argument("--quick", action="store_true", help="3 epochs, 300 images: a smoke run, no claims")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.train, args.test, args.clusters, args.test_images, args.iterations = 3, 300, 100, 10, 50, 20
        args.kd_epochs = 2
        args.cache = args.cache.with_name(args.cache.name + "-quick")
    from workers.common.device import THREADS_ENV, configure_threads

    if os.environ.get(THREADS_ENV, "").strip():  # CRUCIBLE_WORKER_TORCH_THREADS wins (a shared machine)
        configure_threads()
    else:  # the toy recipe's 2 cores
        torch.set_num_threads(2)
    deadline = time.monotonic() + (args.budget_min * 60 if args.budget_min else 10**9)
    cache = args.cache
    clean, poisoned = make_data(cache, args.train, args.test)
    results: dict[str, Any] = {}

    def stage(name: str, fn: Any) -> Any:
        results[name] = _stage(cache, name, fn)
        return results[name]

    def done(name: str) -> bool:
        return (cache / "results" / f"{name}.json").is_file()

    try:
        # the poisoned model and everything that needs only it first (PatchSearch, blocking, the KD student,
        # the defended retraining); the clean-data model and its PatchSearch run last
        model = train_model("poisoned", poisoned, cache, args, deadline)
        stage("attack-poisoned", lambda: attack_check(model, poisoned))
        extra_checks(stage, "poisoned", model, clean, poisoned, cache)
        if not done("ps-poisoned"):
            _room(deadline, 4, "PatchSearch on the poisoned data")
        ps = stage("ps-poisoned", lambda: run_patchsearch(model, poisoned, args, cache / "ps" / "poisoned"))
        print(f"poisoned: attack {results['attack-poisoned']}; PatchSearch {ps['result']}", flush=True)
        for fill in ("black", "mean"):
            stage(f"block-{fill}", lambda f=fill: attack_eval(model, poisoned, cache / "eval" / f"block-{f}",
                                                               block=True, block_fill=f, heatmaps=8))
            stage(f"blockp-{fill}", lambda f=fill: attack_eval(model, poisoned, cache / "eval" / f"blockp-{f}",
                                                                fraction=1.0, probe_includes_poisons=True,
                                                                block=True, block_fill=f, heatmaps=8))
        if not done("eval-kd"):
            _room(deadline, 6, "the KD student")
        kd = train_kd(model, cache, args)
        extra_checks(stage, "kd", kd, clean, poisoned, cache)
        filtered = Path(ps["filtered"])
        if not (filtered / "train").is_dir():
            raise SystemExit(f"the filtered dataset {filtered} is gone; delete {cache}/results/ps-poisoned.json")
        kept = int(ps["result"]["images"] - ps["result"]["images_removed"])
        defended = train_model("defended", training_view(filtered, cache / "data" / "defended"), cache, args,
                               deadline, method="moco", icutmix=True,
                               bank_size=max(128, min(1024, kept // 128 * 128)))
        extra_checks(stage, "defended", defended, clean, poisoned, cache)
        model = train_model("clean", clean, cache, args, deadline)
        stage("attack-clean", lambda: attack_check(model, clean))
        extra_checks(stage, "clean", model, clean, poisoned, cache)
        if not done("ps-clean"):
            _room(deadline, 4, "PatchSearch on the clean data")
        stage("ps-clean", lambda: run_patchsearch(model, clean, args, cache / "ps" / "clean"))
        print(f"clean: attack {results['attack-clean']}; PatchSearch {results['ps-clean']['result']}", flush=True)
        if args.controls:  # which half of the defense does the work: the filter, or MoCo v2 + i-CutMix?
            m = train_model("control-simclr-filtered", training_view(filtered, cache / "data" / "defended"), cache,
                            args, deadline)
            extra_checks(stage, "control-simclr-filtered", m, clean, poisoned, cache)
            m = train_model("control-icutmix-poisoned", poisoned, cache, args, deadline, method="moco",
                            icutmix=True, bank_size=max(128, min(1024, args.train // 128 * 128)))
            extra_checks(stage, "control-icutmix-poisoned", m, clean, poisoned, cache)
    except OutOfBudget as stop:
        print(f"budget reached ({stop}); run the same command again to continue")
        print(table(results, args))
        return 3
    print(table(results, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
