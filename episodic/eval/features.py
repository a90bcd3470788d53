"""Frozen-encoder feature extraction (backbone output, eval mode, no augmentation)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def extract_features(backbone: nn.Module, images: Tensor, batch_size: int = 512,
                     device: str | torch.device = "cpu", mean: list[float] | None = None,
                     std: list[float] | None = None) -> Tensor:
    """Backbone features ``[N, d]`` of uint8 ``images [N, C, H, W]`` (pixels scaled to [0, 1])."""
    was_training = backbone.training
    backbone.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device).float().div_(255)
        if mean is not None and std is not None:
            m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
            s = torch.tensor(std, device=device).view(1, -1, 1, 1)
            x = (x - m) / s
        out.append(backbone(x).float().cpu())
    backbone.train(was_training)
    return torch.cat(out) if out else torch.empty(0)
