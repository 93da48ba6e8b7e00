"""Momentum (EMA) targets (ssl.md 1.3): theta_t <- m * theta_t + (1 - m) * theta_o, parameters only.

Buffers (BatchNorm running statistics) are deliberately NOT averaged: the target runs in train mode,
so its BN uses batch statistics and its running stats come from its own forward passes.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_target(online: nn.Module) -> nn.Module:
    """A frozen deep copy of ``online``: no parameter of the target ever receives a gradient."""
    target = copy.deepcopy(online)
    target.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """In place: every target parameter becomes ``m * target + (1 - m) * online``.

    ``m = 0`` copies the online weights exactly; ``m = 1`` leaves the target unchanged exactly.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    t_params: list[torch.Tensor] = list(target.parameters())
    o_params: list[torch.Tensor] = list(online.parameters())
    if len(t_params) != len(o_params):
        raise ValueError("target and online modules have different parameter lists; build the target with "
                         "make_target(online)")
    if momentum == 1.0:
        return
    # foreach: one fused kernel per group instead of ~2 launches per tensor (matters on GPU).
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, [p.detach() for p in o_params], alpha=1.0 - momentum)
