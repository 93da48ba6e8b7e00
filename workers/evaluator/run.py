"""``eval`` jobs: k-NN and the reference linear probe on any model checkpoint (ssl.md 1.9).

Entry points: ``run(ctx)`` (``workers.evaluator.run:run``, on the ssl-trainer worker) and the plain
``evaluate(spec, dataset, checkpoint, ctx=...)``.

* Network: the checkpoint's backbone, rebuilt from its ``meta`` and asserted fully loaded
  (``workers.vision.checkpoints``), frozen, eval mode. Inputs are normalised with the statistics the model
  was trained with (``meta["normalization"]``); the dataset is loaded at the checkpoint's image size
  unless the spec overrides it.
* Labelled subset: ``train_fraction < 1`` keeps a deterministic (seeded), class-balanced subset of the
  training images - the same share of every class - used as the k-NN database AND as the probe's
  training set (the semi-supervised 1 % / 10 % protocol).
* k-NN: unweighted majority vote at every ``knn_k`` (the reference's ``knn_top1_k{k}``) and, reported
  separately, the weighted k=200, T=0.1 vote (``knn_weighted_top1_k200``).
* Linear probe: ``linear.py``, on the shared training loop; the last epoch's test accuracy is ``linear_top1``,
  the best epoch's is ``linear_top1_best``. The probe is checkpointed every epoch (with the k-NN numbers, so a
  resumed attempt does not recompute them) and saved as a ``model`` artifact at the end.

The supervisor also logs the result into the MLflow run of the job that produced the checkpoint.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.data import ImageDataset
from shared.specs import EvalSpec
from workers.common import device as dev
from workers.common.context import MethodContext
from workers.common.guards import check_resumable, fmt_metrics
from workers.evaluator.linear import ProbeData, train_probe
from workers.runtime.local import LocalContext
from workers.vision.augment import EvalTransform, ViewTransform
from workers.vision.checkpoints import job_model_checkpoint, load_encoder
from workers.vision.data import EvalDataset, OneViewDataset, check_dataset_fits, load_job_dataset
from workers.vision.knn import extract_features, knn_accuracy

PROBE_CROP_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop default, as the reference probe uses


def run(ctx: MethodContext[EvalSpec]) -> None:
    """Platform entry point: read the checkpoint input, load the dataset at its image size, ``evaluate``."""
    spec = ctx.spec
    state, meta = job_model_checkpoint(ctx.inputs, ref=spec.checkpoint)
    size = spec.image_size or int(meta["image_size"])
    dataset = load_job_dataset(ctx, image_size=size)
    evaluate(spec, dataset, state, ctx=ctx, dataset_root=(ctx.inputs.get("dataset") or {}).get("path"))


def labelled_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a class-balanced subset: a seeded random ``round(fraction * n_c)`` (at least 1)
    of the ``n_c`` images of every class."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    if fraction == 1:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        chosen.append(rng.permutation(members)[:max(1, round(fraction * len(members)))])
    return np.sort(np.concatenate(chosen))


def evaluate(spec: EvalSpec, dataset: ImageDataset, checkpoint: str | Path | Mapping[str, Any], *,
             ctx: MethodContext[EvalSpec] | None = None, device: torch.device | None = None,
             dataset_root: str | Path | None = None) -> dict[str, float]:
    """Evaluate a model checkpoint's backbone on ``dataset``; returns (and ``ctx.set_result``s) the numbers.
    ``dataset_root`` (the extracted dataset folder) is where protocol ``attack`` finds the poison manifest.

    Raises:
        CheckpointError (a ``JobConfigError``): not a model checkpoint, or it does not load completely.
        JobConfigError: no test images, or a resume checkpoint from another config.
        Preempted: a stop was requested; the probe was checkpointed first.
    """
    ctx = ctx if ctx is not None else LocalContext(spec)
    check_dataset_fits(spec, dataset, evaluation="the evaluation")
    dev.configure_threads()
    device = device or dev.select_device()
    dev.configure_backend(device)
    amp = dev.amp_dtype(device, True)
    fmt = dev.memory_format(device, True)

    encoder, meta = load_encoder(checkpoint, features="backbone", device=device)
    encoder.to(memory_format=fmt)
    if int(meta["image_size"]) != dataset.image_size:
        ctx.log(f"note: the model was trained at {meta['image_size']}px, evaluating at {dataset.image_size}px")
    mean, std = meta["normalization"]["mean"], meta["normalization"]["std"]
    subset = labelled_subset(dataset.train_labels, spec.train_fraction, spec.seed)
    train_images, train_labels = dataset.train_images[subset], dataset.train_labels[subset]
    ctx.log(f"evaluating {meta.get('method')} {meta['backbone']}/{meta['stem']} ({encoder.out_dim}-d): "
            f"{len(subset)} labelled train images ({spec.train_fraction:g} of {len(dataset.train_labels)}), "
            f"{len(dataset.test_labels)} test images")

    # Read here for its k-NN numbers (and refused early, before feature extraction, when it does not fit);
    # the probe's loop resumes from it.
    state = ctx.load_checkpoint()
    if state is not None:
        check_resumable(state, spec, required=("probe", "epoch", "knn"), what="eval")

    # Features of the frozen backbone with the evaluation transform: the k-NN database/queries and the
    # probe's standardisation statistics (and its training inputs when augmentation is off).
    t0 = time.perf_counter()
    transform = EvalTransform(mean, std)
    feats = {split: torch.from_numpy(extract_features(encoder, EvalDataset(x, y, transform), device=device,
                                                      amp_dtype=amp, memory_format=fmt,
                                                      num_workers=spec.num_workers))
             for split, x, y in (("train", train_images, train_labels),
                                 ("test", dataset.test_images, dataset.test_labels))}
    ctx.log(f"features extracted in {time.perf_counter() - t0:.1f}s")

    result: dict[str, float] = {"labelled_train_images": float(len(subset))}
    knn: dict[str, float] = dict(state["knn"]) if state is not None else {}
    if "knn" in spec.protocols and not knn:
        knn = knn_accuracy(feats["train"].numpy(), train_labels, feats["test"].numpy(), dataset.test_labels,
                           ks=spec.knn_k, num_classes=dataset.num_classes, seed=spec.seed)
        ctx.log(f"k-NN: {fmt_metrics(knn)}")
        ctx.log_metrics(knn, step=0)
    result |= knn

    if "linear" in spec.protocols:
        opts = spec.linear
        augmented = None
        if opts.augment:
            view = ViewTransform(dataset.image_size, mean, std, strong=False, scale=PROBE_CROP_SCALE)
            augmented = OneViewDataset(train_images, train_labels, view, seed=spec.seed)
        data = ProbeData(feats["train"], torch.tensor(np.asarray(train_labels), dtype=torch.long), feats["test"],
                         torch.tensor(np.asarray(dataset.test_labels), dtype=torch.long), dataset.num_classes,
                         augmented)
        probe_meta = {"feature_dim": encoder.out_dim, "num_classes": dataset.num_classes,
                      "classes": dataset.classes, "checkpoint": spec.checkpoint, "model": meta,
                      "head": "l2-normalize -> standardize (train statistics) -> linear"}

        probe = train_probe(data, opts, encoder=encoder, ctx=ctx, device=device, seed=spec.seed, amp_dtype=amp,
                            memory_format=fmt, num_workers=spec.num_workers,
                            extra_state={"knn": knn, "probe_meta": probe_meta})
        result |= {"linear_top1": probe.last_top1, "linear_top1_best": probe.best_top1,
                   "linear_top1_best_epoch": float(probe.best_epoch)}
        ctx.log(f"linear probe: last epoch {probe.last_top1:.4f}, best {probe.best_top1:.4f} "
                f"(epoch {probe.best_epoch}; selected on the test set, for reference only)")
        assert probe.probe is not None
        out_dir = Path(ctx.workdir or tempfile.mkdtemp(prefix="crucible-probe-"))
        path = out_dir / "linear_probe.pt"
        torch.save({"probe": {k: v.cpu() for k, v in probe.probe.state_dict().items()}, "meta": probe_meta}, path)
        ctx.save_artifact(path, name="linear-probe", artifact_kind="model",
                          meta={"linear_top1": probe.last_top1, "epochs": opts.epochs, "checkpoint": spec.checkpoint})

    if "attack" in spec.protocols:
        from workers.evaluator.attack import attack_eval

        attack = attack_eval(spec, dataset, encoder, meta, root=dataset_root, ctx=ctx, device=device)
        ctx.log(f"attack: {fmt_metrics(attack)}")
        result |= attack

    ctx.set_result(result)
    return result
