"""Backbones: torchvision ResNets without the classifier, with a CIFAR or ImageNet stem.

``create_backbone(name)`` returns a plain torchvision ``ResNet`` whose ``fc`` is ``Identity`` - so its
``state_dict`` keys are exactly torchvision's (``conv1.weight``, ``layer1.0.bn1.running_mean`` ...) and a
checkpoint's ``backbone`` entry loads into any torchvision ResNet of the same depth (minus ``fc``) - plus
an ``out_dim`` attribute (the pooled feature width D). Pooling is torchvision's adaptive average pool,
so any input size works (the reference's fixed ``AvgPool2d(7)`` only worked at 224 px).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torchvision
from torch import Tensor, nn

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2")
# Wrapper prefixes other code bases put in front of backbone keys (DataParallel, torch.compile, MoCo/MSF).
KNOWN_PREFIXES = ("module.", "_orig_mod.", "encoder_q.", "encoder.", "backbone.")


def create_backbone(name: str, *, stem: str = "cifar") -> nn.Module:
    """A randomly initialised ResNet feature extractor; ``model(x)`` returns ``(B, model.out_dim)``.

    Args:
        name: a torchvision ResNet builder name (``resnet18`` ... ``wide_resnet50_2``).
        stem: ``"imagenet"`` keeps torchvision's 7x7/2 conv + max-pool (4x downsampling, for >= 96 px);
            ``"cifar"`` uses a 3x3/1 conv and no max-pool, the usual choice for 32-px inputs.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}")
    if stem not in ("cifar", "imagenet"):
        raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
    model = getattr(torchvision.models, name)(weights=None)
    out_dim = model.fc.in_features
    model.fc = nn.Identity()
    if stem == "cifar":
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        # Same init torchvision (and the reference) use for every conv: normal(0, sqrt(2 / (k*k*out))).
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    model.out_dim = out_dim
    return model


def backbone_state_dict(backbone: nn.Module) -> dict[str, Tensor]:
    """A detached CPU copy of the backbone's parameters and buffers (torchvision key names)."""
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
