"""The symmetric InfoNCE loss of CLIP (Radford et al. 2021, Fig. 3), through open_clip's ``ClipLoss``.

``L = (CE(s * I T^T, diag) + CE(s * T I^T, diag)) / 2`` with L2-normalised features I, T and s = exp(logit scale).
Under DDP open_clip gathers every rank's features (``gather_with_grad=True``, ``local_loss=True``: each rank's
rows against all columns - the gradient of the global loss without a second all-reduce of the logits).

``feature_cache_loss`` is the accumulation trick of open_clip's ``accum_freq`` (and GradCache): features of all
micro-batches are computed without gradient, the loss over all of them is differentiated with respect to the
features only, and each micro-batch is then re-encoded with gradient and contributes ``<f(x_m), dL/df_m>`` -
a surrogate whose parameter gradient equals that of the full-batch loss. The re-encoding runs under activation
checkpointing so only one micro-batch's activations are alive at a time (the shared loop calls backward once).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from open_clip.loss import ClipLoss  # type: ignore[import-untyped]  # no py.typed marker
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor, *, rank: int = 0,
              world_size: int = 1) -> Tensor:
    """Mean of the image->text and text->image cross-entropies; ``logit_scale`` is exp(s), not s."""
    fn = ClipLoss(local_loss=world_size > 1, gather_with_grad=world_size > 1, rank=rank, world_size=world_size)
    loss: Tensor = fn(image_features, text_features, logit_scale)
    return loss


def feature_cache_loss(encode: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], images: list[Tensor],
                       ids: list[Tensor], logit_scale_param: Tensor, *, rank: int = 0,
                       world_size: int = 1) -> tuple[Tensor, Tensor]:
    """(surrogate to backpropagate, the true loss value) for micro-batches ``images[m], ids[m]``."""
    with torch.no_grad():
        cached = [encode(x, t) for x, t in zip(images, ids, strict=True)]
    img = torch.cat([c[0] for c in cached]).requires_grad_(True)
    txt = torch.cat([c[1] for c in cached]).requires_grad_(True)
    scale = logit_scale_param.exp()
    loss = clip_loss(img, txt, scale, rank=rank, world_size=world_size)
    g_img, g_txt, g_scale = torch.autograd.grad(loss, [img, txt, logit_scale_param])
    surrogate = (logit_scale_param * g_scale.detach()).sum()
    offset = 0
    for x, t in zip(images, ids, strict=True):
        n = x.shape[0]
        gi, gt = g_img[offset:offset + n].detach(), g_txt[offset:offset + n].detach()

        def part(x_: Tensor, t_: Tensor, gi_: Tensor = gi, gt_: Tensor = gt) -> Tensor:
            fi, ft = encode(x_, t_)
            return (fi * gi_).sum() + (ft * gt_).sum()

        surrogate = surrogate + checkpoint(part, x, t, use_reentrant=False)
        offset += n
    # same gradient, but the value is the true loss (what the loop logs)
    return surrogate - surrogate.detach() + loss.detach(), loss.detach()
