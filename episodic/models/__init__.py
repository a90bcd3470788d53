"""Encoders: a backbone followed by a projection MLP."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from episodic.models.backbones import BACKBONES, Backbone
from episodic.models.projector import Projector


class Encoder(nn.Module):
    """``backbone`` features -> ``projector`` embeddings. ``features(x)`` skips the projector."""

    def __init__(self, backbone: Backbone, projector: Projector) -> None:
        super().__init__()
        self.backbone, self.projector = backbone, projector

    def features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.projector(self.backbone(x))


def build_encoder(
    backbone: str,
    in_channels: int,
    backbone_params: dict[str, Any] | None = None,
    projector_params: dict[str, Any] | None = None,
) -> Encoder:
    """Build ``Encoder`` from registry names and parameter dicts (the Hydra ``backbone`` group)."""
    net = BACKBONES.build(backbone, in_channels=in_channels, **(backbone_params or {}))
    return Encoder(net, Projector(net.feat_dim, **(projector_params or {})))


__all__ = ["BACKBONES", "Backbone", "Encoder", "Projector", "build_encoder"]
