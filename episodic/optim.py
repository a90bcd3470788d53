"""Optimisers (SGD, Adam/AdamW, LARS) and the per-step warm-up + cosine learning-rate schedule.

Optimisers are registered builders (:data:`OPTIMIZERS`) taking the parameter groups and their own
settings. Parameter groups: weights are decayed; biases and normalisation parameters (every tensor
with one dimension) get no weight decay and, with LARS, no trust-ratio adaptation.

LARS (You et al., 2017, as used by SimCLR): for an adapted tensor ``w`` with gradient ``g``::

    u = g + wd * w ;   u <- u * eta * ||w|| / ||u||   (when both norms are > 0) ;   SGD-momentum step on u
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from episodic.errors import EpisodicError, check
from episodic.registry import Registry


class LARS(Optimizer):
    """SGD with momentum and layer-wise trust ratio; groups with ``lars=False`` are plain SGD.

    Like the fused optimizers it skips its update on the device when ``self.found_inf`` (a 0-d tensor
    set before :meth:`step`) is 1: parameters and momentum buffers keep their values, no host read.
    """

    def __init__(
        self, params: Iterable[Any], lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001
    ) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]  # no closure
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                u = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad.clone()
                if group["lars"]:
                    wn, un = p.norm(), u.norm()
                    ratio = torch.where((wn > 0) & (un > 0), group["eta"] * wn / un, torch.ones_like(wn))
                    u.mul_(ratio)
                state = self.state[p]
                buf = state.get("momentum_buffer")
                new_buf = u if buf is None else buf * group["momentum"] + u
                new_p = p - group["lr"] * new_buf
                if found_inf is not None:  # keep the old values where the step is skipped
                    keep = found_inf > 0
                    new_p = torch.where(keep, p, new_p)
                    new_buf = torch.where(keep, torch.zeros_like(new_buf) if buf is None else buf, new_buf)
                state["momentum_buffer"] = new_buf
                p.copy_(new_p)
        return None


OPTIMIZERS: Registry = Registry("optimizer", None)


def fused(groups: list[dict[str, Any]]) -> bool:
    """Use the fused kernels (one launch for every tensor; they skip an update on the device when
    ``optimizer.found_inf`` is set) wherever they run: on CPU and CUDA floating-point parameters."""
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: >1-D weights (decayed) and 1-D biases/norm parameters (not decayed)."""
    decay: list[nn.Parameter] = []
    plain: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else plain).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=plain, weight_decay=0.0)]


def check_momentum(momentum: float) -> None:
    check(0.0 <= momentum < 1.0, f"optim.optimizer.momentum={momentum} is not allowed; use a value in [0, 1)")


@OPTIMIZERS.register("sgd")
def sgd(groups: list[dict[str, Any]], lr: float, momentum: float = 0.9, nesterov: bool = False) -> Optimizer:
    check_momentum(momentum)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, fused=fused(groups))


def check_betas(betas: Any) -> None:
    ok = len(betas) == 2 and all(0.0 <= float(b) < 1.0 for b in betas)
    check(ok, f"optim.optimizer.betas={list(betas)} is not allowed; use two values in [0, 1)")


@OPTIMIZERS.register("adam")
def adam(groups: list[dict[str, Any]], lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> Optimizer:
    check_betas(betas)
    return torch.optim.Adam(groups, lr=lr, betas=(float(betas[0]), float(betas[1])), fused=fused(groups))


@OPTIMIZERS.register("adamw")
def adamw(groups: list[dict[str, Any]], lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> Optimizer:
    check_betas(betas)
    return torch.optim.AdamW(groups, lr=lr, betas=(float(betas[0]), float(betas[1])), fused=fused(groups))


@OPTIMIZERS.register("lars")
def lars(groups: list[dict[str, Any]], lr: float, momentum: float = 0.9, eta: float = 0.001) -> Optimizer:
    check_momentum(momentum)
    check(eta > 0, f"optim.optimizer.eta={eta} is not allowed; use a value > 0")
    groups[1]["lars"] = False  # biases and norm parameters: plain SGD
    return LARS(groups, lr=lr, momentum=momentum, eta=eta)


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float = 0.0, **params: Any) -> Optimizer:
    """The optimizer ``name`` (``OPTIMIZERS``: sgd, adam, adamw, lars) over :func:`param_groups`; ``params``
    are that optimizer's own settings (a setting it does not take is one line naming it)."""
    check(lr > 0, f"optim.optimizer.lr={lr} is not allowed; use a value > 0")
    check(weight_decay >= 0, f"optim.optimizer.weight_decay={weight_decay} is not allowed; use a value >= 0")
    return OPTIMIZERS.build(name, groups=param_groups(model, weight_decay), lr=lr, **params)


def warmup_cosine(step: int, total: int, warmup: int, final_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up from ``1/(warmup+1)`` to 1, then cosine decay to ``final_ratio``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def build_scheduler(
    opt: Optimizer, total_steps: int, warmup_steps: int = 0, final_ratio: float = 0.0, schedule: str = "cosine"
) -> LambdaLR:
    """Per-step schedule: ``cosine`` (with warm-up) or ``constant`` (with warm-up)."""
    if schedule == "constant":
        return LambdaLR(opt, lambda s: min(1.0, (s + 1) / (warmup_steps + 1)))
    if schedule != "cosine":
        raise EpisodicError(f"unknown optim.schedule {schedule!r}; allowed: cosine, constant")
    return LambdaLR(opt, lambda s: warmup_cosine(s, total_steps, warmup_steps, final_ratio))
