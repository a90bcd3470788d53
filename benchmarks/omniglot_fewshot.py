"""Unsupervised few-shot Omniglot on the standard protocol: train any configuration on a budget, then test.

    python benchmarks/omniglot_fewshot.py --steps 600 --out runs/omniglot/r2d2 head=r2d2
    python benchmarks/omniglot_fewshot.py --seconds 1800 --out runs/omniglot/best head=r2d2 n_query=3
    python benchmarks/omniglot_fewshot.py --steps 300 --eval-split val head=protonet     # model selection

Everything after the options is a Hydra override of ``configs/train.yaml`` (``head=r2d2``,
``task.augment=[rotate]``, ``variant=debiased``, ``optim.optimizer.lr=0.05``, ...); the defaults
``data=omniglot backbone=conv4`` come first, so they can be overridden too.

Training: the trainer's own ``train_step`` (augment -> episode -> head -> step) on the unlabeled
Omniglot train characters, until the step budget (``--steps``), the wall-clock budget (``--seconds``)
or the process CPU-time budget (``--cpu-seconds``, all threads; steadier than wall-clock on a shared
machine) runs out, whichever comes first; only training steps count (not data loading, not evaluation).
The learning rate follows the config's warm-up + cosine schedule over the budget: after
``warmup_steps`` the cosine position is the largest fraction of any budget used, so a step-only budget
gives exactly the schedule of ``python -m episodic.train train.steps=N`` and a time budget decays to
the final rate when the time is up.

Protocol (UMTRA, CACTUs, Meta-GMVAE, PsCo): frozen backbone features of the 423 Vinyals test characters
x 4 rotations (1,692 classes, 28x28), ProtoNet with cosine similarity, 5-way and 20-way, 1-shot and
5-shot, 15 queries per class, 2,000 seeded episodes (the same episodes for every run), mean accuracy
and 95% interval ``1.96 std / sqrt(episodes)``. The random-init encoder (the same architecture and
seed, i.e. the trained encoder's starting point) is evaluated once and cached.

Writes ``OUT/result.json`` (config, overrides, budget, steps, train seconds and process CPU seconds,
the accuracies, the random-init accuracies, the training curve), ``OUT/row.md`` (one markdown table row)
and ``OUT/checkpoints/last.pt``. ``--curve N`` also evaluates 5-way 1-shot (``--curve-episodes``) at N
evenly spaced points of the budget (not counted in the budget).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from episodic.cli import compose_config, run_or_fail, validate_overrides
from episodic.errors import check

DEFAULTS = ["data=omniglot", "backbone=conv4", "train.progress=false"]
SETTINGS = [(5, 1), (5, 5), (20, 1), (20, 5)]
UMTRA = {"5way1shot": 83.8, "5way5shot": 95.4, "20way1shot": 74.3, "20way5shot": 92.1}
ROW_HEADER = (
    "| run | overrides | steps | train s | 5-way 1-shot | 5-way 5-shot | 20-way 1-shot "
    "| 20-way 5-shot |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|"
)


def key(way: int, shot: int) -> str:
    return f"{way}way{shot}shot"


def compose(overrides: Sequence[str]) -> DictConfig:
    """The training config with :data:`DEFAULTS` then ``overrides`` (one-line error on a bad override)."""
    validate_overrides("train", [*DEFAULTS, *overrides])
    return compose_config("train", [*DEFAULTS, *overrides])


# ------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    backbone: nn.Module,
    cfg: DictConfig,
    images: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    episodes: int,
    seed: int = 0,
    settings: Sequence[tuple[int, int]] = SETTINGS,
    queries: int = 15,
) -> dict[str, dict[str, float]]:
    """Few-shot accuracy (%) of a frozen ``backbone``: ProtoNet (cosine) over seeded episodes."""
    from episodic.eval.features import extract_features
    from episodic.eval.fewshot import fewshot_accuracy
    from episodic.heads.protonet import ProtoNetHead

    aug = cfg.data.augment
    feats = extract_features(backbone, images, device=device, mean=aug.get("mean"), std=aug.get("std"))
    head = ProtoNetHead(temperature=1.0, metric="cosine")
    out = {}
    for way, shot in settings:
        r = fewshot_accuracy(feats, labels, head, way, shot, queries, episodes, seed=seed)
        out[key(way, shot)] = {"mean": r.mean, "ci95": r.ci95}
    return out


def random_init_result(
    cfg: DictConfig, images: torch.Tensor, labels: torch.Tensor, device: torch.device, episodes: int, cache_dir: Path
) -> dict[str, Any]:
    """The random-init encoder's accuracies, computed once per (backbone, data, seed, episodes) and cached."""
    from episodic.model import build_model

    ident = json.dumps(
        {
            "backbone": OmegaConf.to_container(cfg.backbone, resolve=True),
            "data": OmegaConf.to_container(cfg.data.params, resolve=True),
            "channels": cfg.data.channels,
            "seed": cfg.seed,
            "episodes": episodes,
            "n": len(labels),
        },
        sort_keys=True,
    )
    path = cache_dir / f"random_init_{hashlib.sha1(ident.encode()).hexdigest()[:12]}.json"
    if path.exists():
        return json.loads(path.read_text())["fewshot"]
    backbone = build_model(cfg).backbone.to(device)
    res = evaluate(backbone, cfg, images, labels, device, episodes)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # parallel runs may compute the same entry
    tmp.write_text(json.dumps({"identity": json.loads(ident), "fewshot": res}, indent=1))
    tmp.replace(path)
    return res


# ------------------------------------------------------------------------------------------- training
class Budget:
    """Progress through a step and/or wall-clock budget, and the LR multiplier that follows it."""

    def __init__(
        self,
        steps: int | None,
        seconds: float | None,
        warmup: int,
        final_ratio: float,
        cpu_seconds: float | None = None,
    ) -> None:
        check(
            steps is not None or seconds is not None or cpu_seconds is not None,
            "give a budget: --steps N, --seconds S and/or --cpu-seconds C",
        )
        check(steps is None or steps >= 1, f"--steps {steps} is not allowed; use an integer >= 1")
        check(seconds is None or seconds > 0, f"--seconds {seconds} is not allowed; use a value > 0")
        check(cpu_seconds is None or cpu_seconds > 0, f"--cpu-seconds {cpu_seconds} is not allowed; use a value > 0")
        self.steps, self.seconds, self.cpu_seconds = steps, seconds, cpu_seconds
        self.warmup, self.final_ratio = int(warmup), float(final_ratio)
        self.elapsed = 0.0  # wall-clock seconds of the training steps so far
        self.cpu = 0.0  # process CPU seconds of the training steps so far

    def _time_fraction(self) -> float:
        t = 0.0
        if self.seconds is not None:
            t = max(t, self.elapsed / self.seconds)
        if self.cpu_seconds is not None:
            t = max(t, self.cpu / self.cpu_seconds)
        return t

    def progress(self, step: int) -> float:
        """Fraction of the budget used after ``step`` steps and the time so far (the max over the budgets)."""
        p = self._time_fraction()
        if self.steps is not None:
            p = max(p, step / self.steps)
        return p

    def done(self, step: int) -> bool:
        return self.progress(step) >= 1.0

    def lr_factor(self, step: int) -> float:
        """Warm-up for ``warmup`` steps, then cosine from 1 to ``final_ratio`` over the rest of the budget."""
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        t = self._time_fraction()
        if self.steps is not None:
            t = max(t, (step - self.warmup) / max(1, self.steps - self.warmup))
        t = min(1.0, t)
        return self.final_ratio + (1 - self.final_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from episodic.data.loader import batch_indices
    from episodic.engine import Trainer

    overrides = list(args.overrides)
    if args.eval_split != "test":
        overrides.append(f"data.params.eval_split={args.eval_split}")
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    cfg = compose(overrides)
    check(cfg.data.name == "omniglot", f"this benchmark is the Omniglot protocol; got data={cfg.data.name}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)

    t_setup = time.perf_counter()
    trainer = Trainer(cfg, out)
    test = trainer.data.test
    sched = OmegaConf.to_container(cfg.optim.schedule, resolve=True)
    check(
        sched.get("schedule", "cosine") == "cosine",
        f"this benchmark drives a warm-up + cosine schedule; got optim.schedule.schedule={sched.get('schedule')!r}",
    )
    budget = Budget(
        args.steps, args.seconds, sched.get("warmup_steps", 0), sched.get("final_ratio", 0.0), args.cpu_seconds
    )
    trainer.scheduler = LambdaLR(trainer.optimizer, budget.lr_factor)
    setup_seconds = time.perf_counter() - t_setup

    curve_at = [i / args.curve for i in range(1, args.curve)] if args.curve > 1 else []
    curve: list[dict[str, Any]] = []
    history: list[dict[str, float]] = []
    backbone = trainer.model.backbone
    if hasattr(trainer, "make_loader"):  # the engine's loader (uint8 batches, or views augmented by workers)
        batches = iter(trainer.make_loader())
    else:
        order = batch_indices(len(trainer.train_set), cfg.batch_size, cfg.seed)
        batches = (trainer.train_set.images[i] for i in order)
    trainer.model.train()
    while not budget.done(trainer.step):
        t0, c0 = time.perf_counter(), time.process_time()
        images = next(batches)
        # the momentum schedule of moco/byol needs a total: the step budget, or the estimate from the time used
        p = budget.progress(trainer.step)
        trainer.steps = args.steps or max(trainer.step + 1, round(trainer.step / p) if p > 0 else 10**6)
        stats = trainer.train_step(images)
        trainer.step += 1
        budget.elapsed += time.perf_counter() - t0
        budget.cpu += time.process_time() - c0
        if trainer.step % cfg.train.log_every == 0 or budget.done(trainer.step):
            history.append(
                {
                    "step": trainer.step,
                    "seconds": round(budget.elapsed, 2),
                    "cpu_seconds": round(budget.cpu, 2),
                    "loss": float(stats.loss),
                    "acc": float(stats.acc),
                    "lr": trainer.optimizer.param_groups[0]["lr"],
                }
            )
            if args.verbose:
                print(json.dumps(history[-1]), flush=True)
        while curve_at and budget.progress(trainer.step) >= curve_at[0] and not budget.done(trainer.step):
            curve_at.pop(0)
            r = evaluate(
                backbone, cfg, test.images, test.labels, trainer.device, args.curve_episodes, settings=[(5, 1)]
            )
            curve.append({"step": trainer.step, "seconds": round(budget.elapsed, 2), "5way1shot": r["5way1shot"]})
            if args.verbose:
                print(json.dumps(curve[-1]), flush=True)
    trainer.save("last.pt")

    t_eval = time.perf_counter()
    trained = evaluate(backbone, cfg, test.images, test.labels, trainer.device, args.episodes)
    curve.append({"step": trainer.step, "seconds": round(budget.elapsed, 2), "5way1shot": trained["5way1shot"]})
    baseline = random_init_result(
        cfg, test.images, test.labels, trainer.device, args.episodes, Path(args.random_init_cache)
    )
    result = {
        "name": args.name or out.name,
        "overrides": list(args.overrides),
        "command": " ".join(["python", "benchmarks/omniglot_fewshot.py", *sys.argv[1:]]),
        "budget": {"steps": args.steps, "seconds": args.seconds, "cpu_seconds": args.cpu_seconds},
        "steps": trainer.step,
        "train_seconds": round(budget.elapsed, 2),
        "train_cpu_seconds": round(budget.cpu, 2),
        "setup_seconds": round(setup_seconds, 2),
        "eval_seconds": round(time.perf_counter() - t_eval, 2),
        "images_per_s": round(trainer.step * cfg.batch_size / max(budget.elapsed, 1e-9), 1),
        "torch_threads": torch.get_num_threads(),
        "machine": machine(trainer.device),
        "eval": {
            "split": cfg.data.params.eval_split,
            "episodes": args.episodes,
            "queries": 15,
            "classes": int(test.labels.unique().numel()),
            "head": "protonet (cosine)",
        },
        "fewshot": trained,
        "random_init": baseline,
        "curve": curve,
        "history": history,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    tmp = out / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out / "result.json")
    (out / "row.md").write_text(markdown_row(result) + "\n")
    print(ROW_HEADER)
    print(markdown_row(result))
    print(markdown_row({**result, "name": "random init", "fewshot": baseline, "steps": 0, "train_seconds": 0}))
    return result


def machine(device: torch.device) -> str:
    """The device the run trained on, e.g. ``NVIDIA H200 (torch 2.11.0)`` or ``cpu, 2 cores (torch ...)``."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {os.cpu_count()} cores"
    return f"{name} (torch {torch.__version__})"


def cell(r: dict[str, float]) -> str:
    return f"{r['mean']:.1f} ± {r['ci95']:.1f}"


def markdown_row(result: dict[str, Any]) -> str:
    """``| name | overrides | steps | seconds | 5w1s | 5w5s | 20w1s | 20w5s |`` with mean ± 95% interval."""
    acc = " | ".join(cell(result["fewshot"][key(w, s)]) for w, s in SETTINGS)
    ov = " ".join(f"`{o}`" for o in result.get("overrides", [])) or "-"
    return f"| {result['name']} | {ov} | {result['steps']} | {result['train_seconds']:.0f} | {acc} |"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="step budget")
    ap.add_argument("--seconds", type=float, default=None, help="wall-clock budget of the training steps")
    ap.add_argument(
        "--cpu-seconds",
        type=float,
        default=None,
        help="process CPU-time budget of the training steps (all threads; steadier when shared)",
    )
    ap.add_argument("--out", default=None, help="output folder (default runs/omniglot/<time>)")
    ap.add_argument("--name", default=None, help="row name (default: the output folder's name)")
    ap.add_argument("--episodes", type=int, default=2000, help="test episodes per setting")
    ap.add_argument("--eval-split", default="test", choices=["test", "val"])
    ap.add_argument("--curve", type=int, default=0, help="evaluate 5-way 1-shot at this many points of the budget")
    ap.add_argument("--curve-episodes", type=int, default=500)
    ap.add_argument("--random-init-cache", default="runs/omniglot/random_init")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--verbose", action="store_true", help="print the training log as it goes")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. head=r2d2 n_query=3")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = f"runs/omniglot/{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        run_or_fail(lambda: run(args))
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
