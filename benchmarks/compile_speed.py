"""``train.compile=true`` against eager: images/s of the trainer's step, and the compile time apart.

    python benchmarks/compile_speed.py                                  # conv4, resnet_tiny, resnet18; r2d2
    python benchmarks/compile_speed.py --heads contrastive r2d2 --backbones conv4 --rounds 20

Per backbone and head, two trainers from the same start: eager and ``train.compile=true``. The first two steps
of each are timed alone (the compiled one traces and compiles at the first, and again at the second, where
the step number becomes a dynamic input: the difference is the compile time, reported apart; the inductor
cache is a fresh folder unless ``--warm-cache``), then ``--warmup`` steps each, then ``--rounds``
interleaved rounds (eager step, compiled step) on fixed views ``[2, B, C, S, S]``, so a load change hits
both alike. images/s = batch / median step time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from step_overhead import interleaved, make_trainer, step_arguments, timed


def measure(backbone: str, head: str, args: argparse.Namespace) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    views = torch.rand(2, args.batch, args.channels, args.size, args.size, generator=g).to(args.device)
    sync = torch.device(args.device).type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        steps, first = {}, {}
        for mode in ("eager", "compiled"):
            torch.manual_seed(0)
            flag = f"train.compile={str(mode == 'compiled').lower()}"
            trainer = make_trainer(
                head, backbone, args.batch, args.channels, args.size, tmp, [flag, *args.extra], args.device
            )
            steps[mode] = lambda t=trainer: t.train_step(views)
            # the first two steps: the second compiles again, with the step number as a dynamic input
            first[mode] = timed(lambda fn=steps[mode]: (fn(), fn()), sync=sync)
        times = interleaved(steps, args.warmup, args.rounds, time.perf_counter, sync)
    eager, compiled = (statistics.median(times[k]) for k in ("eager", "compiled"))
    return {
        "backbone": backbone,
        "head": head,
        "device": args.device,
        "batch": args.batch,
        "input": f"{args.channels}x{args.size}x{args.size}",
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "eager_images_per_s": args.batch / eager,
        "compiled_images_per_s": args.batch / compiled,
        "speedup": eager / compiled,
        "compile_s": first["compiled"] - first["eager"],
    }


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=["conv4", "resnet_tiny", "resnet18"])
    ap.add_argument("--heads", nargs="+", default=["r2d2"])
    step_arguments(ap, batch=64, rounds=10, warmup=2)
    ap.add_argument("--warm-cache", action="store_true", help="keep inductor's on-disk cache (compile time drops)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = None if args.warm_cache else tempfile.TemporaryDirectory()
    if cache is not None:  # a cold compile, as a user's first run
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name
    rows = []
    for bb in args.backbones:
        for head in args.heads:
            rows.append(measure(bb, head, args))
            r = rows[-1]
            print(
                f"{bb:<12} {head:<12} eager {r['eager_images_per_s']:7.1f} img/s  compiled "
                f"{r['compiled_images_per_s']:7.1f} img/s  x{r['speedup']:.2f}  compile {r['compile_s']:.0f} s",
                flush=True,
            )
    print(
        f"{args.device}, batch {args.batch}, 2 views, input {args.channels}x{args.size}x{args.size}, torch threads "
        f"{torch.get_num_threads()}, {args.rounds} interleaved rounds (median), "
        f"{'warm' if args.warm_cache else 'cold'} inductor cache"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
