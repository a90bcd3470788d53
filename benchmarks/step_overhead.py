"""What a head costs per training step: the framework's step time over a bare step's, per head and backbone.

    python benchmarks/step_overhead.py                          # conv4, resnet_tiny; 3x32x32, batch 256, 2 views
    python benchmarks/step_overhead.py --size 28 --channels 1   # Omniglot-sized inputs
    python benchmarks/step_overhead.py --heads contrastive r2d2 --rounds 50
    python benchmarks/step_overhead.py --device cuda --chain 20 --rounds 10     # throughput, not latency
    python benchmarks/step_overhead.py --profile --json docs/overhead/cpu_3x32.json   # + ops, syncs, memory

*Head step*: :meth:`episodic.engine.Trainer.train_step` on views that are already augmented
(``[2, B, C, S, S]``, the same tensors every step): the model's forward (sampler -> episode -> encoder (backbone +
projector) -> head loss) -> backward -> optimizer step -> LR schedule step -> step accuracy.
*Bare step*: the same encoder architecture on the same tensors, forward and backward of a plain
dot-product loss ``-mean(z1 . z2)`` between the two views' projections, and the same optimizer's step;
no head, no episode. Both run interleaved (bare, then every head, per round), so a load change on a
shared machine hits them alike; the figure is the ratio of the medians over ``--rounds`` rounds (the
median of the per-round ratios is printed too). Target: <= 1.05 for contrastive, ProtoNet and R2D2.
On a GPU a round times each step to completion (its latency: the host's work before the first kernel is
not hidden); ``--chain N`` times N steps back to back instead, as a training loop runs them (the host
queues a step while the GPU runs the previous one): the throughput a run sees.

``--profile``: one more step of each (after the timed rounds) under :func:`episodic.profiling.profile_step`:
launch-level ATen operators per step (``ops``, and by name those beyond the bare step's, ``extra_ops``;
``dispatched`` counts views and allocations too), host
synchronisations per step (``syncs``: ``.item()``-like reads, ``nonzero``, ``equal``, ``tolist``...), the
trainer's operators over the bare step's (``ops_ratio``), the peak memory (CUDA: ``max_memory_allocated``;
CPU: the process's peak resident set, a high-water mark shared by every row) and, for the SVM head, the
solver's iterations in that step.

The Trainer is built on the digits data with ``--channels`` channels: the data itself is never used,
every step gets the fixed views.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from episodic.profiling import bare_step_fn, profile_step


def make_trainer(
    head: str, backbone: str, batch: int, channels: int, size: int, tmp: str, extra: Sequence[str], device: str = "cpu"
) -> Any:
    from episodic.cli import compose_config
    from episodic.engine import Trainer

    overrides = [
        f"head={head}",
        f"backbone={backbone}",
        "data=digits",
        f"data.channels={channels}",
        f"data.params.channels={channels}",
        f"data.augment.size={size}",
        f"batch_size={batch}",
        "n_supp=1",
        "n_query=1",
        "train.steps=100000",
        "train.progress=false",
        f"device={device}",
        *extra,
    ]
    cfg = compose_config("train", overrides)
    return Trainer(cfg, tmp)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(
    fn: Callable[[], Any], clock: Callable[[], float] = time.perf_counter, sync: bool = False, chain: int = 1
) -> float:
    """Seconds per call of ``fn`` over ``chain`` calls back to back; ``sync``: wait for the GPU's queued work
    before reading the clock (so ``chain=1`` times one step to completion, and a longer chain lets the host
    queue the next step while the GPU runs this one, as a training loop does)."""
    if sync:
        torch.cuda.synchronize()
    t0 = clock()
    for _ in range(chain):
        fn()
    if sync:
        torch.cuda.synchronize()
    return (clock() - t0) / chain


def interleaved(
    steps: dict[str, Callable[[], Any]],
    warmup: int,
    rounds: int,
    clock: Callable[[], float],
    sync: bool,
    chain: int = 1,
) -> dict[str, list[float]]:
    """``warmup`` untimed rounds, then ``rounds`` timed ones; each round times ``chain`` calls of every step,
    one step after the other."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for k, fn in steps.items():
            times[k].append(timed(fn, clock, sync, chain))
    return times


def in_layout(views: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``views [V, B, C, S, S]`` with the same values, stored as the encoder reads them: NHWC when the trainer
    runs channels-last (each view's images are then a channels-last batch without a copy), so that neither
    step pays a layout conversion the other does not (the bare step converts its input once, untimed)."""
    if not channels_last:
        return views
    return views.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


def measure(backbone: str, heads: Sequence[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    views = torch.rand(2, args.batch, args.channels, args.size, args.size, generator=g).to(args.device)
    sync = torch.device(args.device).type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {
            h: make_trainer(h, backbone, args.batch, args.channels, args.size, tmp, args.extra, args.device)
            for h in heads
        }
        first = next(iter(trainers.values()))
        views = in_layout(views, first.channels_last)
        bare = bare_step_fn(first, views)
        steps = {"bare": bare, **{h: (lambda t=t: t.train_step(views)) for h, t in trainers.items()}}
        times = interleaved(steps, args.warmup, args.rounds, CLOCKS[args.clock], sync, args.chain)
        profiles = {k: profile_step(fn, args.device) for k, fn in steps.items()} if args.profile else {}
        solver_iters = {h: t.model.head.diagnostics().get("solver_iters") for h, t in trainers.items()}
    bare_med = statistics.median(times["bare"])
    rows = []
    for h in heads:
        per_round = [a / b for a, b in zip(times[h], times["bare"])]
        rows.append(
            {
                "backbone": backbone,
                "head": h,
                "device": args.device,
                "batch": args.batch,
                "views": 2,
                "clock": args.clock,
                "input": f"{args.channels}x{args.size}x{args.size}",
                "rounds": args.rounds,
                "chain": args.chain,
                "bare_ms": 1000 * bare_med,
                "step_ms": 1000 * statistics.median(times[h]),
                "ratio": statistics.median(times[h]) / bare_med,
                "median_round_ratio": statistics.median(per_round),
            }
        )
        if profiles:
            p, b = profiles[h], profiles["bare"]
            rows[-1].update(
                ops=p.n_ops,
                bare_ops=b.n_ops,
                ops_ratio=p.n_ops / b.n_ops,
                dispatched=p.dispatched,
                bare_dispatched=b.dispatched,
                syncs=p.n_syncs,
                sync_ops=dict(p.syncs),
                extra_ops=dict((p.ops - b.ops).most_common()),  # by name: what the step adds to the bare one
                peak_memory_mb=p.peak_memory / 2**20,
                solver_iters=solver_iters.get(h),
            )
    return rows


def step_arguments(ap: argparse.ArgumentParser, batch: int, rounds: int, warmup: int) -> None:
    """The options every step benchmark takes: the input, the rounds, the device and threads, the output."""
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=rounds, help="timed steps per configuration (median)")
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (GPU steps are timed to completion)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("extra", nargs="*", help="Hydra overrides for every trainer (after --)")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=["conv4", "resnet_tiny"])
    ap.add_argument("--heads", nargs="+", default=["contrastive", "protonet", "r2d2", "svm"])
    step_arguments(ap, batch=256, rounds=20, warmup=3)
    ap.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="wall: elapsed time; cpu: this process's CPU time (with --threads 1, steady on a "
        "machine shared with other jobs)",
    )
    ap.add_argument(
        "--chain",
        type=int,
        default=1,
        help="steps per timing, back to back (1: each step to completion, its latency; more: the throughput of a "
        "loop that queues the next step on the GPU while this one runs; the same on a CPU)",
    )
    ap.add_argument("--profile", action="store_true", help="also count ops, host syncs and peak memory per step")
    args = ap.parse_args(argv)
    if args.chain < 1:
        ap.error(f"--chain {args.chain} is not allowed; use an integer >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from episodic.cli import group_options

    heads = [h for h in args.heads if h in group_options("head")]
    missing = sorted(set(args.heads) - set(heads))
    rows = []
    for bb in args.backbones:
        rows += measure(bb, heads, args)
    print(
        f"{args.device}, batch {args.batch}, 2 views, input {args.channels}x{args.size}x{args.size}, "
        f"{args.clock} clock, torch threads {torch.get_num_threads()}, {args.rounds} interleaved rounds (median)"
        f"{f' of {args.chain} steps back to back' if args.chain > 1 else ''}"
    )
    print(f"{'backbone':<12} {'head':<12} {'bare ms':>9} {'step ms':>9} {'ratio':>7} {'per-round':>9}")
    for r in rows:
        flag = "" if r["head"] == "svm" or r["ratio"] <= 1.05 else "  (> 1.05)"
        print(
            f"{r['backbone']:<12} {r['head']:<12} {r['bare_ms']:>9.1f} {r['step_ms']:>9.1f} {r['ratio']:>7.3f} "
            f"{r['median_round_ratio']:>9.3f}{flag}"
        )
    if args.profile:
        print(
            f"\n{'backbone':<12} {'head':<12} {'ops':>6} {'bare':>6} {'ratio':>6} {'syncs':>6} {'peak MB':>8}  solver"
        )
        for r in rows:
            iters = "" if r["solver_iters"] is None else f"{r['solver_iters']} iterations"
            print(
                f"{r['backbone']:<12} {r['head']:<12} {r['ops']:>6} {r['bare_ops']:>6} {r['ops_ratio']:>6.2f} "
                f"{r['syncs']:>6} {r['peak_memory_mb']:>8.0f}  {iters}"
            )
    if missing:
        print(f"not measured (no such head): {', '.join(missing)}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
