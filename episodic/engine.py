"""The one training loop: batches -> augmented views -> the model's step (:mod:`episodic.model`) -> update.

:class:`Trainer` builds a run from a config (data, model, optimiser, schedule, loader), runs
``train.steps`` optimizer steps with a progress bar and TensorBoard scalars, and writes checkpoints.
What happens inside a step (sampler, task augmentations, encoders, head) is the model's forward;
what watches the run from outside (the kNN monitor) is passed to :meth:`Trainer.fit` as a
:class:`Monitor`, so the loop imports no evaluation code.

Randomness: the data order of epoch ``e`` is a permutation seeded by ``(seed, e)`` and every
augmentation draw comes from the trainer's own generator, so a run is reproducible from its seed.

Scale and survival (docs/distributed.md): under ``torchrun`` (or SLURM via submitit) every process
takes its slice of the same global batch, the model is wrapped in DistributedDataParallel and
episodes span processes per ``task.scope`` (:mod:`episodic.tasks.scope`); only rank 0 logs and
writes. ``precision`` (bf16/fp16 autocast + GradScaler on CUDA), ``channels_last`` and
``optim.accu_iter`` (gradient accumulation over micro-batches) shape the step. Checkpoints hold
every piece of state (model with its buffers, optimizer, scheduler, scaler, data position, all RNG
streams of every rank), the newest ``train.keep_last`` are kept, and ``resume=auto|PATH`` continues
a run exactly. A non-finite loss stops the run naming the last good checkpoint (or skips the step,
``train.skip_nonfinite``); SIGTERM/SIGINT checkpoint and return cleanly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from tqdm import tqdm

from episodic import checkpoint, distributed
from episodic.config import as_dict, switch
from episodic.data.augment import AugmentConfig, BatchAugment, multi_view
from episodic.data.datasets import ArrayDataset, Splits, build_dataset, dataset_source
from episodic.data.loader import BatchLoader, epoch_order
from episodic.device import autocast, keep_freed_memory, resolve_device, resolve_precision, use_channels_last
from episodic.errors import EpisodicError, check
from episodic.files import writable_dir
from episodic.guard import Guard
from episodic.heads.histograms import log_scores
from episodic.model import EpisodicModel, StepOutput, build_model
from episodic.monitor import Monitor, Progress
from episodic.optim import build_optimizer, build_scheduler
from episodic.tasks.scope import plan_scope

log = logging.getLogger(__name__)


# what a checkpoint's model must share with the run that resumes it, in the order a mismatch is reported
STRUCTURE = (
    "backbone.name",
    "backbone.params",
    "backbone.projector",
    "data.channels",
    "head.name",
    "head.params",
    "method.name",
    "method.params",
    "variant",
    "task.augment",
    "sampler.name",
    "sampler.params",
)


def check_config(cfg: DictConfig) -> None:
    """What a run is built from, checked before any data is read (after :func:`episodic.config.validate`):
    the device, the dataset's parameters, the episode layout over ``WORLD_SIZE`` processes, and the model,
    optimiser and schedule built
    once on the meta device (every component's own checks, a variant against its head, a pairing against
    its head)."""
    protocol = cfg.eval.get("protocol")
    check(
        protocol is None,
        f"eval={protocol} is a protocol of python -m episodic.eval; training evaluates with eval=quick",
    )
    resolve_device(str(cfg.device))
    dataset_source(str(cfg.data.name), **as_dict(cfg.data.params))  # its parameters, nothing read
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    scope = plan_scope(str(cfg.task.scope), cfg.n_way, int(cfg.batch_size), world, 0, int(cfg.optim.accu_iter))
    with torch.device("meta"):
        model = build_model(cfg, scope)
        optimizer = build_optimizer(model, **as_dict(cfg.optim.optimizer))
        size, channels = int(cfg.data.augment.size), int(cfg.data.channels)
        try:  # shapes only, no arithmetic: a backbone too deep for the views fails here, not at step 1
            model.encoder(torch.empty(2, channels, size, size))
        except RuntimeError as e:
            raise EpisodicError(
                f"backbone={cfg.backbone.name} cannot embed {channels}x{size}x{size} views "
                f"(data.augment.size={size}, data.channels={channels}): "
                f"{str(e).splitlines()[0]}"
            ) from None
    build_scheduler(optimizer, int(cfg.train.steps), **as_dict(cfg.optim.schedule))


def check_images(data: Splits, cfg: DictConfig) -> None:
    """The loaded images fit the run: ``data.channels``, and a backbone that embeds them whole (evaluation
    feeds it unaugmented images); shapes only, on the meta device."""
    with torch.device("meta"):
        encoder = build_model(cfg).encoder
    for split in ("train", "test"):
        images: Tensor = getattr(data, split).images
        if not len(images):
            continue
        check(
            images.shape[1] == int(cfg.data.channels),
            f"data={cfg.data.name} holds {images.shape[1]}-channel images but data.channels={cfg.data.channels}; "
            f"set data.channels={images.shape[1]}",
        )
        try:
            encoder(torch.empty(2, *images.shape[1:], device="meta"))
        except RuntimeError as e:
            size = "x".join(map(str, images.shape[1:]))
            raise EpisodicError(
                f"backbone={cfg.backbone.name} cannot embed the {size} {split} images of data={cfg.data.name} "
                f"(evaluation feeds them whole): {str(e).splitlines()[0]}; use larger images "
                "(data.params.image_size) or a shallower backbone"
            ) from None


def ssl_split(data: Splits, cfg: DictConfig) -> ArrayDataset:
    """The unlabeled training images: the train split restricted to ``data.ssl_classes``."""
    return data.train.with_classes(cfg.data.get("ssl_classes"))


class _NullWriter:
    """Stands in for the TensorBoard writer on ranks > 0: every call does nothing."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


@dataclass
class StepStats:
    """One optimizer step (device tensors, nothing read to the host): the mean loss over its micro-batches,
    whether each query was classified correctly (``correct``, bool), and ``bad`` (1.0 when the loss or a
    gradient was non-finite)."""

    loss: Tensor
    correct: Tensor
    bad: Tensor

    @property
    def acc(self) -> Tensor:
        """The query accuracy (a 0-d device tensor; computed when asked, not in the step)."""
        return self.correct.mean(dtype=torch.float32)


class Trainer:
    """Builds a run from ``cfg`` and trains it; ``run_dir`` receives every file the run writes."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.dist = distributed.init_from_env(resolve_device(cfg.device))  # torchrun/SLURM env, or 1 process
        self.device = self.dist.device
        if self.device.type == "cpu":  # on a GPU the caching allocator does this for the large buffers
            keep_freed_memory()
        self.scope = plan_scope(
            str(cfg.task.scope),
            cfg.n_way,
            int(cfg.batch_size),
            self.dist.world_size,
            self.dist.rank,
            int(cfg.optim.accu_iter),
        )
        self.accu_iter = self.scope.accu_iter  # micro-batches per optimizer step
        self.data = build_dataset(cfg.data.name, **as_dict(cfg.data.get("params")))
        self.train_set = ssl_split(self.data, cfg)
        self.model: EpisodicModel = build_model(cfg, self.scope).to(self.device)
        check_images(self.data, cfg)
        self.model, self.sync_bn = distributed.convert_sync_batchnorm(self.model, str(cfg.sync_bn), self.dist)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.channels_last = bool(cfg.channels_last)
        if self.channels_last:
            use_channels_last(self.model)
        self.train_model: nn.Module = self.model  # what train_step calls: DDP wrapper under several processes
        if self.dist.enabled:
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=bool(cfg.train.find_unused_parameters),
            )
        if cfg.train.compile:  # the model's forward (sampler to loss) as compiled graphs; the backward too
            self.train_model = torch.compile(self.train_model)  # type: ignore[assignment]  # an nn.Module wrapper
        self.augment = BatchAugment(AugmentConfig(**as_dict(cfg.data.augment)), self.channels_last).to(self.device)
        self.optimizer = build_optimizer(self.model, **as_dict(cfg.optim.optimizer))
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.steps = int(cfg.train.steps)
        self.scheduler = build_scheduler(self.optimizer, self.steps, **as_dict(cfg.optim.schedule))
        # fp16 needs loss scaling; bf16 and float32 do not (the scaler is then a pass-through)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == torch.float16)
        # CPU generator (BatchAugment draws on the CPU); per-rank seeds, rank 0 keeps cfg.seed
        self.generator = torch.Generator().manual_seed(distributed.rank_seed(cfg.seed, self.dist.rank))
        torch.manual_seed(distributed.rank_seed(cfg.seed + 1, self.dist.rank))
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.guard = Guard(
            self.model,
            self.device,
            bool(cfg.train.skip_nonfinite),
            int(cfg.train.max_skips),
            int(cfg.train.log_every),
            lambda: f"head={cfg.head.name}",
        )
        self.last_checkpoint: Path | None = None
        self.monitors: list[Monitor] = []  # given to fit(); their state is checkpointed
        self.monitor_states: dict[str, dict[str, Any]] = {}  # a resumed checkpoint's, by monitor name
        if self.dist.is_main:  # a file named checkpoints, no permission, a read-only disk: now, not at step 100
            writable_dir(self.run_dir / "checkpoints", "checkpoints folder")
        self._signal: str | None = None  # set by the SIGTERM/SIGINT handler of this process
        self.stop_requested: str | None = None  # the signal, once every process has agreed to stop
        if self.dist.is_main:
            log.info(self.scope.describe())
            if self.accu_iter > 1 and cfg.n_way is None:
                log.warning(
                    "optim.accu_iter=%d with n_way=null: each micro-batch of %d images is one "
                    "%d-way episode, a different task from the %d-way episode of batch_size=%d; set "
                    "n_way to a divisor of %d for accumulation equivalent to the larger batch "
                    "(docs/distributed.md)",
                    self.accu_iter,
                    self.scope.n_way,
                    self.scope.n_way,
                    cfg.batch_size,
                    cfg.batch_size,
                    self.scope.n_way,
                )
        self.resume(cfg.resume)

    # ----------------------------------------------------------------- one step
    def train_step(self, images: Tensor) -> StepStats:
        """One optimizer step on this process's share of the batch: ``optim.accu_iter`` micro-batches
        (forward + backward each, gradients accumulated; DDP syncs on the last one only), one update.

        ``images``: uint8 ``[B, C, H, W]`` or augmented views ``[V, B, C, S, S]`` (see :meth:`micro_step`).
        A non-finite loss or gradient gates the update on the device and is acted on by the guard
        (:mod:`episodic.guard`); nothing here waits for the host.
        """
        self.optimizer.zero_grad(set_to_none=True)
        before = self.guard.snapshot()
        chunks = images.chunk(self.accu_iter, dim=1 if images.dim() == 5 else 0)
        parts = [self.micro_step(chunk, last=i == len(chunks) - 1) for i, chunk in enumerate(chunks)]
        loss = parts[0][0] if len(parts) == 1 else torch.stack([p[0] for p in parts]).mean()
        correct = parts[0][1] if len(parts) == 1 else torch.cat([p[1].reshape(-1) for p in parts])
        if self.scaler.is_enabled():  # fp16: the scaler finds inf gradients and skips the update itself
            self.scaler.step(self.optimizer)
            self.scaler.update()
            bad = (~torch.isfinite(loss)).float()
        else:
            bad = self.guard.found_inf(self.step + 1, loss, self.params, self.last_good)
            self.optimizer.found_inf = bad  # type: ignore[attr-defined]  # read by the fused kernels and LARS
            self.optimizer.step()
        self.scheduler.step()
        if not self.guard.record(self.step + 1, loss, correct, bad, before, self.last_good):
            self.model.method.after_step(self.step, self.steps)  # momentum encoders follow the update
        return StepStats(loss, correct, bad)

    def micro_step(self, images: Tensor, last: bool = True) -> tuple[Tensor, Tensor]:
        """Forward and backward of one micro-batch: uint8 images ``[b, C, H, W]`` (augmented here, on
        the device), or views ``[V, b, C, S, S]`` augmented already (``loader.augment=worker|pil``,
        pre-augmented data). The loss is divided by ``accu_iter`` so accumulated gradients are the mean.
        Returns the detached loss and whether each query was classified correctly (device tensors; the
        accuracy's mean is taken when it is logged, one reduction a log window instead of one a step)."""
        x = images.to(self.device, non_blocking=True)
        views = x if x.dim() == 5 else multi_view(self.augment, x, self.model.sampler.n_views, self.generator)
        model = self.train_model
        ddp = nn.parallel.DistributedDataParallel
        sync = model.no_sync() if isinstance(model, ddp) and not last else contextlib.nullcontext()
        with sync:  # DDP all-reduces gradients only in the last micro-batch's backward
            with autocast(self.precision):
                out: StepOutput = self.train_model(views, self.generator, self.step, self.steps)
            loss = out.loss.float()
            self.scaler.scale(loss if self.accu_iter == 1 else loss / self.accu_iter).backward()
        with torch.no_grad():
            correct = out.logits.argmax(-1) == out.query_labels
        self.last_scores = (out.logits.detach(), out.query_labels, out.extras)  # for log_scores
        return loss.detach(), correct

    def last_good(self) -> str:
        """The newest checkpoint written (each one was checked finite), for messages."""
        return str(self.last_checkpoint) if self.last_checkpoint is not None else "none written yet"

    def make_loader(self, start_step: int = 0) -> BatchLoader:
        """Training batches from ``start_step`` on, per the ``loader`` config (:mod:`episodic.data.loader`)."""
        lc = self.cfg.loader
        pin = switch(lc.pin_memory, "loader.pin_memory")
        n, seed = len(self.train_set), int(self.cfg.seed)
        return BatchLoader(
            self.train_set.images,
            int(self.cfg.batch_size),
            lambda e: epoch_order(n, seed, e),
            mode=str(lc.augment),
            augment=self.augment.cfg,
            n_views=self.model.sampler.n_views,
            seed=seed,
            workers=int(lc.workers),
            pin_memory=self.device.type == "cuda" if pin == "auto" else pin == "true",
            persistent_workers=bool(lc.persistent_workers),
            prefetch=int(lc.prefetch),
            start_step=start_step,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs. Collective under DDP (every rank's RNG states are gathered),
        so every process calls it; model and optimizer are the same on all ranks."""
        return {
            "step": self.step,
            "model": self.model.state_dict(),  # includes buffers: BN statistics, queues, momentum encoders
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            # every random stream of every rank (a list in rank order)
            "rng": distributed.all_gather_object(checkpoint.rng_state(self.generator, self.device)),
            "data_order": self.data_order(),
            "history": list(self.history),
            "skipped": self.guard.skipped,
            "world_size": self.dist.world_size,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            # the monitors' own state (the online probe's weights); the ones not given to fit() are kept
            "monitors": {**self.monitor_states, **{m.name: m.state_dict() for m in self.monitors}},
        }

    def data_order(self) -> dict[str, int]:
        """The data order's position: step ``s`` is batch ``s % per_epoch`` of epoch ``s // per_epoch``."""
        return {
            "step": self.step,
            "seed": int(self.cfg.seed),
            "batch_size": int(self.cfg.batch_size),
            "n_images": len(self.train_set),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        rngs = state.get("rng")
        if rngs and len(rngs) == self.dist.world_size:
            checkpoint.set_rng_state(rngs[self.dist.rank], self.generator, self.device)
        elif self.dist.world_size == 1 and "generator" in state:
            self.generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
        else:  # a different number of processes: the data order continues, the random streams restart
            seed = distributed.rank_seed(int(self.cfg.seed) + int(state["step"]), self.dist.rank)
            self.generator.manual_seed(seed)
            torch.manual_seed(seed + 1)
            if self.dist.is_main:
                log.warning(
                    "checkpoint written by %s processes, resumed on %d: augmentation RNG streams "
                    "re-seeded from (seed, rank, step)",
                    len(rngs) if rngs else "?",
                    self.dist.world_size,
                )
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        self.guard.skipped = int(state.get("skipped", 0))
        self.monitor_states = dict(state.get("monitors", {}))

    def save(self, name: str | None = None) -> Path:
        """Write a checkpoint atomically (rank 0 writes; every rank must call this) and keep only the
        newest ``train.keep_last`` numbered ones."""
        self.guard.check(self.step, self.last_good)  # nothing non-finite is written: stop first
        state = self.state_dict()
        path = self.run_dir / "checkpoints" / (name or f"step_{self.step:07d}.pt")
        if self.dist.is_main:
            checkpoint.save(state, path)
            checkpoint.prune(path.parent, int(self.cfg.train.keep_last))
        self.last_checkpoint = path
        return path

    def resume(self, spec: Any) -> Path | None:
        """Apply ``resume``: ``null`` (start fresh), ``auto`` (the newest valid checkpoint in this run's
        ``checkpoints/``, none: start fresh) or a path (a checkpoint file, or a run directory whose newest
        valid checkpoint is taken). A corrupt checkpoint is skipped with a warning; one named explicitly
        is an error. Rank 0 chooses, every rank loads the same file."""
        if spec is None or str(spec).lower() in ("null", "none", "false", ""):
            return None
        spec = str(spec)
        target = self.run_dir if spec == "auto" else Path(spec).expanduser()
        if spec != "auto" and not target.exists():
            raise EpisodicError(
                f"resume={spec!r}: no such file or directory; give a checkpoint (.pt), a run directory, auto or null"
            )
        path: Path | None = target if target.is_file() else None
        state: dict[str, Any] | None = None
        if path is None and self.dist.is_main:
            found = checkpoint.newest_valid(target)
            path, state = found if found is not None else (None, None)
        path = distributed.broadcast_object(path)
        if path is None:
            # only auto may start fresh: a path that holds no checkpoint is a mistake worth a line
            check(
                spec == "auto",
                f"resume={spec!r}: no valid checkpoint in that folder; give a checkpoint (.pt), "
                "a run directory with checkpoints/, auto or null",
            )
            if self.dist.is_main:
                log.info("resume=auto: no checkpoint in %s, starting from step 0", target)
            return None
        state = state if state is not None else checkpoint.load(path)
        self.check_compatible(state, path)
        self.load_state_dict(state)
        self.current_optimisation(state.get("config") or {})
        self.last_checkpoint = path
        if self.dist.is_main:
            log.info("resumed from %s at step %d", path, self.step)
        return path

    def check_compatible(self, state: dict[str, Any], path: Path) -> None:
        """Refuse a checkpoint this run cannot continue, with one line: another data order (seed, batch,
        dataset), a step beyond ``train.steps``, or a model of another structure (naming what differs)."""
        old, new = state.get("data_order") or {}, self.data_order()
        for key in ("seed", "batch_size", "n_images"):
            if key in old and old[key] != new[key]:
                raise EpisodicError(
                    f"checkpoint '{path}' was written with {key}={old[key]}, this run has "
                    f"{new[key]}; resume with the same seed, batch_size and data, or "
                    f"resume=null"
                )
        step = int(state["step"])
        check(
            step <= self.steps,
            f"checkpoint '{path}' is at step {step} but train.steps={self.steps}; set "
            f"train.steps >= {step} to continue it, or resume=null to start over",
        )
        problem = checkpoint.state_mismatch(self.model.state_dict(), state["model"])
        if problem is None:
            return
        saved = OmegaConf.create(state.get("config") or {})
        for key in STRUCTURE:
            a, b = OmegaConf.select(saved, key, default=None), OmegaConf.select(self.cfg, key, default=None)
            a = OmegaConf.to_container(a) if OmegaConf.is_config(a) else a
            b = OmegaConf.to_container(b) if OmegaConf.is_config(b) else b
            if a != b:
                raise EpisodicError(
                    f"checkpoint '{path}' was trained with {key}={a} but this run has {key}={b}; "
                    f"resume with the same {key}, or resume=null"
                )
        raise EpisodicError(f"checkpoint '{path}' does not fit this model: {problem}; resume=null starts over")

    def current_optimisation(self, saved: dict[str, Any]) -> None:
        """After a resume, this run's optimiser settings and schedule win over the checkpoint's (a lower
        learning rate after a divergence, a longer run): one line says what changed."""
        fresh = build_optimizer(self.model, **as_dict(self.cfg.optim.optimizer))
        for group, new in zip(self.optimizer.param_groups, fresh.param_groups):
            group.update({k: v for k, v in new.items() if k != "params"}, initial_lr=new["lr"])
        self.scheduler = build_scheduler(self.optimizer, self.steps, **as_dict(self.cfg.optim.schedule))
        self.scheduler.last_epoch = self.step
        lrs = [base * lam(self.step) for base, lam in zip(self.scheduler.base_lrs, self.scheduler.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.scheduler._last_lr = lrs  # what get_last_lr() returns
        before = OmegaConf.create(saved)
        changed = []
        for key in ("optim.optimizer", "optim.schedule", "train.steps"):
            a, b = OmegaConf.select(before, key, default=None), OmegaConf.select(self.cfg, key, default=None)
            if OmegaConf.is_config(a) and OmegaConf.is_config(b):
                for k in sorted(set(a) | set(b)):
                    if a.get(k) != b.get(k):
                        changed.append(f"{key}.{k} {a.get(k)} -> {b.get(k)}")
            elif a != b and a is not None:
                changed.append(f"{key} {a} -> {b}")
        if changed and self.dist.is_main:
            log.warning("resumed with this run's settings, not the checkpoint's: %s", ", ".join(changed))

    # ----------------------------------------------------------------- the loop
    def fit(self, monitors: Sequence[Monitor] = ()) -> None:
        """Train from ``self.step`` to ``train.steps``, calling each monitor after every step (its time
        is not counted as training time). SIGTERM/SIGINT (what SLURM sends before a kill; Ctrl-C) make
        every process finish its step, write a checkpoint and return with ``stop_requested`` set; a
        second SIGINT interrupts at once."""
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for sig in previous:
                signal.signal(sig, self._on_signal)
        except ValueError:  # not the main thread: no handlers, the loop still checks the flag
            previous = {}
        self.monitors = list(monitors)
        for m in self.monitors:
            m.load_state_dict(self.monitor_states.get(m.name, {}))
        try:
            self._fit(monitors)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._signal = signal.Signals(signum).name

    def _fit(self, monitors: Sequence[Monitor]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        cfg = self.cfg
        # only rank 0 writes; on the others the writer swallows every call. purge_step drops the events
        # a killed run logged after the checkpoint this run resumed from
        writer = (
            SummaryWriter(str(self.run_dir / "tb"), purge_step=self.step or None)
            if self.dist.is_main
            else _NullWriter()
        )
        batches = iter(self.make_loader(self.step))
        bar = tqdm(
            total=self.steps,
            initial=self.step,
            desc=f"train {cfg.head.name}",
            dynamic_ncols=True,
            disable=not (cfg.train.progress and self.dist.is_main),
        )
        self.model.train()
        t0, seen, wait = time.perf_counter(), 0, 0.0
        skipped_before = self.guard.skipped
        while self.step < self.steps:
            t_wait = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - t_wait
            self.train_step(batch)  # its loss, accuracy and flag stay on the device, in the guard
            self.step += 1
            seen += (batch.shape[0] if batch.dim() == 4 else batch.shape[1]) * self.dist.world_size
            if self.step % cfg.train.log_every == 0 or self.step == self.steps:
                self.guard.check(self.step, self.last_good)  # the host reads the flags here, not every step
                rows = self.guard.take()  # flag, loss, accuracy of each step since the last record
                dt = time.perf_counter() - t0
                mean = distributed.reduce_metrics({"loss": rows[:, 1].mean(), "acc": rows[:, 2].mean()}, self.device)
                rec = {
                    "step": self.step,
                    "loss": mean["loss"],  # mean over the steps since the last record (and over processes)
                    "acc": mean["acc"],
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "images_per_s": seen / max(dt, 1e-9),
                    "data_wait": wait / max(dt, 1e-9),  # share of the time spent waiting for batches
                    "skipped": self.guard.skipped - skipped_before,  # non-finite steps skipped since the last
                    **self.model.head.diagnostics(),  # the last step's, on this process (the SVM's solver)
                }
                self.history.append(rec)
                for k, v in rec.items():
                    if k != "step":
                        writer.add_scalar(f"train/{k}", v, self.step)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.2f}", img_s=f"{rec['images_per_s']:.0f}")
                t0, seen, wait, skipped_before = time.perf_counter(), 0, 0.0, self.guard.skipped
            if cfg.train.hist_every and self.step % cfg.train.hist_every == 0:
                log_scores(writer, *self.last_scores, self.step)  # score histograms (episodic/heads/histograms.py)
            bar.update(1)
            t_mon = time.perf_counter()
            for monitor in monitors:
                monitor.after_step(Progress(self.step, self.steps, self.model, self.data, self.device, writer, bar))
            t0 += time.perf_counter() - t_mon  # seconds spent evaluating: not training time
            self.stop_requested = distributed.any_rank_flag(self._signal) or self.stop_requested
            if self.stop_requested is not None:  # agreed by every process in this step
                break
            if cfg.train.ckpt_every and self.step % cfg.train.ckpt_every == 0:
                self.save()
        bar.close()
        if self.stop_requested is not None:
            self.save()
            if self.dist.is_main:
                log.warning(
                    "%s: stopped after step %d of %d, checkpoint %s",
                    self.stop_requested,
                    self.step,
                    self.steps,
                    self.last_checkpoint,
                )
        else:
            self.save("last.pt")
        writer.close()
        if self.dist.is_main:
            (self.run_dir / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.history))
