"""i-CutMix (PatchSearch, CVPR 2023, §3.3; security-clip-experts.md §2.5): CutMix of the ONLINE (query) views only.

1. ``lam ~ Beta(alpha, alpha)`` (alpha = 1: uniform), folded ``lam <- max(lam, 1 - lam)`` so the query image
   keeps at least half of its area;
2. a box with side fraction ``sqrt(1 - lam)`` at a uniformly random centre, clipped to the image;
3. ``lam`` is recomputed from the clipped box: ``lam = 1 - box area / image area``;
4. the box of image ``i`` is filled with the same box of image ``perm[i]`` (a random permutation of the batch).

The target (key) views stay unmixed; the loss of a mixed query is ``lam * CE(logits, i) + (1 - lam) * CE(logits,
perm[i])`` (``workers.ssl_trainer.moco.mixed_info_nce``). One box and one ``lam`` per batch, as in CutMix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class CutMixBox:
    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def area(self) -> int:
        return (self.y1 - self.y0) * (self.x1 - self.x0)


def sample_lambda(generator: torch.Generator, alpha: float = 1.0) -> float:
    """``lam ~ Beta(alpha, alpha)`` folded to ``max(lam, 1 - lam)`` (in [0.5, 1])."""
    if alpha == 1.0:  # Beta(1, 1) is uniform: one draw from the torch generator
        lam = float(torch.rand((), generator=generator))
    else:
        seed = int(torch.randint(0, 2**31 - 1, (), generator=generator))
        lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    return max(lam, 1.0 - lam)


def cutmix_box(height: int, width: int, lam: float, generator: torch.Generator) -> CutMixBox:
    """The CutMix box for ``lam``: sides ``int(H * sqrt(1 - lam))`` x ``int(W * sqrt(1 - lam))`` around a uniform
    centre, clipped to the image (so the box may be smaller than asked near a border)."""
    cut = float(np.sqrt(1.0 - lam))
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy = int(torch.randint(0, height, (), generator=generator))
    cx = int(torch.randint(0, width, (), generator=generator))
    return CutMixBox(y0=min(max(cy - cut_h // 2, 0), height), y1=min(max(cy + cut_h // 2, 0), height),
                     x0=min(max(cx - cut_w // 2, 0), width), x1=min(max(cx + cut_w // 2, 0), width))


def icutmix(x: Tensor, generator: torch.Generator, *, alpha: float = 1.0) -> tuple[Tensor, Tensor, float]:
    """Mix a batch of online views ``[B, C, H, W]``: ``(mixed, perm, lam)`` with ``lam`` recomputed from the box.

    ``mixed[i]`` is ``x[i]`` with the box replaced by ``x[perm[i]]``'s box; ``lam`` is the share of ``x[i]`` left.
    """
    b, _, h, w = x.shape
    lam = sample_lambda(generator, alpha)
    box = cutmix_box(h, w, lam, generator)
    perm = torch.randperm(b, generator=generator).to(x.device)
    mixed = x.clone()
    mixed[:, :, box.y0:box.y1, box.x0:box.x1] = x[perm][:, :, box.y0:box.y1, box.x0:box.x1]
    return mixed, perm, 1.0 - box.area / float(h * w)
