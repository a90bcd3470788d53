"""Linear probe of a frozen backbone: a linear classifier on its features, trained with labels.

Two solvers:

* :func:`linear_probe` (L-BFGS): multinomial logistic regression on cached features standardised with
  the training split's mean and std, loss ``CE + wd * ||W||^2`` in float64; fast and tuning-free, the
  default for small datasets and the end-of-run quick evaluation.
* :func:`sgd_probe` (the papers' recipe, metacontrastive ``SSLEval``): a zero-initialised linear layer
  on the raw backbone output, cross-entropy, SGD (momentum 0.9, no Nesterov) with the learning rate
  decayed linearly to 0 over ``steps`` and no warm-up. Features come from a cache (computed once) or,
  with ``aug``, are recomputed every step from augmented images:

  - ``crop_flip``: 4-pixel reflect padding, random crop back to the image size, horizontal flip
    with probability 0.5 (the CIFAR recipe);
  - ``resized_crop``: random resized crop (the dataset's ``augment`` scale and ratio) + its flip
    probability, no colour changes (the ImageNet recipe: scale 0.08-1, flip 0.5).

  Test features never see augmentation. Features are not standardised (as in the paper), so the
  learning rate sees the backbone's feature scale: a random-init twin with tiny features barely
  moves from chance in a short schedule, where the standardised L-BFGS probe does not care.

Per-dataset recipes (:data:`episodic.config.LINEAR_RECIPES`): CIFAR-10/100 batch 1024, lr 0.1, wd 1e-4,
80,000 steps; ImageNet batch 4096, lr 1.6, wd 0, 28,080 steps (about 90 epochs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from episodic.data.augment import AugmentConfig, BatchAugment
from episodic.errors import check

if TYPE_CHECKING:
    from episodic.eval.context import EvalContext

AUGS = ("none", "crop_flip", "resized_crop")


def shuffled_batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[Tensor]:
    """``steps`` batches of indices into ``range(n)``: drop-last passes over fresh permutations."""
    order, pos = torch.randperm(n, generator=generator), 0
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=generator), 0
        yield order[pos : pos + batch_size]
        pos += batch_size


def linear_probe(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, weight_decay: float = 1e-4, max_iter: int = 200
) -> float:
    """Fit softmax regression on ``train`` features, return accuracy (%) on ``test``."""
    mu, sd = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    xtr, xte = ((train_x - mu) / sd).double(), ((test_x - mu) / sd).double()
    classes = int(max(train_y.max(), test_y.max())) + 1
    w = torch.zeros(xtr.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ w + b, train_y) + weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float(((xte @ w + b).argmax(1) == test_y).double().mean() * 100)


def pad_crop_flip(x: Tensor, pad: int = 4, flip_p: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """Per-sample random crop of ``x [B, C, H, W]`` after ``pad``-pixel reflect padding, then a random flip.

    Crop offsets and flips are drawn on the CPU from ``generator``; the output has ``x``'s size.
    """
    b, _, h, w = x.shape
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < flip_p
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect") if pad > 0 else x
    rows = oy[:, None] + torch.arange(h)
    cols = ox[:, None] + torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    dev = x.device
    out = xp[torch.arange(b, device=dev)[:, None, None], :, rows.to(dev)[:, :, None], cols.to(dev)[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()  # advanced indices first: [B, H, W, C] -> [B, C, H, W]


class ProbeAugment(nn.Module):
    """uint8 images -> float inputs of the backbone with the probe's training augmentation.

    ``kind``: ``none`` | ``crop_flip`` | ``resized_crop`` (see the module docstring); ``augment`` is the
    dataset's ``augment`` block (crop scale, ratio, flip probability, mean/std).
    """

    def __init__(self, kind: str, augment: Mapping[str, Any], size: int) -> None:
        super().__init__()
        check(kind in AUGS, f"eval.aug={kind!r} is not allowed; use one of {', '.join(AUGS)}")
        self.kind = kind
        mean, std = augment.get("mean"), augment.get("std")
        self.mean = None if mean is None else torch.tensor(list(mean)).view(1, -1, 1, 1)
        self.std = None if std is None else torch.tensor(list(std)).view(1, -1, 1, 1)
        self.flip_p = float(augment.get("hflip", 0.5))
        self.crop = None
        if kind == "resized_crop":
            cfg = AugmentConfig(
                size=size,
                scale=tuple(augment.get("scale", (0.08, 1.0))),
                ratio=tuple(augment.get("ratio", (3 / 4, 4 / 3))),
                hflip=self.flip_p,
                brightness=0.0,
                contrast=0.0,
                saturation=0.0,
                hue=0.0,
                jitter_p=0.0,
                gray_p=0.0,
                blur_p=0.0,
                solarize_p=0.0,
            )
            self.crop = BatchAugment(cfg)

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if self.crop is not None:  # resized_crop
            x = self.crop(images, generator)
        else:
            x = images.float().div(255)
            if self.kind == "crop_flip":
                x = pad_crop_flip(x, 4, self.flip_p, generator)
        if self.mean is not None and self.std is not None:
            x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return x


def sgd_probe(
    batch_features: Callable[[Tensor], Tensor],
    labels: Tensor,
    dim: int,
    n_classes: int,
    steps: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> nn.Linear:
    """Train a zero-initialised ``nn.Linear(dim, n_classes)`` with SGD and linear LR decay to 0.

    ``batch_features(idx)`` returns the ``[len(idx), dim]`` features of training rows ``idx``;
    batches are drop-last passes over a fresh seeded permutation of the ``len(labels)`` rows.
    """
    check(steps >= 1, f"eval.steps={steps} is not allowed; use an integer >= 1")
    check(batch_size >= 1, f"eval.batch_size={batch_size} is not allowed; use an integer >= 1")
    check(lr > 0, f"eval.lr={lr} is not allowed; use a value > 0")
    n = len(labels)
    bs = min(batch_size, n)
    head = nn.Linear(dim, n_classes).to(device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, 1.0 - t / steps))
    g = torch.Generator().manual_seed(seed)
    labels = labels.to(device)
    with torch.enable_grad():
        for idx in shuffled_batches(n, bs, steps, g):
            loss = F.cross_entropy(head(batch_features(idx).to(device).float()), labels[idx.to(device)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    check(
        bool(torch.isfinite(head.weight).all() and torch.isfinite(head.bias).all()),
        f"the linear probe diverged (non-finite weights) with eval.lr={lr}; lower eval.lr",
    )
    return head.eval()


@torch.no_grad()
def accuracy(head: nn.Module, features: Tensor, labels: Tensor, batch_size: int = 4096) -> float:
    """Top-1 accuracy (%) of ``head`` on ``features``."""
    dev = next(head.parameters()).device
    hits = sum(
        int((head(features[i : i + batch_size].to(dev).float()).argmax(1).cpu() == labels[i : i + batch_size]).sum())
        for i in range(0, len(labels), batch_size)
    )
    return 100.0 * hits / max(1, len(labels))


RECIPE_KEYS = ("optimizer", "aug", "steps", "batch_size", "lr", "momentum", "weight_decay", "max_iter")


def resolve_recipe(ev: Any, data_key: str) -> dict[str, Any]:
    """The probe settings: ``ev.recipes[ev.recipe]`` (``auto``: by dataset, else ``default``), then the
    non-null top-level overrides (``eval.lr=...`` etc.)."""
    recipes = ev.recipes
    name = str(ev.get("recipe", "auto"))
    if name == "auto":
        name = data_key if data_key in recipes else "default"
    check(name in recipes, f"eval.recipe={name!r} is not allowed; use auto or one of {', '.join(recipes)}")
    r = {k: recipes[name].get(k) for k in RECIPE_KEYS}
    r.update({k: ev.get(k) for k in RECIPE_KEYS if ev.get(k) is not None})
    check(r["optimizer"] in ("lbfgs", "sgd"), f"eval.optimizer={r['optimizer']!r} is not allowed; use lbfgs or sgd")
    check(r["aug"] in AUGS, f"eval.aug={r['aug']!r} is not allowed; use one of {', '.join(AUGS)}")
    check(
        r["optimizer"] == "sgd" or r["aug"] == "none",
        f"eval.aug={r['aug']!r} needs eval.optimizer=sgd (L-BFGS runs on cached, unaugmented features)",
    )
    needed = ("steps", "batch_size", "lr", "momentum", "weight_decay") if r["optimizer"] == "sgd" else ("max_iter",)
    missing = [k for k in needed if r[k] is None]
    check(
        not missing,
        f"eval.optimizer={r['optimizer']} needs {', '.join(f'eval.{k}' for k in missing)}, which "
        f"recipe {name!r} does not set; set them",
    )
    return {"recipe": name, **r}


def run_linear(ctx: EvalContext, ev: Any) -> dict[str, Any]:
    """Linear-probe accuracy (%) of the trained (and random-init) backbone, plus the settings used."""
    from episodic.eval.features import cached_features, labelled

    r = resolve_recipe(ev, ctx.data_key)
    train, test = labelled(ctx.split(str(ev.train_split))), labelled(ctx.split(str(ev.test_split)))
    n_classes = int(max(train.labels.max(), test.labels.max())) + 1
    out: dict[str, Any] = {"trained": None, "random_init": None}
    for which, backbone in ctx.backbones(bool(ev.baseline)):
        fte = cached_features(backbone, test.images, ctx.cache_dir, ctx.device, **ctx.norm)
        if r["aug"] == "none":
            ftr = cached_features(backbone, train.images, ctx.cache_dir, ctx.device, **ctx.norm)
            if r["optimizer"] == "lbfgs":
                out[which] = linear_probe(
                    ftr, train.labels, fte, test.labels, float(r["weight_decay"]), int(r["max_iter"])
                )
                continue
            head = sgd_probe(
                ftr.__getitem__,
                train.labels,
                ftr.shape[1],
                n_classes,
                int(r["steps"]),
                int(r["batch_size"]),
                float(r["lr"]),
                float(r["momentum"]),
                float(r["weight_decay"]),
                int(ev.seed),
                ctx.device,
            )
        else:
            aug = ProbeAugment(r["aug"], ctx.data_cfg.augment, int(train.images.shape[-1]))
            g = torch.Generator().manual_seed(int(ev.seed))

            @torch.no_grad()
            def feats(idx: Tensor, bb: nn.Module = backbone, a: ProbeAugment = aug, gen: torch.Generator = g) -> Tensor:
                return bb(a(train.images[idx].to(ctx.device), gen))

            head = sgd_probe(
                feats,
                train.labels,
                fte.shape[1],
                n_classes,
                int(r["steps"]),
                int(r["batch_size"]),
                float(r["lr"]),
                float(r["momentum"]),
                float(r["weight_decay"]),
                int(ev.seed),
                ctx.device,
            )
        out[which] = accuracy(head, fte, test.labels)
    out["settings"] = r
    return out
