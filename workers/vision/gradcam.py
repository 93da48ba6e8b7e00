"""Grad-CAM (Selvaraju et al., ICCV 2017, Eq. 1-2) for any registry backbone, on its ``cam_layer``.

For a scalar score y per image (a class logit, PatchSearch's cluster-assignment score ...) and the
activations A (C channels on an h x w grid) of the target layer:

    alpha_c = mean_{i,j} dy/dA_c[i, j]          (Eq. 1: global-average-pooled gradients)
    L = ReLU(sum_c alpha_c A_c)                  (Eq. 2)

then upsampled (bilinear) to the input size and min-max normalised per image to [0, 1], as the
``pytorch-grad-cam`` library (which PatchSearch uses) does. Target layers are ``Backbone.cam_layer``:
ResNet ``layer4``; ViT ``blocks[-1].norm1``, whose ``[B, T, D]`` tokens are folded onto their grid by
``Backbone.to_map`` with the prefix (CLS) token dropped - PatchSearch's ``reshape_transform``.

Works on frozen networks (no parameter needs grad): the input is made to require grad so the target
layer's output is in the autograd graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from workers.vision.backbones import Backbone

ScoreFn = Callable[[Tensor], Tensor]  # pooled features [B, D] -> one score per image [B]


def grad_cam(backbone: Backbone, x: Tensor, score: ScoreFn, *, normalise: bool = True) -> Tensor:
    """``[B, H, W]`` Grad-CAM maps of ``score(backbone(x))`` at ``backbone.cam_layer``.

    Args:
        backbone: any registry backbone (``cam_layer`` and ``to_map`` give the layer and its grid).
        x: a normalised input batch ``[B, 3, H, W]``.
        score: maps the pooled features to one scalar per image; each image's map is the gradient of its
            own score only (scores of different images do not mix, the sum's gradient separates them).
        normalise: min-max scale each map to [0, 1] (a constant map becomes all zeros).
    """
    captured: list[Tensor] = []
    handle = backbone.cam_layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.enable_grad():
            inp = x.detach().clone().requires_grad_(True)
            pooled = backbone(inp)
            y = score(pooled)
            if y.shape != (x.shape[0],):
                raise ValueError(f"score must return one value per image, shape ({x.shape[0]},), got "
                                 f"{tuple(y.shape)}")
            activation = captured[-1]
            (grad,) = torch.autograd.grad(y.sum(), activation)
    finally:
        handle.remove()
    hw = (x.shape[-2], x.shape[-1])
    a = backbone.to_map(activation.detach(), hw)
    g = backbone.to_map(grad, hw)
    weights = g.mean(dim=(2, 3), keepdim=True)  # Eq. 1
    cam = F.relu((weights * a).sum(dim=1, keepdim=True))  # Eq. 2
    cam = F.interpolate(cam, size=hw, mode="bilinear", align_corners=False)[:, 0]
    if normalise:
        flat = cam.flatten(1)
        lo = flat.min(dim=1).values.view(-1, 1, 1)
        span = (flat.max(dim=1).values.view(-1, 1, 1) - lo)
        cam = torch.where(span > 1e-12, (cam - lo) / span.clamp_min(1e-12), torch.zeros_like(cam))
    return cam.float()


def best_window(cam: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """Top-left ``(rows, cols)`` of each map's ``window x window`` box with the largest sum of ``cam``.

    PatchSearch §2.2: a convolution with an all-ones kernel, no padding, then the argmax (first in
    row-major order on ties).
    """
    b, h, w = cam.shape
    if not 1 <= window <= min(h, w):
        raise ValueError(f"window {window} does not fit {h}x{w} maps")
    sums = F.avg_pool2d(cam[:, None].double(), window, stride=1)[:, 0]  # mean = sum / w^2, same argmax
    flat = sums.flatten(1).argmax(dim=1)
    cols_n = w - window + 1
    return flat // cols_n, flat % cols_n
