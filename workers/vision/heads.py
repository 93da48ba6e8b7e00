"""Projection / prediction heads (ssl.md 1.2): ``Linear -> BatchNorm1d -> ReLU -> Linear``.

The BatchNorm is load-bearing: together with the predictor and the EMA target it is what keeps
BYOL-style methods (MSF included) from collapsing to a constant embedding (ssl.md 2.6, 8.3).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

if TYPE_CHECKING:  # annotations only: heads stay importable without torchvision
    from workers.vision.backbones import Backbone


class MLPHead(nn.Sequential):
    """``in_dim -> hidden_dim (BN, ReLU) -> out_dim``, biases on, as in the reference heads."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim


def head_dims(feature_dim: int, hidden_dim: int | None = None, out_dim: int | None = None) -> tuple[int, int]:
    """Defaults of the reference: hidden = 2 * D, out = D / 4 (R18: 1024, 128; R50: 4096, 512)."""
    return hidden_dim or 2 * feature_dim, out_dim or max(1, feature_dim // 4)


class Encoder(nn.Module):
    """Backbone followed by a projection head: ``x -> projector(backbone(x))``.

    The unit that gets an EMA copy in MSF/ISD/CMSF (the target is backbone + projection, never the
    predictor). ``features(x)`` gives the pooled backbone output used for k-NN / linear evaluation.
    """

    def __init__(self, backbone: Backbone, projector: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.projector(self.backbone(x))
