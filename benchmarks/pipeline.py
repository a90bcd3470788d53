"""Is the data pipeline the bottleneck? Training images/s with data loading included vs pre-augmented.

Runs the real :class:`~episodic.engine.Trainer` twice on the same config:

- **pipeline**: batches come from the trainer's loader (:meth:`Trainer.make_loader`: gather the uint8
  images, move them, augment them per sample), then ``train_step``, the code path of ``fit``;
- **pre-augmented**: the same number of steps fed views that were augmented before the clock started
  (``train_step`` on ``[V, B, C, S, S]`` tensors), i.e. a data pipeline that costs nothing.

The two alternate step by step (so both see the same machine load) and the totals are reported with
the ratio ``pipeline / pre-augmented``; the target is >= 0.90. Both wall-clock and process-CPU-time
throughputs are printed: on a machine shared with other jobs the CPU-time figure is the steadier one
(it counts only this process's work, so it is meaningful for ``loader.workers=0``). Examples::

    python benchmarks/pipeline.py                                 # conv4 on CIFAR-10 npz, 256 images/step
    python benchmarks/pipeline.py --steps 10 data=digits batch_size=128
    python benchmarks/pipeline.py loader.augment=worker loader.workers=2

Positional arguments are Hydra overrides of ``configs/train.yaml``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from episodic.data.augment import multi_view  # noqa: E402
from episodic.engine import Trainer  # noqa: E402


def compose(overrides: list[str]) -> DictConfig:
    from episodic.cli import compose_config

    return compose_config("train", overrides)


def timed(fn: Callable[..., Any], *args: Any) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of ``fn(*args)``."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps of each variant")
    ap.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=digits batch_size=128")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.chdir(ROOT)  # configs/data/cifar10_npz.yaml reads ../shared/data relative to the project root
    overrides = [
        "data=cifar10_npz",
        "backbone=conv4",
        "batch_size=256",
        "device=cpu",
        "train.progress=false",
        *args.overrides,
    ]
    cfg = compose(overrides)
    run_dir = tempfile.mkdtemp()
    pipe, pre = Trainer(cfg, run_dir), Trainer(cfg, run_dir)
    n = args.warmup + args.steps
    # the pre-augmented trainer gets exactly the images the loader yields, augmented ahead of time
    loader = iter(pre.make_loader(0))
    views = []
    for _ in range(n):
        b = next(loader)
        views.append(
            b if b.dim() == 5 else multi_view(pre.augment, b.to(pre.device), pre.model.sampler.n_views, pre.generator)
        )
    print(
        f"config: data={cfg.data.name} backbone={cfg.backbone.name} batch={cfg.batch_size} "
        f"views={pre.model.sampler.n_views} head={cfg.head.name} task.augment={list(cfg.task.augment)} "
        f"loader.augment={cfg.loader.augment} workers={cfg.loader.workers} device={pipe.device} "
        f"torch threads={torch.get_num_threads()}"
    )
    batches = iter(pipe.make_loader(0))

    def pipeline_step() -> None:  # the code path of Trainer.fit: next batch from the loader, then a step
        pipe.train_step(next(batches))

    for i in range(args.warmup):
        pipeline_step()
        pre.train_step(views[i])
    wall, cpu = {"pipeline": 0.0, "pre": 0.0}, {"pipeline": 0.0, "pre": 0.0}
    for i in range(args.warmup, n):  # alternate step by step, so both variants see the same machine load
        for name, fn, arg in [("pipeline", pipeline_step, ()), ("pre", pre.train_step, (views[i],))]:
            w, c = timed(fn, *arg)
            wall[name] += w
            cpu[name] += c
    images = args.steps * int(cfg.batch_size)
    for what, t in [("wall clock", wall), ("CPU time of this process", cpu)]:
        a, b = images / t["pipeline"], images / t["pre"]
        print(
            f"{args.steps} steps ({what}): pipeline {a:.1f} img/s, pre-augmented {b:.1f} img/s, "
            f"ratio {a / b:.3f} ({'within' if a >= 0.9 * b else 'NOT within'} 10%)"
        )
    if cfg.loader.workers:
        print("note: with loader workers, their CPU time is not in this process's CPU time; compare wall clock")


if __name__ == "__main__":
    main()
