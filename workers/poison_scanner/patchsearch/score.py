"""Stage (b), §2.2: the candidate trigger of an image (its best Grad-CAM window) and its poison score.

All pasting happens on pixel images (floats in [0, 1], before normalisation); normalisation is a per-pixel
affine map, so this equals pasting normalised windows into normalised images (the reference) while keeping
ONE space for the windows the search scores, the windows the poison classifier pastes and the ones saved as
images (the reference cut normalised tensors but pasted PIL patches: two spaces).

Poison score of candidate ``i`` (window ``p_i``, cluster ``a_i``), on the test set ``T``:

    score_i = #{t in T : assign(paste(x_t, p_i, random position)) = a_i} - #{t in T : a_t = a_i}

each test image with its own uniformly random top-left in ``[0, S - w]``. A real trigger drags unrelated
images into the poisoned cluster ("flips"); an ordinary object window rarely does. Scores can be negative.
With several windows per image (``patches_per_image``) the score is the maximum; each next window is taken
after blanking the previous one (mean fill) and recomputing Grad-CAM - the reference's ``block_max_window``
result was discarded, so it extracted the same window again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from workers.poison_scanner.patchsearch.clusters import Clusters
from workers.poison_scanner.patchsearch.inputs import Model
from workers.vision.gradcam import ScoreFn, best_window, grad_cam


def as_pixels(images: Tensor) -> Tensor:
    """uint8 ``[N, 3, H, W]`` -> floats in [0, 1] (converted per batch: a dataset stays uint8 in memory)."""
    return images.float().div_(255.0)


def paste(images: Tensor, patches: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Return ``images`` ``[N, 3, H, W]`` with ``patches[n]`` ``[N, 3, w, w]`` pasted at ``(rows[n], cols[n])``."""
    n, _, w, _ = patches.shape
    out = images.clone()
    ar = torch.arange(w, device=images.device)
    rr = (rows.to(images.device).long()[:, None] + ar)[:, :, None]  # [N, w, 1]
    cc = (cols.to(images.device).long()[:, None] + ar)[:, None, :]  # [N, 1, w]
    idx = torch.arange(n, device=images.device)[:, None, None]
    out[idx, :, rr, cc] = patches.permute(0, 2, 3, 1).to(out.dtype)  # advanced dims first: [N, w, w, 3]
    return out


def cut(images: Tensor, rows: Tensor, cols: Tensor, w: int) -> Tensor:
    """The ``w x w`` windows ``[N, 3, w, w]`` at ``(rows[n], cols[n])``."""
    ar = torch.arange(w, device=images.device)
    rr = (rows.to(images.device).long()[:, None] + ar)[:, :, None]
    cc = (cols.to(images.device).long()[:, None] + ar)[:, None, :]
    idx = torch.arange(images.shape[0], device=images.device)[:, None, None]
    return images[idx, :, rr, cc].permute(0, 3, 1, 2).contiguous()


def own_cluster_score(clusters: Clusters) -> ScoreFn:
    """Grad-CAM target: each image's own top cluster ``argmax_j s_j`` (pytorch-grad-cam's ``targets=None``)."""
    def score(feats: Tensor) -> Tensor:
        logits = clusters.head(feats)
        return logits.gather(1, logits.argmax(dim=1, keepdim=True))[:, 0]
    return score


def candidate_windows(model: Model, clusters: Clusters, pixels: Tensor, window: int,
                      patches_per_image: int = 1) -> tuple[Tensor, Tensor]:
    """Windows ``[B, P, 3, w, w]`` (pixel space) and their top-left corners ``[B, P, 2]`` of images ``pixels``."""
    x = pixels.to(model.device).clone()
    fill = model.mean.view(1, 3, 1, 1)  # blanking with the mean pixel = 0 after normalisation
    score = own_cluster_score(clusters)
    windows, boxes = [], []
    for _ in range(patches_per_image):
        cam = grad_cam(model.backbone, model.normalise(x), score)
        rows, cols = best_window(cam, window)
        windows.append(cut(pixels.to(model.device), rows, cols, window).cpu())
        boxes.append(torch.stack([rows, cols], dim=1).cpu())
        blank = fill.expand(len(x), 3, window, window)
        x = paste(x, blank, rows, cols)
    return torch.stack(windows, dim=1), torch.stack(boxes, dim=1)


@torch.no_grad()
def flip_scores(model: Model, clusters: Clusters, test_pixels: Tensor, test_assign: Tensor, patches: Tensor,
                targets: Tensor, generator: torch.Generator, *, batch_size: int = 256) -> np.ndarray:
    """Poison scores (int) of candidate windows ``patches`` ``[B, 3, w, w]`` whose images sit in ``targets``.

    The ``B x |T|`` pasted images are built and embedded ``batch_size`` at a time (never all in memory).
    """
    b, t = len(patches), len(test_pixels)
    side, w = test_pixels.shape[-1], patches.shape[-1]
    rows = torch.randint(0, side - w + 1, (b, t), generator=generator)
    cols = torch.randint(0, side - w + 1, (b, t), generator=generator)
    before = torch.stack([(test_assign == a).sum() for a in targets]) if b else torch.zeros(0, dtype=torch.long)
    after = torch.zeros(b, dtype=torch.long)
    pair_c = torch.arange(b).repeat_interleave(t)
    pair_t = torch.arange(t).repeat(b)
    for s in range(0, b * t, batch_size):
        pc, pt = pair_c[s:s + batch_size], pair_t[s:s + batch_size]
        pasted = paste(test_pixels[pt], patches[pc], rows[pc, pt], cols[pc, pt])
        assigned = clusters.assign(model.embed(pasted, batch_size)).cpu()
        hit = (assigned == targets[pc]).long()
        after.index_add_(0, pc, hit)
    return (after - before).numpy().astype(np.int64)


@dataclass
class Scored:
    scores: np.ndarray  # [B] int: max over the image's windows
    windows: Tensor  # [B, 3, w, w]: the best-scoring window of each image
    boxes: Tensor  # [B, 2] its top-left


class Scorer:
    """Scores training images by index: Grad-CAM windows, then the flip count on the test set."""

    def __init__(self, model: Model, clusters: Clusters, images: Tensor, *, window: int, patches_per_image: int,
                 seed: int, batch_size: int = 256) -> None:
        self.model, self.clusters, self.images = model, clusters, images  # uint8 [N, 3, S, S]
        self.window, self.patches_per_image, self.batch_size = window, patches_per_image, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        test = torch.from_numpy(clusters.test_set)
        self.test_pixels = as_pixels(images[test])
        self.test_assign = torch.from_numpy(clusters.assignments[clusters.test_set])

    def __call__(self, indices: np.ndarray) -> Scored:
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        wins, boxes = [], []
        for s in range(0, len(idx), self.batch_size):
            wv, bx = candidate_windows(self.model, self.clusters, as_pixels(self.images[idx[s:s + self.batch_size]]),
                                       self.window, self.patches_per_image)
            wins.append(wv)
            boxes.append(bx)
        windows = torch.cat(wins) if wins else torch.empty(0, self.patches_per_image, 3, self.window, self.window)
        corners = torch.cat(boxes) if boxes else torch.empty(0, self.patches_per_image, 2, dtype=torch.long)
        targets = torch.from_numpy(self.clusters.assignments[idx.numpy()]).repeat_interleave(self.patches_per_image)
        flat = flip_scores(self.model, self.clusters, self.test_pixels, self.test_assign,
                           windows.flatten(0, 1), targets, self.generator, batch_size=self.batch_size)
        per = flat.reshape(len(idx), self.patches_per_image)
        best = per.argmax(axis=1)
        pick = torch.from_numpy(best)
        ar = torch.arange(len(idx))
        return Scored(per.max(axis=1) if len(idx) else np.zeros(0, np.int64), windows[ar, pick], corners[ar, pick])
