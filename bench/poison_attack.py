"""The SSL backdoor toy of security-clip-experts.md §1.8 and the ViT blocking table of §3.4, on 2 CPU cores.

Stages (each one command, results cached as JSON/checkpoints under ``--out``; ``report`` prints the tables):

* ``ssl-clean`` / ``ssl-poisoned``: SimCLR on 16-px shapes (``--train`` images, 10 classes), clean data vs the same
  data with a 5-px random-colour trigger on 100 % of the target class ('circle'), identical spec and seed; then
  the ``attack`` evaluation of each (probe on a clean 10 % labelled subset, FP of the target without/with the
  trigger on the non-target test images). Pass criterion of §1.8: the poisoned model's FP gap
  (patched - clean) at least 3x the clean model's.
* ``kd``: the KD defense: CompRess student (fresh backbone) distilled from the poisoned model on a clean 25 %
  subset (``limit_train``), evaluated the same way.
* ``vit``: the BadNets-style ViT backdoor of §3.4: 32-px shapes, 6-px trigger pasted on 10 % of the non-target
  images which are relabelled as the target (``poison`` mode badnets); SimCLR pre-training of ``vit_micro_p4``,
  then the head trained on the poisoned labelled data (frozen backbone, as §3.1), and attention-gradient
  rollout blocking with black and mean fill vs a random block of the same size.

    python -m bench.poison_attack --stage all [--epochs 200] [--vit-epochs 40] [--out bench/out/poison]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import machine

TARGET = "circle"


def _poison(out: Path, name: str, **spec: Any) -> tuple[Any, Path, Any]:
    from shared.data import load_dataset
    from shared.data.imagefolder import load_image_folder
    from shared.specs.poison import PoisonSpec, load_manifest
    from workers.poison_scanner.poison import load_trigger, poison_dataset

    pspec = PoisonSpec.model_validate({"target_class": TARGET, "seed": 0} | spec)
    root = out / name
    clean = load_dataset({"uri": "builtin://shapes"}, image_size=pspec.image_size, limit_train=pspec.limit_train,
                         limit_test=pspec.limit_test)
    if not (root / "poison_manifest.json").is_file():
        poison_dataset(pspec, clean, root, trigger=load_trigger(pspec, dataset_root=None), source="builtin://shapes")
    return clean, root, (load_image_folder(root, image_size=pspec.image_size), load_manifest(root))


def _ssl(spec: dict[str, Any], data: Any, ckpt: Path) -> dict[str, Any]:
    from shared.specs import SslTrainSpec
    from workers.runtime.local import LocalContext
    from workers.ssl_trainer.train import Trainer

    if ckpt.is_file():
        return dict(torch.load(ckpt, weights_only=False))
    s = SslTrainSpec.model_validate(spec)
    t0 = time.perf_counter()
    trainer = Trainer(s, data, ctx=LocalContext(s), device=torch.device("cpu"))
    trainer.fit()
    state = trainer.method.state_dict()
    state["train_seconds"] = time.perf_counter() - t0
    torch.save(state, ckpt)
    return dict(state)


def _attack(root: Path, data: Any, state: dict[str, Any], **attack: Any) -> dict[str, float]:
    from shared.specs import EvalSpec
    from workers.evaluator.run import evaluate
    from workers.runtime.local import LocalContext

    espec = EvalSpec.model_validate({"checkpoint": "artifact:00000000-0000-0000-0000-000000000000",
                                     "protocols": ["attack"], "train_fraction": 0.1,
                                     "linear": {"epochs": 40, "milestones": [15, 30]}, "attack": attack})
    ctx = LocalContext(espec, workdir=root.parent)
    return evaluate(espec, data, state, ctx=ctx, device=torch.device("cpu"), dataset_root=root)


def toy_spec(args: argparse.Namespace) -> dict[str, Any]:
    return {"kind": "ssl-train", "method": "simclr", "dataset": "toy", "image_size": 16, "backbone": args.backbone,
            "stem": args.stem, "batch_size": 128, "epochs": args.epochs, "lr": 0.06, "lr_schedule": "cosine",
            "temperature": 0.2, "augment": {"crop_scale": [0.4, 1.0]}, "knn_k": [20], "knn_every": 10_000,
            "seed": 0, "proj_hidden_dim": 256, "proj_dim": 64}


def stage_ssl(args: argparse.Namespace, which: str) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clean, root, (poisoned, manifest) = _poison(out, "toy16", image_size=16, limit_train=args.train,
                                                limit_test=args.test, rate=1.0,
                                                trigger={"builtin": "random-colors", "size": 5})
    data = clean if which == "clean" else poisoned
    state = _ssl(toy_spec(args), data, out / f"toy16-{which}-{args.epochs}.pt")
    res = _attack(root, poisoned, state)
    res["train_seconds"] = float(state.get("train_seconds", float("nan")))
    res["poisons"] = float(len(manifest.poisoned))
    (out / f"toy16-{which}-{args.epochs}.json").write_text(json.dumps(res, indent=1))
    print(which, json.dumps({k: round(v, 4) for k, v in res.items()}))


def stage_kd(args: argparse.Namespace) -> None:
    from shared.data import load_dataset
    from shared.specs import DistillSpec
    from workers.distiller.train import train as distill
    from workers.runtime.local import LocalContext

    out = Path(args.out)
    teacher = out / f"toy16-poisoned-{args.epochs}.pt"
    if not teacher.is_file():
        raise SystemExit(f"run --stage ssl-poisoned first ({teacher} is missing)")
    _, root, (poisoned, _m) = _poison(out, "toy16", image_size=16, limit_train=args.train, limit_test=args.test,
                                      rate=1.0, trigger={"builtin": "random-colors", "size": 5})
    subset = args.train // 4  # the defender's clean, unlabelled 25 %
    spec = DistillSpec.model_validate({
        "kind": "distill", "method": "compress", "dataset": "builtin://shapes", "limit_train": subset,
        "limit_test": args.test, "image_size": 16, "backbone": args.backbone, "stem": args.stem,
        "teachers": ["artifact:00000000-0000-0000-0000-000000000000"], "bank_size": subset // 64 * 64,
        "batch_size": 64, "epochs": args.kd_epochs, "knn_k": [20], "seed": 0})
    clean = load_dataset({"uri": "builtin://shapes"}, image_size=16, limit_train=subset, limit_test=args.test)
    ckdir = out / f"kd-ckpt-{args.epochs}"
    ctx = LocalContext(spec, checkpoint_dir=ckdir)
    t0 = time.perf_counter()
    distill(spec, clean, [str(teacher)], ctx=ctx, device=torch.device("cpu"))
    state = torch.load(ctx.checkpoints[-1]["path"], weights_only=False)
    res = _attack(root, poisoned, state) | {"train_seconds": time.perf_counter() - t0, "clean_subset": float(subset)}
    (out / f"toy16-kd-{args.epochs}.json").write_text(json.dumps(res, indent=1))
    print("kd", json.dumps({k: round(v, 4) for k, v in res.items()}))


def stage_vit(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _, root, (poisoned, manifest) = _poison(out, "vit32", image_size=32, limit_train=args.vit_train,
                                            limit_test=args.test, mode="badnets", rate=0.1,
                                            trigger={"builtin": "random-colors", "size": 6})
    spec = toy_spec(args) | {"image_size": 32, "backbone": "vit_micro_p4", "epochs": args.vit_epochs,
                             "lr": 0.05, "proj_hidden_dim": 128, "proj_dim": 32}
    spec.pop("stem")
    state = _ssl(spec, poisoned, out / f"vit32-{args.vit_epochs}.pt")
    rows = {}
    for fill in ("black", "mean"):
        rows[fill] = _attack(root, poisoned, state, block=True, block_fill=fill, heatmaps=8)
    rows["black"]["train_seconds"] = float(state.get("train_seconds", float("nan")))
    (out / f"vit32-{args.vit_epochs}.json").write_text(json.dumps(rows, indent=1))
    print("vit", json.dumps(rows))


def report(args: argparse.Namespace) -> None:
    out = Path(args.out)
    print(f"# poison_attack on {machine()}")
    rows = [(name, out / f"toy16-{name}-{args.epochs}.json") for name in ("clean", "poisoned", "kd")]
    print(f"\n16-px shapes, 5-px trigger, 100% of '{TARGET}' poisoned, SimCLR {args.epochs} epochs ({args.backbone}), "
          "probe on a clean 10% labelled subset")
    print("| model | clean acc | patched acc | FP_target clean -> patched | gap | ASR | train s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, path in rows:
        if path.is_file():
            r = json.loads(path.read_text())
            gap = r["attack_fp_patched"] - r["attack_fp_clean"]
            print(f"| {name} | {r['attack_clean_acc']:.3f} | {r['attack_patched_acc']:.3f} | "
                  f"{r['attack_fp_clean']:.0f} -> {r['attack_fp_patched']:.0f} (of {r['attack_patched_images']:.0f}) "
                  f"| {gap:+.0f} | {r['attack_asr']:.3f} | {r.get('train_seconds', float('nan')):.0f} |")
    vit = out / f"vit32-{args.vit_epochs}.json"
    if vit.is_file():
        v = json.loads(vit.read_text())
        b = v["black"]
        print(f"\nViT (vit_micro_p4, 32 px, 6-px trigger, BadNets 10% relabelled, SimCLR {args.vit_epochs} epochs + "
              "head on the poisoned labels)")
        print("| | clean acc | ASR | trigger hit | random block: clean acc / ASR |")
        print("| --- | --- | --- | --- | --- |")
        print(f"| no defense | {b['attack_clean_acc']:.3f} | {b['attack_asr']:.3f} | - | - |")
        for fill, r in v.items():
            print(f"| block e={r['attack_block_size']:.0f}, {fill} fill | {r['attack_block_clean_acc']:.3f} | "
                  f"{r['attack_block_asr']:.3f} | {r['attack_trigger_hit_rate']:.3f} | "
                  f"{r['attack_random_block_clean_acc']:.3f} / {r['attack_random_block_asr']:.3f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", default="all", choices=["all", "ssl-clean", "ssl-poisoned", "kd", "vit", "report"])
    p.add_argument("--out", default="bench/out/poison")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--kd-epochs", type=int, default=20)
    p.add_argument("--vit-epochs", type=int, default=40)
    p.add_argument("--train", type=int, default=1500)
    p.add_argument("--vit-train", type=int, default=2000)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--stem", default="cifar")
    args = p.parse_args()
    torch.set_num_threads(2)
    if args.stage in ("all", "ssl-clean"):
        stage_ssl(args, "clean")
    if args.stage in ("all", "ssl-poisoned"):
        stage_ssl(args, "poisoned")
    if args.stage in ("all", "vit"):
        stage_vit(args)
    if args.stage in ("all", "kd"):
        stage_kd(args)
    report(args)


if __name__ == "__main__":
    main()
