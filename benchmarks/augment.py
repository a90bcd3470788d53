"""Images/s of the per-image PIL augmentation path vs the batched path, same SimCLR pipeline.

    python benchmarks/augment.py                 # one core (torch.set_num_threads(1)), CPU
    python benchmarks/augment.py --threads 0     # torch's default thread count
    python benchmarks/augment.py --device cuda   # batched path on the GPU (PIL path stays on CPU)

(a) per-image: ``pil_transform(cfg)`` (torchvision transforms) applied to each PIL image in one
process, then ``torch.stack`` into a batch, as a ``DataLoader`` with ``num_workers=0`` would.
(b) batched: ``BatchAugment(cfg)`` on a ``uint8 [B, C, H, W]`` batch with a per-sample random draw
(``uint8 -> device`` copy included). Both use the CIFAR recipe (``AugmentConfig.simclr(size, s=0.5)``)
with output size = input size. The two paths are timed interleaved, ``--repeats`` times each, and
the median is reported, since other processes on the machine make single timings noisy.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image

from episodic.data.augment import AugmentConfig, BatchAugment, pil_transform


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 96])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=4, help="batches per timed repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 0 leaves torch's default")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    rows = []
    for size in args.sizes:
        cfg = AugmentConfig.simclr(size=size, s=0.5)
        n = args.batch * args.batches
        rng = np.random.default_rng(0)
        data = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        pil_images = [Image.fromarray(a) for a in data]
        batches = torch.from_numpy(data).permute(0, 3, 1, 2).contiguous().split(args.batch)
        per_image, batched = pil_transform(cfg), BatchAugment(cfg)
        gen = torch.Generator().manual_seed(0)

        def run_pil() -> None:
            for i in range(0, n, args.batch):
                torch.stack([per_image(im) for im in pil_images[i : i + args.batch]])

        def run_batched() -> None:
            for xb in batches:
                batched(xb.to(device, non_blocking=True), gen)
            _sync(device)

        run_pil(), run_batched()  # warm-up (allocator, resampling tables, CUDA kernels)
        times: dict[str, list[float]] = {"pil": [], "batched": []}
        for _ in range(args.repeats):
            for name, fn in (("pil", run_pil), ("batched", run_batched)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        pil_ips = n / statistics.median(times["pil"])
        bat_ips = n / statistics.median(times["batched"])
        rows.append((size, pil_ips, bat_ips))

    threads = torch.get_num_threads()
    print(
        f"SimCLR CIFAR recipe (s=0.5, no blur), batch {args.batch}, torch threads {threads}, batched path on {device}"
    )
    print(f"{'size':>7} | {'per-image PIL img/s':>20} | {'batched img/s':>14} | {'ratio':>6}")
    print(f"{'-' * 7}-+-{'-' * 20}-+-{'-' * 14}-+-{'-' * 6}")
    for size, pil_ips, bat_ips in rows:
        print(f"{size:>3}x{size:<3} | {pil_ips:>20,.0f} | {bat_ips:>14,.0f} | {bat_ips / pil_ips:>5.1f}x")


if __name__ == "__main__":
    main()
