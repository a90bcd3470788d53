"""Training batches: a ``DataLoader`` over whole batches with a deterministic, resumable order.

The order: step ``s`` is batch ``s % per_epoch`` of epoch ``s // per_epoch``, and epoch ``e`` is the
permutation ``order(e)`` (the trainer passes :func:`epoch_order`, seeded by ``(seed, e)``); the last
incomplete batch of an epoch is dropped. Under data parallelism
rank ``r`` of ``world_size`` takes the ``r``-th contiguous slice of every global batch.

Where augmentation runs (``loader.augment``):

- ``device`` (default): workers only gather ``uint8 [B, C, H, W]`` (pinned when training on CUDA);
  the trainer moves them with ``non_blocking=True`` and augments on the device with the trainer's
  generator (:class:`~episodic.data.augment.BatchAugment`);
- ``worker``: the same batched augmentation on the CPU inside the workers, returning float views
  ``[V, B, C, S, S]``; overlaps augmentation with training when the device is busy;
- ``pil``: the per-image torchvision pipeline (:func:`~episodic.data.augment.pil_transform`) in the
  workers, for datasets or transforms that need it.

In ``worker`` and ``pil`` mode the random stream of a batch is seeded from ``(seed, rank, step)``
(NumPy ``SeedSequence``), so the result does not depend on the number of workers, differs across
ranks, and resumes exactly from a step. Workers are forked once and kept (``persistent_workers``);
one item is one whole batch (a single tensor index, no per-image collation).
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from episodic.data.augment import AugmentConfig, BatchAugment, multi_view, pil_transform
from episodic.errors import check

__all__ = ["MODES", "BatchFetcher", "BatchLoader", "EpochBatchSampler", "batch_indices", "batch_seed", "epoch_order"]

MODES = ("device", "worker", "pil")


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The deterministic permutation of ``n`` indices for ``epoch``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_indices(n: int, batch_size: int, seed: int, start_step: int = 0) -> Iterator[Tensor]:
    """Endless drop-last batches of indices; step ``s`` is batch ``s % per_epoch`` of epoch ``s // per_epoch``."""
    per_epoch = n // batch_size
    check(per_epoch >= 1, f"batch_size={batch_size} is larger than the {n} training images; use a smaller batch")
    step = start_step
    while True:
        epoch, i = divmod(step, per_epoch)
        order = epoch_order(n, seed, epoch)
        for j in range(i, per_epoch):
            yield order[j * batch_size : (j + 1) * batch_size]
            step += 1


def batch_seed(seed: int, rank: int, step: int) -> int:
    """A well-mixed 63-bit seed for the augmentation of ``step`` on ``rank``."""
    return int(np.random.SeedSequence([int(seed), int(rank), int(step)]).generate_state(1, np.uint64)[0]) >> 1


class EpochBatchSampler(Sampler):
    """Yields ``(step, indices)`` for the batches of one epoch, from ``start`` (set by :meth:`set_epoch`)."""

    def __init__(
        self, n: int, batch_size: int, order: Callable[[int], Tensor], rank: int = 0, world_size: int = 1
    ) -> None:
        check(
            batch_size >= 1 and n // batch_size >= 1,
            f"batch_size={batch_size} is larger than the {n} training images; use a smaller batch",
        )
        check(
            batch_size % world_size == 0,
            f"batch_size={batch_size} is not divisible by the {world_size} processes; use a multiple",
        )
        check(0 <= rank < world_size, f"rank={rank} is outside 0..{world_size - 1}")
        self.n, self.batch_size, self.order = n, batch_size, order
        self.rank, self.world_size = rank, world_size
        self.per_epoch = n // batch_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.per_epoch - self.start

    def __iter__(self) -> Iterator[tuple[int, Tensor]]:
        perm = self.order(self.epoch)
        local = self.batch_size // self.world_size
        for j in range(self.start, self.per_epoch):
            batch = perm[j * self.batch_size : (j + 1) * self.batch_size]
            yield self.epoch * self.per_epoch + j, batch[self.rank * local : (self.rank + 1) * local]


class BatchFetcher(Dataset):
    """``fetcher[(step, indices)]`` -> one batch: uint8 images (``device``) or float views."""

    def __init__(
        self,
        images: Tensor,
        mode: str = "device",
        augment: AugmentConfig | None = None,
        n_views: int = 2,
        seed: int = 0,
        rank: int = 0,
    ) -> None:
        check(mode in MODES, f"loader.augment={mode!r} is not allowed; use one of {', '.join(MODES)}")
        self.images, self.mode, self.n_views, self.seed, self.rank = images, mode, n_views, seed, rank
        self.augment = BatchAugment(augment) if mode == "worker" else None
        self.pil = pil_transform(augment) if mode == "pil" else None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, Tensor]) -> Tensor:
        step, idx = key
        x = self.images[idx]
        if self.mode == "device":
            return x
        seed = batch_seed(self.seed, self.rank, step)
        if self.augment is not None:  # mode "worker"
            return multi_view(self.augment, x, self.n_views, torch.Generator().manual_seed(seed))
        return self._pil_views(x, seed)

    def _pil_views(self, x: Tensor, seed: int) -> Tensor:
        from PIL import Image

        assert self.pil is not None  # mode "pil"

        arrays = x.permute(0, 2, 3, 1).numpy()
        with torch.random.fork_rng(devices=[]):  # torchvision draws from the global torch RNG
            torch.manual_seed(seed)
            out = []
            for _ in range(self.n_views):
                imgs = [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arrays]
                out.append(torch.stack([self.pil(im) for im in imgs]))
        return torch.stack(out)


def _identity(batch: Tensor) -> Tensor:
    return batch


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers ignore SIGTERM and SIGINT sent to the whole process group (SLURM at a time limit,
    ``scancel``, Ctrl-C): the trainer finishes its step and writes its stop checkpoint, then its
    DataLoader shuts the workers down."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class BatchLoader:
    """Endless iterator over training batches from ``start_step`` on (see the module docstring).

    Args:
        images: uint8 ``[N, C, H, W]`` (shared with forked workers, not copied).
        batch_size: global batch size (images per step over all ranks).
        order: ``epoch -> permutation of range(N)``.
        mode: ``device``, ``worker`` or ``pil``; ``augment``/``n_views``/``seed`` feed the last two.
        workers, pin_memory, persistent_workers, prefetch: as ``torch.utils.data.DataLoader``
        (``persistent_workers``/``prefetch`` only matter with ``workers > 0``).
    """

    def __init__(
        self,
        images: Tensor,
        batch_size: int,
        order: Callable[[int], Tensor],
        *,
        mode: str = "device",
        augment: AugmentConfig | None = None,
        n_views: int = 2,
        seed: int = 0,
        workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        prefetch: int = 2,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
    ) -> None:
        check(isinstance(workers, int) and workers >= 0, f"loader.workers must be an int >= 0, got {workers!r}")
        check(isinstance(prefetch, int) and prefetch >= 1, f"loader.prefetch must be an int >= 1, got {prefetch!r}")
        self.sampler = EpochBatchSampler(len(images), batch_size, order, rank, world_size)
        self.fetcher = BatchFetcher(images, mode, augment, n_views, seed, rank)
        self.mode = mode
        extra: dict[str, Any] = {}
        if workers > 0:
            extra = dict(persistent_workers=bool(persistent_workers), prefetch_factor=prefetch)
        self.loader = DataLoader(
            self.fetcher,
            batch_size=None,
            sampler=self.sampler,
            num_workers=workers,
            pin_memory=pin_memory,
            worker_init_fn=ignore_stop_signals,
            collate_fn=_identity,  # type: ignore[arg-type]  # one item is a whole batch: nothing to collate
            generator=torch.Generator().manual_seed(seed),
            **extra,
        )  # not the global RNG
        self.step = start_step

    @property
    def per_epoch(self) -> int:
        return self.sampler.per_epoch

    def __iter__(self) -> Iterator[Tensor]:
        while True:
            epoch, start = divmod(self.step, self.per_epoch)
            self.sampler.set_epoch(epoch, start)
            for batch in self.loader:
                self.step += 1
                yield batch
