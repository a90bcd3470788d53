"""Semi-supervised evaluation: fine-tune the whole encoder plus a linear layer on 1% / 10% of the labels.

The recipe of the metacontrastive ``SemiSupervisedEval`` (itself SimCLR's): backbone and a
zero-initialised linear layer trained end to end with cross-entropy, BatchNorm in train mode,
SGD momentum 0.9, no weight decay, no warm-up, learning rate decayed linearly to 0, batch 240,
training images augmented with random resized crop + flip, test images not augmented. On ImageNet:
1% -> lr 0.05 for 3,000 steps, 10% -> lr 0.1 for 60,000 steps, i.e. about 56 and 112 passes over the
labelled subset; ``eval=semi`` (:class:`episodic.config.SemiEval`) states the schedule in those passes
(``epochs``) so it
carries over to any dataset (``eval.steps`` overrides).

Labelled subsets are class-balanced and fixed by a seed: every class contributes
``max(1, round(fraction * N / C))`` images of the (labelled) train split, drawn by a seeded
permutation per class. The indices (into the labelled train split) are written one per line to
``<run dir>/semi/subset_<pct>_seed<seed>.txt`` and the file is named in the result.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from omegaconf import ListConfig
from torch import Tensor, nn

from episodic.errors import check
from episodic.eval.features import extract_features, labelled
from episodic.eval.linear import ProbeAugment, accuracy, shuffled_batches

if TYPE_CHECKING:
    from episodic.eval.context import EvalContext


def balanced_subset(labels: Tensor, fraction: float, seed: int = 0) -> Tensor:
    """Sorted indices of a class-balanced ``fraction`` of ``labels`` (same per-class count), seeded."""
    check(0 < fraction <= 1, f"eval.fractions entry {fraction} is not allowed; use a fraction in (0, 1]")
    classes = labels.unique()
    per = max(1, round(fraction * len(labels) / len(classes)))
    counts = {int(c): int((labels == c).sum()) for c in classes}
    small = min(counts, key=lambda c: counts[c])
    check(
        counts[small] >= per,
        f"a class-balanced {fraction:g} subset needs {per} images per class but class "
        f"{small} has only {counts[small]}; use a smaller fraction",
    )
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in classes.tolist():
        ix = (labels == c).nonzero().squeeze(1)
        picks.append(ix[torch.randperm(len(ix), generator=g)[:per]])
    return torch.cat(picks).sort().values


class Classifier(nn.Module):
    """``backbone`` followed by a zero-initialised linear layer."""

    def __init__(self, backbone: nn.Module, dim: int, n_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(dim, n_classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.backbone(x))


def finetune(
    backbone: nn.Module,
    images: Tensor,
    labels: Tensor,
    n_classes: int,
    aug: ProbeAugment,
    steps: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> Classifier:
    """Fine-tune a copy of ``backbone`` + linear layer on uint8 ``images`` (see the module docstring)."""
    check(steps >= 1, f"semi-supervised steps={steps} is not allowed; use an integer >= 1")
    check(lr > 0, f"eval.lr={lr} is not allowed; use a value > 0")
    dim = int(extract_features(backbone, images[:1], device=device).shape[1])
    model = Classifier(copy.deepcopy(backbone), dim, n_classes).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, 1.0 - t / steps))
    n = len(labels)
    bs = min(batch_size, n)
    g = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for idx in shuffled_batches(n, bs, steps, g):
            x = aug(images[idx].to(device), g)
            loss = F.cross_entropy(model(x), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    check(
        all(bool(torch.isfinite(p).all()) for p in model.parameters()),
        f"semi-supervised fine-tuning diverged (non-finite weights) with lr={lr}; lower eval.lr",
    )
    return model.eval()


def _per_fraction(value: Any, n: int, key: str) -> list[Any]:
    vals = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value] * n
    check(len(vals) == n, f"eval.{key} has {len(vals)} entries for {n} fractions; give one per fraction or one")
    return vals


def pct_name(fraction: float) -> str:
    """``0.01`` -> ``1pct``, ``0.1`` -> ``10pct``, ``0.005`` -> ``0.5pct``."""
    return f"{round(fraction * 100, 6):g}pct"


def run_semi(ctx: EvalContext, ev: Any) -> dict[str, Any]:
    """``{"<pct>": {"trained": acc, "random_init": acc|None, "labels", "per_class", "steps", "lr",
    "indices_file"}}`` for each fraction in ``ev.fractions``."""
    train, test = labelled(ctx.split(str(ev.train_split))), labelled(ctx.split(str(ev.test_split)))
    n_classes = int(max(train.labels.max(), test.labels.max())) + 1
    fractions = [float(f) for f in ev.fractions]
    check(len(fractions) > 0, "eval.fractions is empty; give e.g. [0.01, 0.1]")
    lrs = _per_fraction(ev.lr, len(fractions), "lr")
    epochs = [None] * len(fractions) if ev.get("steps") else _per_fraction(ev.epochs, len(fractions), "epochs")
    aug = ProbeAugment(str(ev.aug), ctx.data_cfg.augment, int(train.images.shape[-1]))
    out: dict[str, Any] = {}
    for frac, lr, ep in zip(fractions, lrs, epochs):
        idx = balanced_subset(train.labels, frac, int(ev.seed))
        bs = min(int(ev.batch_size), len(idx))
        steps = int(ev.steps) if ev.get("steps") else max(1, math.ceil(float(ep) * len(idx) / bs))
        name = pct_name(frac)
        rel = Path("semi") / f"subset_{name}_seed{int(ev.seed)}.txt"
        path = ctx.run_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{i}\n" for i in idx.tolist()))
        row: dict[str, Any] = {
            "trained": None,
            "random_init": None,
            "labels": len(idx),
            "per_class": len(idx) // len(train.labels.unique()),
            "steps": steps,
            "lr": float(lr),
            "indices_file": str(rel),
        }
        for which, backbone in ctx.backbones(bool(ev.baseline)):
            model = finetune(
                backbone,
                train.images[idx],
                train.labels[idx],
                n_classes,
                aug,
                steps,
                bs,
                float(lr),
                float(ev.momentum),
                float(ev.weight_decay),
                int(ev.seed),
                ctx.device,
            )
            feats = extract_features(model.backbone, test.images, device=ctx.device, **ctx.norm)
            row[which] = accuracy(model.fc, feats, test.labels)
        out[name] = row
    return out
