"""Task augmentations: transformations of a whole image episode, chosen and combined by config.

``task.augment=[rotate, query_mix, rotation_loss]`` builds a :class:`TaskPipeline` from the
registered augmentations (registry :data:`TASK_AUGMENTS`; every module of ``episodic.tasks`` is
imported on first lookup, so a new augmentation is one small file). Each augmentation reads its
parameters from ``task.<name>`` (e.g. ``task.rotate.p=0.5``).

Three kinds, applied in a fixed order whatever the order of the list, so they always combine:

1. *auxiliary losses* (``stage = 0``, e.g. ``rotation_loss``) draw their inputs from the episode
   as the :class:`~episodic.tasks.episode.ViewSampler` built it, before any other task
   augmentation, so a rotation label is always relative to the image's own orientation. They
   return an :class:`AuxBatch`; the loss is computed inside the model's forward
   (:meth:`TaskPipeline.aux_loss`), so its trainable parameters are registered in the model;
2. *new-class transforms* (``stage = 1``: ``rotate``, ``invert``, ``crop``) change every view of
   an image in the same way, so the transformed image is a new class and the transformation never
   appears as within-class variation; in ``mode: replace`` each image is transformed with
   probability ``p`` and keeps its class index (the reference's task rotation), in ``mode: add``
   ``round(p * n_way)`` images per episode are copied, transformed, and appended as new classes
   (``n_way`` grows);
3. *query mixing* (``stage = 2``: ``query_mix``) mixes queries with other classes' queries and
   sets ``Episode.query_labels_mix`` / ``mix_weight``, which the heads' losses consume.

All randomness comes from the ``generator`` passed in (the trainer's seeded generator); nothing is
re-seeded, so ranks and runs with different seeds draw different transformations.

Images in an episode are the augmented views (float, possibly normalised with the data's
``augment.mean/std``): :class:`TaskContext` carries that normalisation for pixel-space operations.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from episodic.errors import EpisodicError, check
from episodic.registry import Registry, unknown_keywords
from episodic.tasks.episode import Episode

TASK_AUGMENTS: Registry[type[TaskAugment]] = Registry("task augmentation", "episodic.tasks")

__all__ = [
    "TASK_AUGMENTS",
    "AuxBatch",
    "Draw",
    "NewClassTransform",
    "TaskAugment",
    "TaskContext",
    "TaskPipeline",
    "build_task_pipeline",
    "from_image_views",
    "image_views",
]


@dataclass(frozen=True)
class TaskContext:
    """What augmentations may need to know about the run.

    Attributes:
        embed_dim: width of the encoder output (the projector's ``out_dim``).
        mean, std: per-channel normalisation applied to the views (``None``: pixels in [0, 1]).
    """

    embed_dim: int = 128
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


@dataclass
class AuxBatch:
    """Inputs of an auxiliary loss: ``images [M, C, H, W]``, integer ``targets [M]``, the loss weight
    for this step and the index of the augmentation in its pipeline that consumes it."""

    images: Tensor
    targets: Tensor
    weight: float
    index: int


class Draw:
    """Random numbers from one ``torch.Generator`` (on its own device), returned on ``device``.

    A CPU generator's draws reach an accelerator by an asynchronous copy (``non_blocking``): the host
    stages them and goes on queueing work, it never waits for the device's queue to drain."""

    def __init__(self, generator: torch.Generator | None, device: torch.device | str) -> None:
        self.generator = generator
        self.gen_device = generator.device if generator is not None else torch.device("cpu")
        self.device = torch.device(device)

    def out(self, t: Tensor) -> Tensor:
        return t.to(self.device, non_blocking=True)

    def rand(self, *shape: int) -> Tensor:
        """Uniform [0, 1) float32."""
        return self.out(torch.rand(*shape, generator=self.generator, device=self.gen_device))

    def randint(self, low: int, high: int, *shape: int) -> Tensor:
        """Uniform integers in ``[low, high)``."""
        return self.out(torch.randint(low, high, shape, generator=self.generator, device=self.gen_device))

    def perm(self, rows: int, n: int) -> Tensor:
        """``rows`` independent random permutations of ``range(n)``: ``[rows, n]`` int64."""
        u = torch.rand(rows, n, generator=self.generator, device=self.gen_device)
        return self.out(u.argsort(dim=1))

    def beta(self, alpha: float, n: int) -> Tensor:
        """``n`` draws of Beta(alpha, alpha) as float32: ``X / (X + Y)`` for independent Gamma(alpha)
        draws from this generator (on its device: no host read)."""
        shape = torch.full((2, n), float(alpha), dtype=torch.float64, device=self.gen_device)
        x, y = torch._standard_gamma(shape, generator=self.generator)
        return self.out((x / (x + y).clamp_min(torch.finfo(x.dtype).tiny)).float())


# ----------------------------------------------------------------------------------------------
# Episode <-> per-image views
# ----------------------------------------------------------------------------------------------


def image_views(episode: Episode) -> Tensor:
    """All views of every image: ``[E, V, n_way, ...]`` with ``V = n_supp + n_query`` (support views
    first). Needs the view-major layout the :class:`ViewSampler` builds (no extra or mixed queries)."""
    e, n = episode.n_episodes, episode.n_way
    check(
        episode.support.shape[1] == n * episode.n_supp
        and episode.query.shape[1] == n * episode.n_query
        and episode.query_labels_mix is None,
        "this task augmentation needs the plain view-major episode layout; apply it before query mixing",
    )
    rest = episode.support.shape[2:]
    s = episode.support.reshape(e, episode.n_supp, n, *rest)
    q = episode.query.reshape(e, episode.n_query, n, *rest)
    return torch.cat([s, q], 1)


def from_image_views(episode: Episode, views: Tensor) -> Episode:
    """The episode holding ``views [E, V, n_way', ...]`` (``n_way'`` may differ from the input's)."""
    e, _, n = views.shape[:3]
    rest = views.shape[3:]
    ns, nq = episode.n_supp, episode.n_query
    labels = torch.arange(n, device=views.device)
    return episode.replace(
        support=views[:, :ns].reshape(e, ns * n, *rest),
        query=views[:, ns:].reshape(e, nq * n, *rest),
        support_labels=labels.repeat(ns).expand(e, -1),
        query_labels=labels.repeat(nq).expand(e, -1),
        n_way=n,
        query_labels_mix=None,
        mix_weight=None,
    )


# ----------------------------------------------------------------------------------------------
# Base classes
# ----------------------------------------------------------------------------------------------


def check_probability(name: str, value: Any) -> float:
    check(
        isinstance(value, (int, float)) and 0.0 <= float(value) <= 1.0,
        f"task.{name} must be a probability in [0, 1], got {value!r}",
    )
    return float(value)


class TaskAugment(nn.Module):
    """One task augmentation. Subclasses set ``stage`` and implement :meth:`forward` (stages 1, 2:
    episode in, episode out) or :meth:`aux_batch` + :meth:`aux_loss` (stage 0, auxiliary losses)."""

    stage: ClassVar[int] = 1
    name: ClassVar[str] = ""  # the registry name, set by ``TASK_AUGMENTS.register``

    def forward(self, episode: Episode, draw: Draw) -> Episode:
        raise NotImplementedError

    def aux_batch(self, episode: Episode, draw: Draw, step: int, total: int) -> AuxBatch | None:
        raise NotImplementedError

    def aux_loss(self, encoder: nn.Module, batch: AuxBatch) -> Tensor:
        raise NotImplementedError


class NewClassTransform(TaskAugment):
    """Transforms all views of an image identically, making the result a new class.

    ``mode: replace``: each image is transformed with probability ``p`` and keeps its class index
    (the class is replaced by its transformed version; class count unchanged).
    ``mode: add``: per episode, ``round(p * n_way)`` distinct images are copied, transformed and
    appended as classes ``n_way, n_way + 1, ...`` (their views in the same support/query slots).

    Subclasses implement :meth:`sample` (per-image parameters) and :meth:`transform`.
    """

    stage: ClassVar[int] = 1

    def __init__(self, ctx: TaskContext, p: float = 0.25, mode: str = "replace") -> None:
        super().__init__()
        self.ctx = ctx
        self.p = check_probability(f"{self.name}.p", p)
        check(mode in ("replace", "add"), f"task.{self.name}.mode={mode!r} is not allowed; use replace or add")
        self.mode = mode

    def sample(self, n: int, draw: Draw) -> dict[str, Tensor]:
        """Parameters for ``n`` images (each shared by all of an image's views)."""
        raise NotImplementedError

    def transform(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        """``x [n, V, C, H, W]`` -> same shape, image ``i`` transformed with ``params[..][i]``."""
        raise NotImplementedError

    def forward(self, episode: Episode, draw: Draw) -> Episode:
        views = image_views(episode)  # [E, V, n, ...]
        e, v, n = views.shape[:3]
        if self.mode == "replace":
            chosen = draw.rand(e, n) < self.p
            # every image is transformed and the chosen ones kept: a mask, not an index, so the step
            # never waits for the host (the same distribution as transforming only the chosen ones)
            params = self.sample(e * n, draw)
            per_image = views.transpose(1, 2).flatten(0, 1)  # [E * n, V, ...]
            new = self.transform(per_image, params).view(e, n, v, *views.shape[3:]).transpose(1, 2)
            keep = chosen.view(e, 1, n, *([1] * (views.dim() - 3)))
            return from_image_views(episode, torch.where(keep, new, views))
        m = min(n, round(self.p * n))
        pick = draw.perm(e, n)[:, :m]  # [E, m] distinct images per episode
        params = self.sample(e * m, draw)
        if m == 0:
            return episode
        copies = views[torch.arange(e, device=views.device).unsqueeze(1), :, pick]  # [E, m, V, ...]
        new = self.transform(copies.flatten(0, 1), params).view_as(copies).transpose(1, 2)
        return from_image_views(episode, torch.cat([views, new], 2))


def _per_channel(values: Sequence[float] | None, fill: float, channels: int, like: Tensor) -> Tensor:
    vals = [fill] * channels if values is None else list(values)
    if len(vals) == 1:
        vals = vals * channels
    check(len(vals) == channels, f"normalisation has {len(vals)} entries for {channels}-channel images")
    return torch.tensor(vals, dtype=like.dtype).to(like.device, non_blocking=True).view(channels, 1, 1)


def pixel_affine(ctx: TaskContext, channels: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """``(mean, std)`` as ``[C, 1, 1]`` tensors: pixel = view * std + mean."""
    return _per_channel(ctx.mean, 0.0, channels, like), _per_channel(ctx.std, 1.0, channels, like)


# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------


class TaskPipeline(nn.Module):
    """The configured task augmentations, applied auxiliary-first, then new-class, then mixing."""

    def __init__(self, augments: Sequence[TaskAugment] = ()) -> None:
        super().__init__()
        ordered: list[TaskAugment] = sorted(augments, key=lambda a: a.stage)
        self.augments = nn.ModuleList(ordered)

    @property
    def stages(self) -> list[TaskAugment]:
        """The augmentations in the order they run."""
        return list(self.augments)  # type: ignore[arg-type]  # ModuleList of TaskAugment modules

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.stages]

    def forward(
        self, episode: Episode, generator: torch.Generator | None = None, step: int = 0, total: int = 1
    ) -> tuple[Episode, list[AuxBatch]]:
        """Augment an image episode; returns it and the auxiliary batches for :meth:`aux_loss`."""
        draw = Draw(generator, episode.support.device)
        aux: list[AuxBatch] = []
        for i, a in enumerate(self.stages):
            if a.stage == 0:
                batch = a.aux_batch(episode, draw, step, total)
                if batch is not None:
                    batch.index = i
                    aux.append(batch)
        for a in self.stages:
            if a.stage > 0:
                episode = a(episode, draw)
        return episode, aux

    def aux_loss(self, encoder: nn.Module, batches: Sequence[AuxBatch]) -> Tensor | None:
        """Sum of ``weight * loss`` over the auxiliary batches (``None`` when there are none)."""
        total: Tensor | None = None
        for b in batches:
            term = b.weight * self.stages[b.index].aux_loss(encoder, b)
            total = term if total is None else total + term
        return total


def build_task_pipeline(task_cfg: Mapping[str, Any] | None, ctx: TaskContext | None = None) -> TaskPipeline:
    """Build from the ``task`` config group: ``augment`` lists names, ``<name>`` holds parameters."""
    cfg = dict(task_cfg or {})
    names = cfg.get("augment") or []
    check(
        isinstance(names, Sequence) and not isinstance(names, str) and all(isinstance(n, str) for n in names),
        f"task.augment must be a list of names such as [rotate,query_mix], got {names!r}",
    )
    names = list(names)
    dup = sorted({n for n in names if list(names).count(n) > 1})
    check(not dup, f"task.augment lists {dup} more than once; list each augmentation once")
    ctx = ctx or TaskContext()
    augments = []
    for name in names:
        cls = TASK_AUGMENTS.get(name)
        params = dict(cfg.get(name) or {})
        unknown, allowed = unknown_keywords(cls, params, skip=("ctx",))
        check(not unknown, f"task.{name} has unknown parameter(s) {unknown}; allowed: {', '.join(allowed)}")
        augments.append(cls(ctx, **params))
    return TaskPipeline(augments)


def cosine_weight(weight: float, decay: str, step: int, total: int) -> float:
    """``weight`` or, with ``decay='cosine'``, ``weight * (1 + cos(pi * step / total)) / 2``."""
    if decay == "none":
        return weight
    if decay == "cosine":
        return weight * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))
    raise EpisodicError(f"decay={decay!r} is not allowed; use none or cosine")


@functools.lru_cache(maxsize=16)
def rotation_permutations(side: int, device: torch.device) -> Tensor:
    """``[4, side * side]``: row ``r`` lists, for each pixel of ``rot90(x, r)``, the pixel of ``x`` it comes from."""
    pixels = torch.arange(side * side, device=device).view(side, side)
    return torch.stack([torch.rot90(pixels, r, dims=(0, 1)).flatten() for r in range(4)])


def rotate_groups(x: Tensor, k: Tensor) -> Tensor:
    """Rotate ``x[i]`` (``[n, ..., H, W]``) by ``k[i] * 90`` degrees counter-clockwise (``torch.rot90``
    on the last two dims, ``k`` in 0..3). A rotation by a multiple of 90 degrees permutes the pixels,
    so all of them are one gather with each image's permutation: no per-``k`` index, no host read."""
    check(x.shape[-1] == x.shape[-2], f"rotations by 90 degrees need square images, got {tuple(x.shape[-2:])}")
    side = x.shape[-1]
    perms = rotation_permutations(side, x.device)
    flat = x.flatten(-2)
    index = perms[k].view(len(k), *([1] * (flat.dim() - 2)), side * side).expand_as(flat)
    return flat.gather(-1, index).view_as(x)
