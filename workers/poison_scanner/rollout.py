"""Attention-gradient rollout (``vit_grad_rollout.py`` of ``UCDvision/backdoor_transformer``; security-clip-experts.md
§3.2) and the window search of the test-time blocking defense (§3.3).

For each block ``l`` the ViT's explicit attention probabilities ``A_l`` (``[B, H, T, T]``, rows sum to 1; from
``Backbone.extract(x, attentions=True)``) and their gradients ``G_l = d y_c / d A_l``, ``y_c`` the logit of the
PREDICTED class:

1. fuse: ``Abar_l = mean_heads(A_l * G_l)``, negatives set to 0;
2. discard: the lowest ``discard_ratio`` (0.9) of the ``T*T`` entries of each image are set to 0 (the CLS entries
   are not exempt, like the reference);
3. ``Ahat_l = (Abar_l + I) / 2``, then a PROPER row normalisation (each row divided by its own sum; the reference
   divides by ``a.sum(dim=-1)`` broadcast over the wrong axis - fixed knowingly);
4. rollout ``R = Ahat_L ... Ahat_1``;
5. map = ``R[CLS, 1:]`` on the patch grid, divided by its maximum, bilinearly resized to the image.

``attention_rollout`` is the plain variant (no gradients: ``mean_heads(A_l)``). ``top_window`` sums the map over
every ``e x e`` window lying inside the image and returns the best top-left corner: the reference convolves with
an ``(e+1) x (e+1)`` kernel with padding and shifts the box inward at the borders, which picks a full-size box
inside the image as well.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _discard(a: Tensor, ratio: float) -> Tensor:
    """Zero the lowest ``ratio`` share of each image's ``T*T`` entries (``a`` is ``[B, T, T]``)."""
    if ratio <= 0:
        return a
    b, t, _ = a.shape
    flat = a.reshape(b, t * t)
    k = int(t * t * ratio)
    if k == 0:
        return a
    idx = flat.topk(k, dim=1, largest=False).indices
    return flat.scatter(1, idx, 0.0).reshape(b, t, t)


def rollout_from(layers: Sequence[Tensor], *, discard_ratio: float = 0.9) -> Tensor:
    """``R = Ahat_L ... Ahat_1`` from per-layer fused attentions ``[B, T, T]`` (steps 2-4)."""
    if not layers:
        raise ValueError("no attention layers to roll out")
    b, t, _ = layers[0].shape
    eye = torch.eye(t, device=layers[0].device, dtype=torch.float32).expand(b, t, t)
    result = eye.clone()
    for a in layers:
        a = _discard(a.float(), discard_ratio)
        a = (a + eye) / 2
        a = a / a.sum(dim=-1, keepdim=True)
        result = a @ result
    return result


def cls_map(rollout: Tensor, grid: tuple[int, int], image_hw: tuple[int, int], *, prefix_tokens: int = 1) -> Tensor:
    """Step 5: ``R[CLS, prefix:]`` on the ``grid``, max-normalised, bilinear to ``image_hw`` -> ``[B, H, W]``."""
    m = rollout[:, 0, prefix_tokens:].reshape(-1, 1, *grid)
    m = m / m.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return F.interpolate(m, size=image_hw, mode="bilinear", align_corners=False)[:, 0]


def grad_rollout_maps(backbone: nn.Module, head: nn.Module, x: Tensor, *, discard_ratio: float = 0.9,
                      target: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Attention-gradient rollout maps ``[B, H, W]`` (max 1) for ``head(backbone(x))``'s predicted class (or
    ``target``), and the logits. Samples are independent (LayerNorm, no BatchNorm), so one backward of the summed
    class logits gives every image its own gradients."""
    x = x.detach().requires_grad_(True)  # frozen weights: the input carries the graph to the attentions
    with torch.enable_grad():
        feats = backbone.extract(x, attentions=True)  # type: ignore[operator]
        attns: list[Tensor] = feats.attentions
        logits = head(feats.pooled)
        cls = logits.argmax(dim=1) if target is None else target
        score = logits.gather(1, cls.view(-1, 1)).sum()
        grads = torch.autograd.grad(score, attns)
    fused = [(a.detach() * g).mean(dim=1).clamp_min(0) for a, g in zip(attns, grads, strict=True)]
    rollout = rollout_from(fused, discard_ratio=discard_ratio)
    return _to_maps(backbone, rollout, x), logits.detach()


def attention_rollout_maps(backbone: nn.Module, x: Tensor, *, discard_ratio: float = 0.0) -> Tensor:
    """Plain attention rollout (Abnar & Zuidema 2020): head-mean attentions, no gradients."""
    with torch.no_grad():
        feats = backbone.extract(x, attentions=True)  # type: ignore[operator]
        rollout = rollout_from([a.mean(dim=1) for a in feats.attentions], discard_ratio=discard_ratio)
    return _to_maps(backbone, rollout, x)


def _to_maps(backbone: nn.Module, rollout: Tensor, x: Tensor) -> Tensor:
    p = int(backbone.patch_size)  # type: ignore[arg-type]  # a ViTBackbone
    grid = (x.shape[-2] // p, x.shape[-1] // p)
    return cls_map(rollout, grid, (x.shape[-2], x.shape[-1]),
                   prefix_tokens=int(getattr(backbone, "num_prefix_tokens", 1)))


def top_window(maps: Tensor, e: int) -> Tensor:
    """Top-left ``(x, y)`` ``[B, 2]`` of the ``e x e`` window inside the image with the largest map sum."""
    b, h, w = maps.shape
    if e > min(h, w):
        raise ValueError(f"a {e}-px window does not fit {h}x{w} maps")
    sums = F.avg_pool2d(maps.unsqueeze(1).float(), kernel_size=e, stride=1)[:, 0]  # [B, h-e+1, w-e+1]
    flat = sums.flatten(1).argmax(dim=1)
    cols = sums.shape[-1]
    return torch.stack([flat % cols, flat // cols], dim=1)


def random_windows(n: int, h: int, w: int, e: int, generator: torch.Generator) -> Tensor:
    """Uniform top-left ``(x, y)`` ``[n, 2]`` of ``e x e`` windows inside the image (the random-block control)."""
    xs = torch.randint(0, w - e + 1, (n,), generator=generator)
    ys = torch.randint(0, h - e + 1, (n,), generator=generator)
    return torch.stack([xs, ys], dim=1)


def block(x: Tensor, corners: Tensor, e: int, *, fill: str, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Fill the ``e x e`` window at each ``corners[i] = (x, y)`` of normalised images ``x`` ``[B, 3, H, W]``.

    ``black``: 0 in [0, 1] pixel space (the reference), i.e. ``-mean/std`` after normalisation; ``mean``: the
    image's own per-channel mean (an occlusion that adds no new dark artifact)."""
    out = x.clone()
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    for i, (cx, cy) in enumerate(corners.tolist()):
        value = (-m / s) if fill == "black" else x[i].mean(dim=(1, 2), keepdim=True)
        out[i, :, cy:cy + e, cx:cx + e] = value.expand(3, e, e)
    return out


def boxes_overlap(corners: Tensor, e: int, boxes: Tensor) -> Tensor:
    """IoU > 0 between each ``e x e`` window at ``corners`` (x, y) and the true box ``[x, y, w, h]`` -> bool ``[B]``."""
    x0, y0 = corners[:, 0], corners[:, 1]
    bx, by, bw, bh = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    return (x0 < bx + bw) & (bx < x0 + e) & (y0 < by + bh) & (by < y0 + e)
