"""What the SVM head's solver costs along a real training run, not on the fixed views of step_overhead.py.

    python benchmarks/svm_solver_cost.py --steps 600 -- data=cifar10_npz data.params.root=../shared/data
    python benchmarks/svm_solver_cost.py --backbones conv4 resnet_tiny --steps 300 --json rows.json -- data=...

Trains ``head=svm`` (batch 256, one support and one query view per image, the config's augmentations) with
:meth:`episodic.engine.Trainer.train_step` on the loader's batches, and records after every step what the
fast solver reports (:meth:`episodic.solvers.fast.FastSolver.diagnostics`, host numbers: no device read):
the FISTA iterations the slowest episode needed and those run, the host reads, and the CG iterations of the
backward. Every ``--profile-every``-th step is profiled (:func:`episodic.profiling.profile_step`:
launch-level operators and host synchronisations), with a bare step of the same encoder on its views and the
device augmentation of the batch alone (part of the trainer's step when the loader hands it uint8 images).

On a GPU a step's time over the bare step's is set by those operators (each is launched from Python); on
the CPU by the float64 products. ``step_overhead.py`` trains on one fixed batch, on which the encoder
collapses and the QP gets hard (about 190 FISTA iterations): this is the cost a run pays instead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from episodic.profiling import bare_step_fn, profile_step

KEYS = ("solver_iters", "solver_ran", "solver_reads", "solver_cg_iters")


def run(backbone: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train ``args.steps`` steps; the per-window iteration figures and the profiled steps' rows."""
    from episodic.cli import compose_config
    from episodic.data.augment import multi_view
    from episodic.engine import Trainer

    overrides = [
        "head=svm",
        f"backbone={backbone}",
        f"batch_size={args.batch}",
        "n_supp=1",
        "n_query=1",
        f"train.steps={args.steps}",
        "train.progress=false",
        f"device={args.device}",
        *args.extra,
    ]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(compose_config("train", overrides), tmp)
        head = trainer.model.head
        batches = iter(trainer.make_loader(0))
        trainer.model.train()
        per_step: list[dict[str, float]] = []
        profiles: list[dict[str, Any]] = []
        bare_ops: int | None = None
        augment_ops = 0
        t0 = time.perf_counter()
        while trainer.step < args.steps:
            batch = next(batches)
            if (trainer.step + 1) % args.profile_every:
                trainer.train_step(batch)
            else:
                p = profile_step(lambda b=batch: trainer.train_step(b), args.device)
                if bare_ops is None:  # the encoder alone on two views of the batch (its count does not change)
                    views = [batch.to(trainer.device)]
                    if views[0].dim() == 4:  # uint8 images: the step augments them itself, the bare step gets views
                        augment_ops = profile_step(lambda: views.append(multi_view(trainer.augment, views[0], 2))).n_ops
                    bare_ops = profile_step(bare_step_fn(trainer, views[-1]), args.device).n_ops
                row = {"step": trainer.step + 1, "ops": p.n_ops, "bare_ops": bare_ops, "augment_ops": augment_ops}
                profiles.append({**row, "syncs": p.n_syncs, **head.diagnostics()})
                print(f"{backbone}: {profiles[-1]} ({time.perf_counter() - t0:.0f} s)", flush=True)
            trainer.step += 1
            per_step.append(head.diagnostics())
    windows = []
    for start in range(0, len(per_step), args.window):
        chunk = per_step[start : start + args.window]
        windows.append(
            {
                "steps": f"{start + 1}-{start + len(chunk)}",
                **{f"{k}_median": statistics.median(s[k] for s in chunk) for k in KEYS},
                **{f"{k}_max": max(s[k] for s in chunk) for k in KEYS},
            }
        )
    return {"backbone": backbone, "batch": args.batch, "steps": args.steps, "windows": windows, "profiles": profiles}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=["conv4"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--window", type=int, default=100, help="steps per row of the iteration table")
    ap.add_argument("--profile-every", type=int, default=200, help="profile one extra step this often")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("extra", nargs="*", help="Hydra overrides (after --): the data, say")
    args = ap.parse_args(argv)
    for name in ("batch", "steps", "window", "profile_every"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} {getattr(args, name)} is not allowed; use an integer >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [run(bb, args) for bb in args.backbones]
    for res in results:
        print(f"\n{res['backbone']}, batch {res['batch']}: the solver per step (median / max over each window)")
        print(f"{'steps':<10} {'FISTA needed':>13} {'FISTA run':>10} {'host reads':>11} {'CG iters':>9}")
        for w in res["windows"]:
            cells = [f"{w[f'{k}_median']:.0f} / {w[f'{k}_max']:.0f}" for k in KEYS]
            print(f"{w['steps']:<10} {cells[0]:>13} {cells[1]:>10} {cells[2]:>11} {cells[3]:>9}")
        for p in res["profiles"]:
            print(
                f"profiled step {p['step']}: {p['ops']} operators (bare step {p['bare_ops']}, "
                f"augmentation {p['augment_ops']}), "
                f"{p['syncs']} host reads, FISTA {p['solver_ran']} run, CG {p['solver_cg_iters']}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
