"""Training throughput (images/s) of the episodic step under DDP: 1 and 2 CPU processes (gloo), or
1..N GPUs (NCCL) when ``--device cuda``.

    python benchmarks/ddp_scaling.py                                  # CPU: 1 and 2 processes
    python benchmarks/ddp_scaling.py --procs 1 2 4                    # more CPU processes
    python benchmarks/ddp_scaling.py --device cuda                    # 1, 2, 4, .. all visible GPUs
    python benchmarks/ddp_scaling.py --device cuda --precision bf16 -- data=cifar10 backbone=resnet18

Weak scaling: every process keeps ``--per-process-batch`` images per step (global batch =
per-process batch x processes) with ``task.scope=global``, so one episode covers the global batch
and its support is gathered with gradient. Each configuration runs in fresh processes (started
with ``torch.multiprocessing``; this is the benchmark's harness, training itself is launched with
torchrun) that build the real :class:`~episodic.engine.Trainer` from the config (extra Hydra
overrides after ``--``), warm up, then time full optimizer steps of ``Trainer.train_step`` on
batches from the run's own loader: augmentation on the device, forward, gather, backward, DDP
all-reduce, update. images/s = global batch x steps / seconds on rank 0 between two barriers,
median of ``--repeats`` windows. On CPU each process gets ``threads / processes`` torch threads so
every configuration uses the same cores; the efficiency column is images/s over
``processes x`` the 1-process figure.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, args: dict[str, Any], out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    from episodic import distributed
    from episodic.cli import compose_config
    from episodic.engine import Trainer

    if args["device"] == "cpu":
        torch.set_num_threads(max(1, args["threads"] // world))
    overrides = [
        *args["overrides"],
        f"batch_size={args['per_process_batch'] * world}",
        f"device={args['device']}",
        f"precision={args['precision']}",
        "train.progress=false",
        "eval.knn_every=0",
        "resume=null",
    ]
    cfg = compose_config("train", overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, run_dir)
        batches = iter(trainer.make_loader(0))
        trainer.model.train()

        def sync() -> None:
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            distributed.barrier()

        for _ in range(args["warmup"]):
            trainer.train_step(next(batches))
        times = []
        for _ in range(args["repeats"]):
            sync()
            t0 = time.perf_counter()
            for _ in range(args["steps"]):
                trainer.train_step(next(batches))
            sync()
            times.append(time.perf_counter() - t0)
        if rank == 0:
            global_batch = args["per_process_batch"] * world
            ips = global_batch * args["steps"] / statistics.median(times)
            Path(out).write_text(
                json.dumps(
                    {
                        "processes": world,
                        "global_batch": global_batch,
                        "images_per_s": ips,
                        "scope": trainer.scope.describe(),
                    }
                )
            )
    distributed.cleanup()


def measure(world: int, args: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.spawn(_worker, args=(world, _free_port(), args, out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument(
        "--procs",
        type=int,
        nargs="+",
        default=None,
        help="process counts (default: 1 2 on CPU; 1, 2, 4, .. up to every visible GPU)",
    )
    ap.add_argument("--per-process-batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads shared by the processes")
    ap.add_argument("--precision", default="32", help="32 | bf16 | fp16 (CUDA)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of configs/train.yaml, after --")
    a = ap.parse_args()
    if a.device == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise SystemExit("error: --device cuda but no CUDA device is visible")
        procs = a.procs or sorted({min(2**i, n) for i in range(n.bit_length() + 1)})
        if max(procs) > n:
            raise SystemExit(f"error: --procs {max(procs)} but only {n} GPU(s) are visible")
    else:
        procs = a.procs or [1, 2]
    args = dict(
        device=a.device,
        per_process_batch=a.per_process_batch,
        steps=a.steps,
        warmup=a.warmup,
        repeats=a.repeats,
        threads=a.threads,
        precision=a.precision,
        overrides=a.overrides,
    )
    rows = [measure(w, args) for w in procs]
    base = rows[0]["images_per_s"] / rows[0]["processes"]
    where = f"{a.device}, {a.threads} threads" if a.device == "cpu" else torch.cuda.get_device_name(0)
    print(
        f"DDP weak scaling on {where}; {a.per_process_batch} images per process per step; "
        f"overrides: {' '.join(a.overrides) or '(defaults)'}"
    )
    print(f"{'processes':>9} {'global batch':>12} {'images/s':>10} {'per process':>11} {'efficiency':>10}")
    for r in rows:
        eff = r["images_per_s"] / (base * r["processes"])
        print(
            f"{r['processes']:>9} {r['global_batch']:>12} {r['images_per_s']:>10.1f} "
            f"{r['images_per_s'] / r['processes']:>11.1f} {eff:>10.2f}"
        )
    print(rows[-1]["scope"])


if __name__ == "__main__":
    main()
