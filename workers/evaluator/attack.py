"""The ``attack`` protocol of ``eval``: backdoor metrics of a checkpoint on a dataset made by a ``poison`` job
(security-clip-experts.md §1.3), and the ViT test-time blocking defense (§3.3).

Protocol:

1. Ground truth from ``poison_manifest.json`` (never from file names): the poisoned training images are LEFT
   OUT of the probe's training set (the victim trains its head on CLEAN labelled data), and a class-balanced
   ``train_fraction`` of the clean rest is the labelled set. For a ``badnets`` dataset (or with
   ``attack.probe_includes_poisons``) they stay in: there the head training data is what is poisoned (§3.1, the
   ViT-backdoor setting: a frozen backbone, only the head trained on the poisoned labels).
2. Linear probe on the frozen backbone (``L2-normalise -> standardise -> linear``, the spec's ``linear`` options,
   cached features: no augmentation).
3. The same head on the clean test set and on the patched test set (``patched_test.npy``: the non-target test
   images with the trigger). With ``t`` the target class and ``N`` the non-target count:

   * ``attack_clean_acc`` / ``attack_patched_acc``: top-1 on clean test / on patched (true labels);
   * ``attack_fp_clean`` / ``attack_fp_patched``: non-target images predicted ``t`` without / with the trigger;
   * ``attack_asr = fp_patched / N`` beside ``attack_asr_clean = fp_clean / N_clean`` (a clean model has FPs too);
   * ``attack_nfp_patched = FP_t / max_c FP_c`` on the patched set (PatchSearch's NFP).

Blocking (``attack.block``, ViT backbones): attention-gradient rollout (``workers.poison_scanner.rollout``) of the
predicted class, the most-attended ``e x e`` window (``e`` = ``attack.block_size``, default the trigger side) is
filled (black = 0 in pixel space, the reference; or the image mean) and the image classified again. Reported on
patched AND clean images (the clean-accuracy cost), with the trigger-localisation hit rate (window overlaps the
true trigger box) and the same-size random-location block control.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from shared.data import ImageDataset
from shared.specs.eval import EvalSpec, LinearProbeOptions
from shared.specs.poison import load_manifest, load_patched_test, poisoned_mask
from workers.common.context import MethodContext
from workers.evaluator.linear import LinearProbe
from workers.poison_scanner.rollout import block, boxes_overlap, grad_rollout_maps, random_windows, top_window
from workers.runtime.context import JobConfigError
from workers.vision.augment import EvalTransform
from workers.vision.data import EvalDataset
from workers.vision.knn import extract_features

BATCH = 128


def attack_metrics(pred_clean: np.ndarray, y_clean: np.ndarray, pred_patched: np.ndarray, y_patched: np.ndarray,
                   target: int, num_classes: int) -> dict[str, float]:
    """§1.3 step 4 from predictions: accuracy, target FP with/without trigger, ASR, NFP."""
    pred_clean, y_clean = np.asarray(pred_clean), np.asarray(y_clean)
    pred_patched, y_patched = np.asarray(pred_patched), np.asarray(y_patched)
    nontarget = y_clean != target
    fp_clean = int((pred_clean[nontarget] == target).sum())
    fp_patched = int((pred_patched == target).sum()) - int(((pred_patched == target) & (y_patched == target)).sum())
    fp_per_class = np.bincount(pred_patched[pred_patched != y_patched], minlength=num_classes)
    return {
        "attack_clean_acc": float((pred_clean == y_clean).mean()) if len(y_clean) else math.nan,
        "attack_patched_acc": float((pred_patched == y_patched).mean()) if len(y_patched) else math.nan,
        "attack_fp_clean": float(fp_clean), "attack_fp_patched": float(fp_patched),
        "attack_asr": fp_patched / max(1, int((y_patched != target).sum())),
        "attack_asr_clean": fp_clean / max(1, int(nontarget.sum())),
        "attack_nfp_patched": fp_patched / max(1, int(fp_per_class.max())),
        "attack_nontarget_clean": float(nontarget.sum()), "attack_patched_images": float(len(y_patched)),
    }


def fit_probe(train_x: Tensor, train_y: Tensor, num_classes: int, opts: LinearProbeOptions, *, seed: int,
              device: torch.device) -> LinearProbe:
    """The reference probe on cached features: SGD, LR x0.1 at each milestone, ``opts.epochs`` epochs."""
    with torch.random.fork_rng(devices=[]):  # a seeded head init: two calls give the same probe
        torch.manual_seed(seed)
        probe = LinearProbe.from_features(train_x, num_classes).to(device)
    opt = torch.optim.SGD(probe.parameters(), lr=opts.lr, momentum=opts.momentum, weight_decay=opts.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(opts.milestones), gamma=0.1)
    g = torch.Generator().manual_seed(seed)
    x, y = train_x.to(device), train_y.to(device)
    for _ in range(opts.epochs):
        order = torch.randperm(len(y), generator=g).to(device)
        for i in range(0, len(y), opts.batch_size):
            idx = order[i:i + opts.batch_size]
            loss = F.cross_entropy(probe(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return probe.eval()


def _features(encoder: nn.Module, images: np.ndarray, labels: np.ndarray, transform: EvalTransform,
              device: torch.device) -> Tensor:
    return torch.from_numpy(extract_features(encoder, EvalDataset(images, labels, transform), device=device))


def attack_eval(spec: EvalSpec, dataset: ImageDataset, encoder: nn.Module, meta: dict[str, Any], *,
                root: str | Path | None, ctx: MethodContext[EvalSpec], device: torch.device) -> dict[str, float]:
    """The attack protocol (module docstring); ``root`` is the extracted poisoned dataset's folder."""
    manifest = load_manifest(root) if root else None
    if manifest is None or root is None:
        raise JobConfigError("protocol 'attack' needs a dataset made by a poison job (poison_manifest.json at its "
                             "root); pass that dataset as `dataset`")
    if list(dataset.classes) != manifest.classes:
        raise JobConfigError(f"the dataset's classes {dataset.classes[:10]} are not the manifest's "
                             f"{manifest.classes[:10]}")
    try:
        patched, patched_y, boxes = load_patched_test(root, manifest)
    except FileNotFoundError as exc:
        raise JobConfigError(f"protocol 'attack': {exc}") from exc
    if patched.shape[1] != dataset.image_size:
        raise JobConfigError(f"the patched test images are {patched.shape[1]} px, the evaluation runs at "
                             f"{dataset.image_size} px; evaluate at image_size: {patched.shape[1]}")
    from workers.evaluator.run import labelled_subset

    mask = poisoned_mask(manifest, root, limit_train=spec.limit_train)
    include = spec.attack.probe_includes_poisons
    if include is None:
        include = getattr(manifest, "mode", "ssl") == "badnets"
    clean_rows = np.arange(len(mask)) if include else np.flatnonzero(~mask)
    rows = clean_rows[labelled_subset(dataset.train_labels[clean_rows], spec.train_fraction, spec.seed)]
    target, n_cls = manifest.target_index, dataset.num_classes
    mean, std = meta["normalization"]["mean"], meta["normalization"]["std"]
    transform = EvalTransform(mean, std)
    ctx.log(f"attack: probe on {len(rows)} labelled images ({int(mask.sum())} poisoned "
            f"{'kept in' if include else 'left out'}), "
            f"{len(dataset.test_labels)} clean / {len(patched_y)} patched test images, target "
            f"{manifest.target_class!r}")
    f_train = _features(encoder, dataset.train_images[rows], dataset.train_labels[rows], transform, device)
    f_test = _features(encoder, dataset.test_images, dataset.test_labels, transform, device)
    f_patched = _features(encoder, patched, patched_y, transform, device)
    probe = fit_probe(f_train, torch.as_tensor(dataset.train_labels[rows], dtype=torch.long), n_cls, spec.linear,
                      seed=spec.seed, device=device)
    with torch.no_grad():
        pred_clean = probe(f_test.to(device)).argmax(1).cpu().numpy()
        pred_patched = probe(f_patched.to(device)).argmax(1).cpu().numpy()
    result = attack_metrics(pred_clean, dataset.test_labels, pred_patched, patched_y, target, n_cls)
    result["attack_probe_images"] = float(len(rows))
    result["attack_probe_poisoned_images"] = float(mask[rows].sum())
    if spec.attack.block:
        backbone = getattr(encoder, "backbone", encoder)
        if getattr(backbone, "family", "") != "vit":
            raise JobConfigError(f"attack.block needs a ViT backbone (attention rollout); {meta['backbone']} is a CNN")
        result |= block_eval(spec, backbone, probe, dataset, patched, patched_y, boxes, target, transform,
                             mean=mean, std=std, size=spec.attack.block_size or manifest.trigger.size, ctx=ctx,
                             device=device)
    return result


def _predict(backbone: nn.Module, probe: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return probe(backbone(x)).argmax(1)


def block_eval(spec: EvalSpec, backbone: nn.Module, probe: nn.Module, dataset: ImageDataset, patched: np.ndarray,
               patched_y: np.ndarray, boxes: np.ndarray, target: int, transform: EvalTransform, *, mean: Any,
               std: Any, size: int, ctx: MethodContext[EvalSpec], device: torch.device) -> dict[str, float]:
    """Top-attended-window blocking and its random-location control, on patched and clean test images."""
    opts = spec.attack
    g = torch.Generator().manual_seed(spec.seed + 1)
    out: dict[str, float] = {}
    shown: list[tuple[np.ndarray, np.ndarray, list[int], list[int]]] = []
    for split, images, labels, bxs in (("patched", patched, patched_y, boxes),
                                       ("clean", dataset.test_images, dataset.test_labels, None)):
        preds: dict[str, list[Tensor]] = {"top": [], "random": []}
        hits: list[Tensor] = []
        for i in range(0, len(labels), BATCH):
            raw = torch.from_numpy(np.ascontiguousarray(images[i:i + BATCH])).permute(0, 3, 1, 2)
            x = transform(raw).to(device)
            maps, _ = grad_rollout_maps(backbone, probe, x, discard_ratio=opts.discard_ratio)
            corners = top_window(maps, size).cpu()
            rand = random_windows(len(x), x.shape[-2], x.shape[-1], size, g)
            preds["top"].append(_predict(backbone, probe, block(x, corners, size, fill=opts.block_fill, mean=mean,
                                                                std=std)).cpu())
            preds["random"].append(_predict(backbone, probe, block(x, rand, size, fill=opts.block_fill, mean=mean,
                                                                   std=std)).cpu())
            if bxs is not None:
                true = torch.as_tensor(bxs[i:i + BATCH])
                hits.append(boxes_overlap(corners, size, true))
                for j in range(min(len(x), opts.heatmaps - len(shown))):
                    shown.append((images[i + j], maps[j].detach().cpu().numpy(), corners[j].tolist(),
                                  true[j].tolist()))
        y = torch.as_tensor(np.asarray(labels))
        for how, key in (("top", "block"), ("random", "random_block")):
            p = torch.cat(preds[how])
            if split == "patched":
                hit = ((p == target) & (y != target)).sum()
                out[f"attack_{key}_asr"] = float(hit) / max(1, int((y != target).sum()))
                out[f"attack_{key}_patched_acc"] = float((p == y).float().mean())
            else:
                out[f"attack_{key}_clean_acc"] = float((p == y).float().mean())
        if hits:
            out["attack_trigger_hit_rate"] = float(torch.cat(hits).float().mean())
    out["attack_block_size"] = float(size)
    ctx.log(f"blocking ({opts.block_fill} fill, {size} px): ASR {out['attack_block_asr']:.3f} (random block "
            f"{out['attack_random_block_asr']:.3f}), clean acc {out['attack_block_clean_acc']:.3f}, trigger hit "
            f"{out.get('attack_trigger_hit_rate', math.nan):.3f}")
    if shown:
        _save_heatmaps(shown, size, ctx)
    return out


Shown = list[tuple[np.ndarray, np.ndarray, list[int], list[int]]]  # (image, heatmap, window corner, true box)


def heatmap_grid(shown: Shown, e: int, scale: int = 4) -> Image.Image:
    """Rows of (image with the true box in green and the chosen window in red, rollout heatmap)."""
    tiles = []
    for img, heat, (cx, cy), (bx, by, bw, bh) in shown:
        a = np.repeat(np.repeat(img, scale, 0), scale, 1).copy()
        h = np.repeat(np.repeat((np.clip(heat, 0, 1) * 255).astype(np.uint8), scale, 0), scale, 1)
        hm = np.stack([h, np.zeros_like(h), 255 - h], axis=-1)
        for (x0, y0, w, hh), colour in (((bx, by, bw, bh), (0, 255, 0)), ((cx, cy, e, e), (255, 0, 0))):
            x0, y0, x1, y1 = x0 * scale, y0 * scale, (x0 + w) * scale - 1, (y0 + hh) * scale - 1
            a[y0, x0:x1 + 1] = a[y1, x0:x1 + 1] = colour
            a[y0:y1 + 1, x0] = a[y0:y1 + 1, x1] = colour
        tiles.append(np.concatenate([a, hm], axis=1))
    return Image.fromarray(np.concatenate(tiles, axis=0))


def _save_heatmaps(shown: Shown, e: int,
                   ctx: MethodContext[EvalSpec]) -> None:
    out_dir = Path(ctx.workdir or tempfile.mkdtemp(prefix="crucible-rollout-"))
    path = out_dir / "rollout_heatmaps.png"
    heatmap_grid(shown, e).save(path)
    ctx.save_artifact(path, name="rollout-heatmaps", artifact_kind="image",
                      meta={"images": len(shown), "block_size": e})


__all__ = ["attack_eval", "attack_metrics", "block_eval", "fit_probe", "heatmap_grid"]
