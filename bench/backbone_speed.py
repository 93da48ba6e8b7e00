"""Per-epoch cost of MSF pre-training by backbone, side by side with ResNet-18 (the baseline), on a tiny case.

Each backbone trains the same MSF spec (builtin://shapes, ``--images`` training images, 32 px, batch 32) for 1
and for ``1 + --extra`` epochs through ``workers.ssl_trainer.train.train``; the difference divided by
``--extra`` is the per-epoch cost without the fixed part (start-up, random-init and final k-NN). Printed as
seconds and as the ratio to ResNet-18 (< 1: cheaper than ResNet-18).

    python -m bench.backbone_speed [--backbones vit_micro_p4,vit_tiny_p4] [--images 256] [--extra 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench.common import machine


def epoch_times(backbone: str, *, images: int, epochs: int, image_size: int, stem: str) -> float:
    from shared.data import load_dataset
    from shared.specs import SslTrainSpec
    from workers.runtime.local import LocalContext
    from workers.ssl_trainer.train import train

    spec = SslTrainSpec.model_validate({
        "kind": "ssl-train", "method": "msf", "dataset": "builtin://shapes", "limit_train": images, "limit_test": 64,
        "image_size": image_size, "backbone": backbone, "stem": stem, "batch_size": 32, "bank_size": 64,
        "epochs": epochs, "knn_k": [1], "checkpoint_every": 1000})
    data = load_dataset({"uri": spec.dataset}, image_size=image_size, limit_train=images, limit_test=64)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        train(spec, data, ctx=LocalContext(spec, checkpoint_dir=Path(tmp)))
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", default="vit_micro_p4,vit_tiny_p4")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--extra", type=int, default=2, help="extra epochs whose cost is measured")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"MSF per-epoch cost, {args.images} images x {args.image_size} px, batch 32, {args.threads} threads; "
          f"{machine()}")
    per_epoch: dict[str, float] = {}
    for name in ["resnet18", *args.backbones.split(",")]:
        stem = "cifar"
        short = epoch_times(name, images=args.images, epochs=1, image_size=args.image_size, stem=stem)
        long = epoch_times(name, images=args.images, epochs=1 + args.extra, image_size=args.image_size, stem=stem)
        per_epoch[name] = (long - short) / args.extra
        ratio = per_epoch[name] / per_epoch["resnet18"]
        print(f"  {name:<16} {per_epoch[name]:7.2f} s/epoch   x{ratio:.2f} of resnet18   (1 epoch: {short:.1f} s)")


if __name__ == "__main__":
    main()
