"""Projection MLP between the backbone and the head (SimCLR / MoCo v2 / BYOL style).

``Linear(d, hidden) -> BN -> ReLU`` repeated ``layers - 1`` times, then ``Linear(hidden, out)``
(followed by BN when ``last_bn``). ``layers = 0`` is the identity (the head sees backbone features).
"""

from __future__ import annotations

from torch import Tensor, nn

from episodic.errors import check


class Projector(nn.Module):
    """MLP projector; ``out_dim`` is the embedding width the head sees."""

    def __init__(
        self, in_dim: int, hidden_dim: int = 512, out_dim: int = 128, layers: int = 2, last_bn: bool = False
    ) -> None:
        super().__init__()
        for key, value in (("hidden_dim", hidden_dim), ("out_dim", out_dim)):
            check(value >= 1, f"backbone.projector.{key}={value} is not allowed; use an integer >= 1")
        check(layers >= 0, f"backbone.projector.layers={layers} is not allowed; use 0 (none) or an integer >= 1")
        mods: list[nn.Module] = []
        d = in_dim
        for _ in range(layers - 1):
            mods += [nn.Linear(d, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            d = hidden_dim
        if layers >= 1:
            mods.append(nn.Linear(d, out_dim, bias=not last_bn))
            if last_bn:
                mods.append(nn.BatchNorm1d(out_dim))
            d = out_dim
        self.net = nn.Sequential(*mods)
        self.out_dim = d

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
