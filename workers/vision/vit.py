"""ViT backbones: timm's ``VisionTransformer`` behind the :class:`~workers.vision.backbones.Backbone` interface.

timm >= 0.6 computes attention with ``F.scaled_dot_product_attention`` (fused), which never materialises
the probabilities, so hooks on ``attn_drop`` see nothing. Training keeps the fused path (faster, less memory);
``extract(x, attentions=True)`` switches every block to timm's explicit path (``softmax(q k^T / sqrt(d))``,
then ``attn_drop``) for that one call and reads the probabilities at ``attn_drop``'s input. The tensors stay
in the autograd graph, so ``torch.autograd.grad(score, attentions)`` gives the gradients that
attention-gradient rollout fuses with them.

Built with ``num_classes=0`` (the head is Identity: ``model(x)`` is the pooled CLS feature after the final
LayerNorm, i.e. ``forward_head(forward_features(x), pre_logits=True)``) and ``dynamic_img_size=True``: the
position embedding is learnt on the registry's native grid and resampled for other sizes, so every input
size the registry allows works and a checkpoint's tensors do not depend on the size it was trained at.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from shared.specs.vision import ViTArch
from workers.vision.backbones import Backbone, BackboneFeatures


class ViTBackbone(VisionTransformer, Backbone):
    """A timm ViT (CLS-token pooling, no classifier) with intermediate tokens and attention probabilities."""

    family = "vit"

    def __init__(self, name: str, arch: ViTArch, *, embed_dim: int) -> None:
        super().__init__(img_size=arch.native_size, patch_size=arch.patch_size, embed_dim=embed_dim,
                         depth=arch.depth, num_heads=arch.heads, mlp_ratio=arch.mlp_ratio, num_classes=0,
                         global_pool="token", dynamic_img_size=True)
        self.name = name
        self.patch_size = arch.patch_size
        self.out_dim = embed_dim

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        self._check_size(x)
        return super().forward(x, *args, **kwargs)

    def _check_size(self, x: Tensor) -> None:
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"{self.name} needs image sides that are multiples of its patch size "
                             f"{self.patch_size}, got {h}x{w} (set image_size to a multiple of {self.patch_size})")

    @contextmanager
    def _explicit_attention(self, sink: list[Tensor]) -> Iterator[None]:
        attns: list[Any] = [blk.attn for blk in self.blocks]  # timm's Attention modules (untyped)
        fused = [a.fused_attn for a in attns]
        handles = []
        for a in attns:
            a.fused_attn = False
            handles.append(a.attn_drop.register_forward_hook(lambda _m, inputs, _out: sink.append(inputs[0])))
        try:
            yield
        finally:
            for a, was, h in zip(attns, fused, handles, strict=True):
                a.fused_attn = was
                h.remove()

    def extract(self, x: Tensor, *, attentions: bool = False) -> BackboneFeatures:
        self._check_size(x)
        tokens: list[Tensor] = []
        probs: list[Tensor] = []
        handles = [blk.register_forward_hook(lambda _m, _in, out: tokens.append(out)) for blk in self.blocks]
        try:
            if attentions:
                with self._explicit_attention(probs):
                    pooled = self.forward_head(self.forward_features(x), pre_logits=True)
            else:
                pooled = self.forward_head(self.forward_features(x), pre_logits=True)
        finally:
            for h in handles:
                h.remove()
        hw = (x.shape[-2], x.shape[-1])
        maps = [self.to_map(t, hw) for t in tokens]
        return BackboneFeatures(pooled=pooled, maps=maps, tokens=tokens, attentions=probs if attentions else None)

    def to_map(self, activation: Tensor, image_hw: tuple[int, int]) -> Tensor:
        gh, gw = image_hw[0] // self.patch_size, image_hw[1] // self.patch_size
        patches = activation[:, self.num_prefix_tokens:]
        if patches.shape[1] != gh * gw:
            raise ValueError(f"{patches.shape[1]} patch tokens do not fill a {gh}x{gw} grid for {image_hw} px")
        return patches.transpose(1, 2).reshape(activation.shape[0], activation.shape[-1], gh, gw)

    @property
    def cam_layer(self) -> nn.Module:
        last: Any = self.blocks[-1]
        return last.norm1  # PatchSearch's ViT target layer
