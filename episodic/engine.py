"""The one training loop: batch -> views -> episode -> (task augmentation) -> method + head -> step.

:class:`Trainer` builds everything from a config (datasets, encoder, head, method, optimiser),
runs ``train.steps`` optimizer steps with a progress bar and TensorBoard scalars, writes
checkpoints, and ends with the quick evaluation (:mod:`episodic.eval.quick`) of the trained encoder
and of a randomly initialised one of the same architecture.

Randomness: the data order of epoch ``e`` is a permutation seeded by ``(seed, e)`` and every
augmentation draw comes from the trainer's own generator, so a run is reproducible from its seed.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from tqdm import tqdm

from episodic import checkpoint
from episodic.data.augment import AugmentConfig, BatchAugment, multi_view
from episodic.data.datasets import ArrayDataset, Splits, build_dataset
from episodic.errors import EpisodicError, check
from episodic.heads.base import HEADS, Head, HeadOutput
from episodic.methods import METHODS, Method
from episodic.models import build_encoder
from episodic.optim import build_optimizer, build_scheduler
from episodic.tasks.episode import ViewSampler


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EpisodicError(f"device={name!r} is not available on this machine; use device=cpu or device=auto")
    return torch.device(name)


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


class EpisodicModel(nn.Module):
    """Everything that trains: the method (encoders) and the head, behind one ``forward``."""

    def __init__(self, method: Method, head: Head) -> None:
        super().__init__()
        self.method, self.head = method, head

    def forward(self, episode: Any) -> HeadOutput:
        return self.method(episode, self.head)


def _params(node: Any) -> dict[str, Any]:
    return dict(OmegaConf.to_container(node, resolve=True)) if node is not None else {}


def build_model(cfg: DictConfig) -> EpisodicModel:
    """Encoder, method and head from the config, initialised from ``cfg.seed`` (same seed, same weights)."""
    torch.manual_seed(cfg.seed)
    encoder = build_encoder(cfg.backbone.name, cfg.data.channels, _params(cfg.backbone.get("params")),
                            _params(cfg.backbone.get("projector")))
    method = METHODS.build(cfg.method.name, encoder=encoder, **_params(cfg.method.get("params")))
    head = HEADS.build(cfg.head.name, **_params(cfg.head.get("params")))
    return EpisodicModel(method, head)


def ssl_split(data: Splits, cfg: DictConfig) -> ArrayDataset:
    """The unlabeled training images: the train split restricted to ``data.ssl_classes``."""
    return data.train.with_classes(cfg.data.get("ssl_classes"))


@dataclass
class StepStats:
    loss: float
    acc: float


class Trainer:
    """Builds a run from ``cfg`` and trains it; ``run_dir`` receives every file the run writes."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.device = resolve_device(cfg.device)
        self.sampler = ViewSampler(cfg.n_supp, cfg.n_query, cfg.n_way)
        self.sampler.way(cfg.batch_size)  # fail early if n_way does not divide the batch
        self.data = build_dataset(cfg.data.name, **_params(cfg.data.get("params")))
        self.train_set = ssl_split(self.data, cfg)
        self.model = build_model(cfg).to(self.device)
        self.augment = BatchAugment(AugmentConfig(**_params(cfg.data.augment))).to(self.device)
        self.optimizer = build_optimizer(self.model, **_params(cfg.optim.optimizer))
        self.steps = int(cfg.train.steps)
        self.scheduler = build_scheduler(self.optimizer, self.steps, **_params(cfg.optim.schedule))
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed + 1)
        self.step = 0
        self.history: list[dict[str, float]] = []

    # ----------------------------------------------------------------- one step
    def train_step(self, images: Tensor) -> StepStats:
        """One optimizer step on a batch of uint8 images ``[B, C, H, W]``."""
        views = multi_view(self.augment, images.to(self.device, non_blocking=True), self.sampler.n_views,
                           self.generator)
        episode = self.sampler(views)
        out = self.model(episode)
        if not torch.isfinite(out.loss):
            raise EpisodicError(f"non-finite loss {out.loss.item()} at step {self.step} with head "
                                f"{self.cfg.head.name!r}; lower optim.optimizer.lr or check the data")
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.model.method.after_step(self.step, self.steps)
        with torch.no_grad():
            acc = (out.logits.argmax(-1) == episode.query_labels).float().mean()
        return StepStats(out.loss.detach(), acc)  # type: ignore[arg-type]

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])

    def save(self, name: str | None = None) -> Path:
        return checkpoint.save(self.state_dict(), self.run_dir / "checkpoints" / (name or f"step_{self.step:07d}.pt"))

    # ----------------------------------------------------------------- the loop
    def fit(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        cfg = self.cfg
        writer = SummaryWriter(str(self.run_dir / "tb"))
        batches = batch_indices(len(self.train_set), cfg.batch_size, cfg.seed, self.step)
        bar = tqdm(total=self.steps, initial=self.step, desc=f"train {cfg.head.name}", dynamic_ncols=True,
                   disable=not cfg.train.progress)
        self.model.train()
        t0, seen = time.perf_counter(), 0
        while self.step < self.steps:
            idx = next(batches)
            stats = self.train_step(self.train_set.images[idx])
            self.step += 1
            seen += len(idx)
            if self.step % cfg.train.log_every == 0 or self.step == self.steps:
                dt = time.perf_counter() - t0
                rec = {"step": self.step, "loss": float(stats.loss), "acc": float(stats.acc),
                       "lr": self.optimizer.param_groups[0]["lr"], "images_per_s": seen / max(dt, 1e-9)}
                self.history.append(rec)
                for k, v in rec.items():
                    if k != "step":
                        writer.add_scalar(f"train/{k}", v, self.step)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.2f}", img_s=f"{rec['images_per_s']:.0f}")
                t0, seen = time.perf_counter(), 0
            bar.update(1)
            if cfg.train.ckpt_every and self.step % cfg.train.ckpt_every == 0:
                self.save()
        bar.close()
        self.save("last.pt")
        writer.close()
        (self.run_dir / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.history))


def fmt_acc(r: dict[str, float]) -> str:
    return f"{r['mean']:.1f} ± {r['ci95']:.1f}" if not math.isnan(r["ci95"]) else f"{r['mean']:.1f}"
