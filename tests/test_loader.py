"""The training data loader: deterministic resumable order, augmentation placement, workers,
pinning flags, per-rank slices, and images/s + data-wait logging in a real run."""

import itertools
import json
from pathlib import Path

import pytest
import torch

from episodic.config import validate
from episodic.data.augment import AugmentConfig, BatchAugment, multi_view
from episodic.data.loader import BatchLoader, EpochBatchSampler, batch_indices, batch_seed, epoch_order
from episodic.engine import Trainer
from episodic.errors import EpisodicError
from helpers import TINY, make_cfg

N, B = 23, 5  # 4 batches per epoch, 3 images dropped


def images(n: int = N, c: int = 3, size: int = 8) -> torch.Tensor:
    x = torch.randint(0, 256, (n, c, size, size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)  # pixel (0, 0, 0) is the image index
    return x


def order(seed: int = 3):
    return lambda e: epoch_order(N, seed, e)


def ids(batch: torch.Tensor) -> list[int]:
    return batch[:, 0, 0, 0].long().tolist()


def test_order_is_the_trainers_and_resumes_mid_epoch() -> None:
    x = images()
    expect = [b.tolist() for b in itertools.islice(batch_indices(N, B, 3), 11)]
    got = [ids(b) for b in itertools.islice(iter(BatchLoader(x, B, order())), 11)]
    assert got == expect  # step s = batch s % 4 of epoch s // 4, across epoch boundaries
    resumed = [ids(b) for b in itertools.islice(iter(BatchLoader(x, B, order(), start_step=6)), 5)]
    assert resumed == expect[6:11]
    assert all(len({i for b in expect[e * 4 : e * 4 + 4] for i in b}) == 20 for e in range(2))  # no repeats in an epoch


def test_workers_pinning_and_persistence_keep_the_order() -> None:
    x = images()
    base = [ids(b) for b in itertools.islice(iter(BatchLoader(x, B, order())), 9)]
    loader = BatchLoader(x, B, order(), workers=2, persistent_workers=True, prefetch=1)
    got = [ids(b) for b in itertools.islice(iter(loader), 9)]
    assert got == base
    assert loader.loader.persistent_workers and loader.loader.num_workers == 2
    assert loader.loader.pin_memory is False and BatchLoader(x, B, order(), pin_memory=True).loader.pin_memory


def test_rank_slices_cover_the_global_batch() -> None:
    x = images()
    full = [ids(b) for b in itertools.islice(iter(BatchLoader(x, 4, order())), 6)]
    r0 = [ids(b) for b in itertools.islice(iter(BatchLoader(x, 4, order(), rank=0, world_size=2)), 6)]
    r1 = [ids(b) for b in itertools.islice(iter(BatchLoader(x, 4, order(), rank=1, world_size=2)), 6)]
    assert [a + b for a, b in zip(r0, r1)] == full and all(len(a) == 2 for a in r0)
    with pytest.raises(EpisodicError, match="batch_size=5 is not divisible by the 2 processes"):
        EpochBatchSampler(N, 5, order(), rank=0, world_size=2)
    with pytest.raises(EpisodicError, match="batch_size=30 is larger than the 23 training images"):
        EpochBatchSampler(N, 30, order())


def test_worker_augmentation_is_seeded_per_step_not_per_worker() -> None:
    x, cfg = images(), AugmentConfig(size=6, blur_p=0.5, solarize_p=0.3)
    one = list(itertools.islice(iter(BatchLoader(x, B, order(), mode="worker", augment=cfg, n_views=3, seed=7)), 5))
    two = list(
        itertools.islice(iter(BatchLoader(x, B, order(), mode="worker", augment=cfg, n_views=3, seed=7, workers=2)), 5)
    )
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    assert one[0].shape == (3, B, 3, 6, 6) and one[0].dtype == torch.float32
    # batch s is multi_view of its images with a generator seeded by (seed, rank, step)
    idx = next(iter(batch_indices(N, B, 3, start_step=2)))
    ref = multi_view(BatchAugment(cfg), x[idx], 3, torch.Generator().manual_seed(batch_seed(7, 0, 2)))
    assert torch.equal(one[2], ref)
    assert not torch.equal(one[0][0], one[0][1])  # views are independent draws
    assert batch_seed(7, 0, 0) != batch_seed(7, 1, 0) and batch_seed(7, 0, 0) != batch_seed(7, 0, 1)  # ranks, steps


def test_pil_path_is_seeded_and_leaves_the_global_rng_alone() -> None:
    x = images(c=1)
    cfg = AugmentConfig(size=6, brightness=0.4, contrast=0.4, saturation=0.0, hue=0.0, gray_p=0.0)
    state = torch.get_rng_state()
    a = list(itertools.islice(iter(BatchLoader(x, B, order(), mode="pil", augment=cfg, n_views=2, seed=1)), 2))
    assert torch.equal(torch.get_rng_state(), state)
    b = list(itertools.islice(iter(BatchLoader(x, B, order(), mode="pil", augment=cfg, n_views=2, seed=1)), 2))
    assert a[0].shape == (2, B, 1, 6, 6) and all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[0][0], a[0][1])  # the two views are independent draws
    with pytest.raises(EpisodicError, match="loader.augment='gpu' is not allowed; use one of device, worker, pil"):
        BatchLoader(x, B, order(), mode="gpu")


def test_fit_uses_the_loader_and_logs_throughput(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_cfg(*TINY, "batch_size=16", "train.steps=2", "loader.workers=1", "loader.augment=worker")
    t = Trainer(cfg, tmp_path)
    assert not t.make_loader().loader.pin_memory  # auto: only when training on CUDA
    t.fit()
    hist = [json.loads(r) for r in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert hist[-1]["step"] == 2 and hist[-1]["images_per_s"] > 0 and 0 <= hist[-1]["data_wait"] <= 1
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert {"train/images_per_s", "train/data_wait", "train/loss"} <= set(acc.Tags()["scalars"])
    with pytest.raises(EpisodicError, match=r"unknown key loader.threads; allowed at loader: augment, "):
        validate(make_cfg(*TINY, "+loader.threads=2"))


def test_train_step_accepts_pre_augmented_views(tmp_path: Path) -> None:
    """Feeding the views a device-mode step would make gives the same step (same loss)."""
    cfg = make_cfg(*TINY, "batch_size=8")
    a, b = Trainer(cfg, tmp_path), Trainer(cfg, tmp_path)
    x = a.train_set.images[:8]
    views = multi_view(b.augment, x, 2, b.generator)
    la, lb = a.train_step(x).loss, b.train_step(views).loss
    assert float(la) == pytest.approx(float(lb), rel=1e-5)
