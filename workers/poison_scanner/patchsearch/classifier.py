"""Stage (d), §2.4: the poison classifier - an ensemble trained on the top-k windows, run over every image.

* bank: the best window of each of the ``topk_poisons`` highest-scored images (pixel space);
* training pool: every image except the top ``exclude_top_fraction`` by score (likely poisons must not be
  negatives) and the bottom ``validation_images`` (kept as validation negatives);
* a sample: RandomResizedCrop(S, scale 0.2-1); with probability 0.5 label 1 and a random bank window resized
  to s x s, s ~ U{paste_min..paste_max}, pasted at a top-left uniform in [margin, S - s - margin); else label
  0; then ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, grayscale p 0.2, flip, normalise (the project's batched ops).
  Every draw comes from one torch generator seeded per model - the reference re-seeded numpy in every loader
  worker each epoch, so its paste choices repeated every epoch;
* model: ResNet [1,1,1,1] (``resnet10``) + fc 512 -> 2 from scratch, SGD, cosine over ``max_iterations``;
* validation every ``eval_every`` iterations: the top-N scored images (positives) and the bottom N (negatives),
  unpasted; F1 of class 1. Early stop once int(100 F1) was identical for the last ``patience`` checks (and more
  than ``patience`` checks ran);
* ensemble: ``models`` classifiers with different seeds, logits averaged; removal = predicted class 1. The
  ensemble's own validation F1 (``ensemble_val_f1``) feeds the job's "no poison found" rule
  (``PatchSearchSpec.min_classifier_f1``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.specs.patchsearch import PoisonClassifierOptions, scaled
from workers.poison_scanner.patchsearch.score import as_pixels, paste
from workers.vision.augment import MOCO_JITTER, color_jitter, crop_boxes, random_grayscale, resized_crop_flip
from workers.vision.backbones import create_backbone


@dataclass
class ClassifierReport:
    iterations: list[int] = field(default_factory=list)  # per model, iterations run
    val_f1: list[float] = field(default_factory=list)  # per model, last validation F1
    ensemble_val_f1: float = float("nan")  # the averaged-logit ensemble's F1 on the same validation set


def f1_of(pred: Tensor, truth: Tensor) -> float:
    tp = float(((pred == 1) & (truth == 1)).sum())
    fp = float(((pred == 1) & (truth == 0)).sum())
    fn = float(((pred == 0) & (truth == 1)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def early_stop(history: list[int], patience: int) -> bool:
    """int(100 F1) identical over the last ``patience`` checks, after more than ``patience`` checks."""
    return len(history) > patience and len(set(history[-patience:])) == 1


class PoisonClassifier(nn.Module):
    def __init__(self, side: int, backbone: str = "resnet10") -> None:
        super().__init__()
        self.features = create_backbone(backbone, stem="imagenet" if side >= 96 else "cifar")
        self.fc = nn.Linear(self.features.out_dim, 2)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.fc(self.features(x))
        return out


class SampleMaker:
    """Builds labelled training batches (see the module docstring) from uint8-derived pixel images."""

    def __init__(self, bank: Tensor, side: int, opts: PoisonClassifierOptions, mean: Tensor, std: Tensor) -> None:
        self.bank, self.side, self.opts = bank, side, opts
        hi_cap = max(1, side - 2 * (opts.margin if opts.margin is not None else scaled(10, side, minimum=0)) - 1)
        self.margin = opts.margin if opts.margin is not None else scaled(10, side, minimum=0)
        self.hi = min(opts.paste_max if opts.paste_max is not None else scaled(79, side), hi_cap)
        self.lo = min(opts.paste_min if opts.paste_min is not None else scaled(20, side), self.hi)
        self.mean, self.std = mean.cpu(), std.cpu()

    def __call__(self, pixels: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        n, s = len(pixels), self.side
        boxes = crop_boxes(n, s, s, self.opts.crop_scale, (3 / 4, 4 / 3), gen)
        x = resized_crop_flip(pixels, boxes, torch.zeros(n, dtype=torch.bool), s)
        label = (torch.rand(n, generator=gen) < 0.5).long()
        which = torch.randint(0, len(self.bank), (n,), generator=gen)
        size = torch.randint(self.lo, self.hi + 1, (n,), generator=gen)
        for i in torch.nonzero(label).flatten().tolist():
            k = int(size[i])
            span = max(1, s - k - 2 * self.margin)
            r = self.margin + int(torch.randint(0, span, (1,), generator=gen))
            c = self.margin + int(torch.randint(0, span, (1,), generator=gen))
            patch = F.interpolate(self.bank[which[i]][None], size=(k, k), mode="bilinear", align_corners=False)
            x[i:i + 1] = paste(x[i:i + 1], patch.clamp(0, 1), torch.tensor([r]), torch.tensor([c]))
        x = color_jitter(x, MOCO_JITTER, 0.8, gen)
        x = random_grayscale(x, 0.2, gen)
        flip = (torch.rand(n, generator=gen) < 0.5).view(-1, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)
        return (x - self.mean) / self.std, label


def train_one(bank: Tensor, images: Tensor, pool: np.ndarray, val_x: Tensor, val_y: Tensor,
              opts: PoisonClassifierOptions, *, mean: Tensor, std: Tensor, seed: int, device: torch.device,
              on_step: Callable[[int], None] | None = None) -> tuple[PoisonClassifier, int, float]:
    """One classifier; returns it (eval mode), the iterations it ran and its last validation F1."""
    side = images.shape[-1]
    pool_t = torch.from_numpy(pool)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the init
    model = PoisonClassifier(side, opts.backbone).to(device)
    optim = torch.optim.SGD(model.parameters(), lr=opts.lr, momentum=opts.momentum, weight_decay=opts.weight_decay)
    make = SampleMaker(bank, side, opts, mean, std)
    history: list[int] = []
    f1, it = 0.0, 0
    vx = ((val_x - mean.cpu()) / std.cpu()).to(device)
    for it in range(1, opts.max_iterations + 1):
        for g in optim.param_groups:
            g["lr"] = opts.lr * 0.5 * (1 + math.cos(math.pi * (it - 1) / opts.max_iterations))
        model.train()
        pick = pool_t[torch.randint(0, len(pool_t), (min(opts.batch_size, len(pool_t)),), generator=gen)]
        x, y = make(as_pixels(images[pick]), gen)
        loss = F.cross_entropy(model(x.to(device)), y.to(device))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        if on_step is not None:
            on_step(it)
        if it % opts.eval_every == 0:
            model.eval()
            with torch.no_grad():
                f1 = f1_of(model(vx).argmax(1).cpu(), val_y)
            history.append(int(100 * f1))
            if early_stop(history, opts.patience):
                break
    model.eval()
    return model, it, f1


@torch.no_grad()
def ensemble_predict(models: list[PoisonClassifier], images: Tensor, *, mean: Tensor, std: Tensor,
                     device: torch.device, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Averaged logits over every image -> (is_poison bool [n], P(poison) [n])."""
    preds, probs = [], []
    for s in range(0, len(images), batch_size):
        x = ((as_pixels(images[s:s + batch_size]) - mean.cpu()) / std.cpu()).to(device)
        logits = torch.stack([m(x) for m in models]).mean(0).cpu()
        preds.append(logits.argmax(1) == 1)
        probs.append(logits.softmax(1)[:, 1])
    return torch.cat(preds).numpy(), torch.cat(probs).numpy()


def poison_classifier(images: Tensor, order: np.ndarray, windows: dict[int, Tensor], opts: PoisonClassifierOptions,
                      *, mean: Tensor, std: Tensor, seed: int, device: torch.device,
                      on_step: Callable[[int, int], None] | None = None,
                      ) -> tuple[np.ndarray, np.ndarray, ClassifierReport]:
    """Train the ensemble from the search's ranking ``order`` (best first) and classify every image
    (``images``: uint8 ``[N, 3, S, S]``).

    Returns (removed mask, P(poison), report)."""
    n = len(order)
    top = [int(i) for i in order if int(i) in windows][:opts.topk_poisons]
    if not top:
        raise ValueError("no scored image: the search produced no window to build the patch bank from")
    bank = torch.stack([windows[i] for i in top])
    v = opts.validation_images
    excluded = set(order[:max(math.ceil(opts.exclude_top_fraction * n), v)].tolist()) | set(order[n - v:].tolist())
    pool_idx = np.asarray([i for i in range(n) if i not in excluded], dtype=np.int64)
    if len(pool_idx) == 0:
        raise ValueError("no training images left for the classifier's negatives; lower exclude_top_fraction")
    val_idx = np.concatenate([order[:v], order[n - v:]])
    val_y = torch.cat([torch.ones(v, dtype=torch.long), torch.zeros(v, dtype=torch.long)])
    report = ClassifierReport()
    models = []
    total = opts.models * opts.max_iterations
    for m in range(opts.models):
        def step(it: int, m: int = m) -> None:
            if on_step is not None:
                on_step(m * opts.max_iterations + it, total)
        model, iters, f1 = train_one(bank, images, pool_idx, as_pixels(images[val_idx]), val_y, opts, mean=mean,
                                     std=std, seed=seed * 1009 + m, device=device, on_step=step)
        models.append(model)
        report.iterations.append(iters)
        report.val_f1.append(f1)
    removed, prob = ensemble_predict(models, images, mean=mean, std=std, device=device)
    report.ensemble_val_f1 = f1_of(torch.from_numpy(removed[val_idx]).long(), val_y)
    return removed, prob, report
