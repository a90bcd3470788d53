"""Momentum (EMA) encoders shared by the MoCo and BYOL pairings.

After every optimizer step ``k`` of ``K`` the target parameters move towards the online ones::

    theta_target <- m_k theta_target + (1 - m_k) theta_online
    m_k = m                                          (constant: MoCo v2)
    m_k = 1 - (1 - m) (cos(pi k / K) + 1) / 2        (cosine: BYOL, MoCo v3 / SNCLR; m -> 1)

Only parameters are averaged; the target's BatchNorm statistics come from its own (train-mode)
forward passes, as in MoCo and BYOL.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from episodic.errors import check

SCHEDULES = ("constant", "cosine")


def momentum_at(base: float, step: int, total: int, schedule: str) -> float:
    """The EMA coefficient after step ``step`` of ``total``."""
    if schedule == "constant":
        return base
    return 1 - (1 - base) * (math.cos(math.pi * step / max(total, 1)) + 1) / 2


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with ``requires_grad=False`` (kept out of the optimizer)."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, m: float) -> None:
    """``target <- m target + (1 - m) online`` for every parameter, in two fused operations."""
    targets: list[Tensor] = list(target.parameters())
    onlines = [p.detach() for p in online.parameters()]
    torch._foreach_mul_(targets, m)
    torch._foreach_add_(targets, onlines, alpha=1 - m)


def check_momentum(momentum: float, schedule: str) -> None:
    check(0 <= momentum <= 1, f"method.params.momentum={momentum} is not allowed; use a value in [0, 1]")
    check(
        schedule in SCHEDULES,
        f"method.params.momentum_schedule={schedule!r} is not allowed; use {' or '.join(SCHEDULES)}",
    )
