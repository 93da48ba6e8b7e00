"""Backbones: the factory over the registry in ``shared.specs.vision.BACKBONES``, and one interface for all.

Every backbone is an ``nn.Module`` subclass of :class:`Backbone`:

* ``model(x)`` -> pooled feature ``[B, model.out_dim]`` (what k-NN, probes, heads and teachers use);
* ``model.extract(x, attentions=False)`` -> :class:`BackboneFeatures` with the pooled feature plus the
  intermediate ``maps`` ``[B, C, h, w]`` (ResNet: one per stage; ViT: one per block, the patch tokens folded
  onto their grid, prefix tokens dropped), and for a ViT the per-block ``tokens`` ``[B, T, D]`` and, on
  request, the attention probabilities ``[B, heads, T, T]`` (rows sum to 1). Nothing is detached: Grad-CAM
  and attention-gradient rollout differentiate through them;
* ``model.cam_layer`` - the module whose output Grad-CAM reads (ResNet ``layer4``; ViT ``blocks[-1].norm1``,
  as PatchSearch) and ``model.to_map(activation, (H, W))``, which folds a ViT's ``[B, T, D]`` tokens into
  ``[B, D, H/p, W/p]`` (prefix tokens dropped; a CNN's map is returned as is); ``model.family``, ``model.name``.

ResNets are torchvision's ``ResNet`` class itself (``fc`` = Identity), so state-dict keys are exactly
torchvision's (``conv1.weight``, ``layer1.0.bn1.running_mean`` ...) and every checkpoint written before this
interface still loads. ViTs (``workers.vision.vit``, imported only when one is built) are timm's
``VisionTransformer`` with timm's keys. Pooling is adaptive (ResNet) or by the CLS token (ViT, whose position
embedding is resampled for sizes other than its native one), so a backbone accepts every size its registry
row allows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from shared.specs.vision import BACKBONES as REGISTRY
from shared.specs.vision import backbone_info

BACKBONES = tuple(REGISTRY)
# Wrapper prefixes other code bases put in front of backbone keys (DataParallel, torch.compile, MoCo/MSF).
KNOWN_PREFIXES = ("module.", "_orig_mod.", "encoder_q.", "encoder.", "backbone.")

# torchvision's builders (resnet18 ... wide_resnet50_2) call ResNet(block, layers, **kwargs) exactly so: the
# same construction order keeps a seeded random init identical to ``torchvision.models.<name>()``.
_RESNETS: dict[str, tuple[type[BasicBlock | Bottleneck], list[int], dict[str, int]]] = {
    "resnet10": (BasicBlock, [1, 1, 1, 1], {}),
    "resnet18": (BasicBlock, [2, 2, 2, 2], {}),
    "resnet34": (BasicBlock, [3, 4, 6, 3], {}),
    "resnet50": (Bottleneck, [3, 4, 6, 3], {}),
    "resnet101": (Bottleneck, [3, 4, 23, 3], {}),
    "resnet152": (Bottleneck, [3, 8, 36, 3], {}),
    "wide_resnet50_2": (Bottleneck, [3, 4, 6, 3], {"width_per_group": 128}),
}


@dataclass
class BackboneFeatures:
    """What ``Backbone.extract`` returns (see the module docstring for the shapes)."""

    pooled: Tensor
    maps: list[Tensor]
    tokens: list[Tensor] | None = None
    attentions: list[Tensor] | None = None


class Backbone(nn.Module):
    """The interface every registry backbone implements (mixed into torchvision's / timm's own class)."""

    name: str
    family: str
    out_dim: int

    def extract(self, x: Tensor, *, attentions: bool = False) -> BackboneFeatures:
        raise NotImplementedError

    @property
    def cam_layer(self) -> nn.Module:
        raise NotImplementedError

    def to_map(self, activation: Tensor, image_hw: tuple[int, int]) -> Tensor:
        """``cam_layer``'s output (or any block's) as a ``[B, C, h, w]`` map for an input of ``image_hw``."""
        return activation


class ResNetBackbone(ResNet, Backbone):
    """torchvision ``ResNet`` without the classifier; ``stem="cifar"``: 3x3/1 conv, no max-pool."""

    family = "resnet"
    # torchvision's submodules, declared for the type checker (nn.Module's __getattr__ would hide them)
    conv1: nn.Module
    bn1: nn.Module
    relu: nn.Module
    maxpool: nn.Module
    layer1: nn.Module
    layer2: nn.Module
    layer3: nn.Module
    layer4: nn.Module
    avgpool: nn.Module
    fc: nn.Module

    def __init__(self, name: str, *, stem: str = "cifar") -> None:
        block, layers, kwargs = _RESNETS[name]
        super().__init__(block, layers, **kwargs)
        self.name = name
        self.out_dim = 512 * block.expansion
        self.fc = nn.Identity()  # the feature extractor has no classifier
        if stem == "cifar":
            self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            # Same init torchvision (and the reference) use for every conv: normal(0, sqrt(2 / (k*k*out))).
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
            self.maxpool = nn.Identity()  # 32-px inputs keep their resolution

    def extract(self, x: Tensor, *, attentions: bool = False) -> BackboneFeatures:
        if attentions:
            raise ValueError(f"{self.name} is a CNN and has no attention; use the per-stage maps (Grad-CAM)")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        maps = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            maps.append(x)
        pooled = self.fc(torch.flatten(self.avgpool(x), 1))
        return BackboneFeatures(pooled=pooled, maps=maps)

    @property
    def cam_layer(self) -> nn.Module:
        return self.layer4


def create_backbone(name: str, *, stem: str = "cifar") -> Backbone:
    """A randomly initialised backbone from the registry; ``model(x)`` returns ``(B, model.out_dim)``.

    Args:
        name: a registry name (``resnet18`` ... ``wide_resnet50_2``, ``vit_micro_p4`` ... ``vit_base_p16``).
        stem: ResNets only. ``"imagenet"`` keeps torchvision's 7x7/2 conv + max-pool (4x downsampling, for
            >= 96 px); ``"cifar"`` uses a 3x3/1 conv and no max-pool, the usual choice for 32-px inputs.
            A ViT ignores ``"cifar"`` (the default) and rejects ``"imagenet"``.
    """
    info = backbone_info(name)
    if stem not in ("cifar", "imagenet"):
        raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
    if info.family == "resnet":
        return ResNetBackbone(name, stem=stem)
    if stem != "cifar":
        raise ValueError(f"{name} is a ViT: the stem applies to ResNets only")
    from workers.vision.vit import ViTBackbone  # deferred: timm is imported only when a ViT is built

    assert info.vit is not None
    return ViTBackbone(name, info.vit, embed_dim=info.feature_dim)


def backbone_state_dict(backbone: nn.Module) -> dict[str, Tensor]:
    """A detached CPU copy of the backbone's parameters and buffers (torchvision / timm key names)."""
    return {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}


def load_backbone(backbone: nn.Module, state: Mapping[str, Tensor], *, prefix: str | None = None) -> int:
    """Load ``state`` into ``backbone`` and verify that EVERY backbone tensor was copied.

    Guards against the reference linear-eval bug (ssl.md 2.6): keys carried a wrapper prefix
    (``encoder_q.``) the loader did not strip, so nothing loaded and the probe trained on a random
    network while only a "not copied" line was printed. Here a mismatch is an error.

    Args:
        backbone: the model to fill (from ``create_backbone``).
        state: a plain backbone state dict, or a larger one whose backbone keys share ``prefix``.
        prefix: keep only keys starting with it (and strip it); when None, the well-known wrapper
            prefixes (``module.``, ``_orig_mod.``, ``encoder_q.`` ...) are stripped if that is what it takes.

    Returns:
        The number of tensors loaded (== ``len(backbone.state_dict())``).

    Raises:
        ValueError: some backbone tensor is missing from ``state`` or has the wrong shape.
    """
    expected = backbone.state_dict()
    if prefix is not None:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    else:
        state = dict(state)
        changed = True
        while changed and not set(expected) <= set(state):
            changed = False
            for p in KNOWN_PREFIXES:
                if any(k.startswith(p) for k in state):
                    state = {k.removeprefix(p): v for k, v in state.items()}
                    changed = True
    missing = sorted(set(expected) - set(state))
    if missing:
        sample = ", ".join(missing[:5])
        raise ValueError(f"{len(missing)} of {len(expected)} backbone tensors are missing from the checkpoint "
                         f"(e.g. {sample}); pass prefix= to select the backbone's keys (state keys look like "
                         f"{next(iter(state), '<empty>')!r})")
    wrong = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        raise ValueError(f"{len(wrong)} backbone tensors have the wrong shape, e.g. {k}: checkpoint "
                         f"{tuple(state[k].shape)} vs model {tuple(expected[k].shape)}; wrong backbone or stem?")
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(state[k])
    return len(expected)
