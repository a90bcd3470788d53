"""Pseudo-label purity: how often the shots a pseudo-labelling sampler picks share the key's true class.

    python benchmarks/psco_purity.py runs/psco_val/psco/checkpoints/last.pt runs/psco_val/moco/checkpoints/last.pt

For each checkpoint (a run with ``method=moco``): the momentum encoder embeds ``--queue`` random
training images (un-augmented) as a full queue and ``--batch`` other training images as keys; each
selection (``psco``: Sinkhorn + top-K; ``neighbors``: cosine top-K) picks ``--shots`` queue entries per
key, and purity is the share of picked entries whose class (the labels training never sees; for
Omniglot the character) is the key's. ``chance`` is the share of the queue in the key's class (a random
pick's purity), ``oracle`` the best purity any K picks could reach (``min(K, same-class entries) / K``).
The random-init twin (the same architecture and seed, untrained) is measured alongside. Mean ± standard
deviation over ``--draws`` random queue/batch draws. Prints a markdown table; ``--json`` saves it.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from episodic import checkpoint
from episodic.config import as_dict
from episodic.data.datasets import build_dataset
from episodic.engine import ssl_split
from episodic.eval.features import extract_features
from episodic.model import build_model
from episodic.tasks.samplers import SAMPLERS


def purity(
    keys: torch.Tensor, key_labels: torch.Tensor, queue: torch.Tensor, queue_labels: torch.Tensor, shots: int
) -> dict[str, float]:
    """Purity of each selection's picks, chance and oracle, for one queue and one batch of keys."""
    same = key_labels[:, None] == queue_labels[None]  # [B, Q]
    out = {
        "chance": float(same.double().mean()),
        "oracle": float((same.sum(1).clamp(max=shots).double() / shots).mean()),
    }
    for name in ("psco", "neighbors"):
        idx = SAMPLERS.build(name, n_supp=1, n_query=1, shots=shots).select(keys, queue)
        out[name] = float(same.gather(1, idx).double().mean())
    return out


def measure(path: Path, args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    state = checkpoint.load(path)
    cfg = OmegaConf.create(state["config"])
    if args.data_root:
        cfg.data.params.root = args.data_root
    train = ssl_split(build_dataset(cfg.data.name, **as_dict(cfg.data.get("params"))), cfg)
    aug = cfg.data.augment
    results: dict[str, dict[str, list[float]]] = {}
    for which in ("trained", "random init"):
        model = build_model(cfg)
        if which == "trained":
            model.load_state_dict(state["model"])
        encoder = getattr(model.method, "momentum_encoder", model.method.encoder)
        feats = extract_features(encoder, train.images, mean=aug.get("mean"), std=aug.get("std"))
        rows: dict[str, list[float]] = {}
        for d in range(args.draws):
            perm = torch.randperm(len(feats), generator=torch.Generator().manual_seed(d))
            q, k = perm[: args.queue], perm[args.queue : args.queue + args.batch]
            for key, v in purity(feats[k], train.labels[k], feats[q], train.labels[q], args.shots).items():
                rows.setdefault(key, []).append(100 * v)
        results[which] = rows
    return results


def fmt(v: Sequence[float]) -> str:
    return f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}" if len(v) > 1 else f"{v[0]:.1f}"


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--queue", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--draws", type=int, default=10)
    ap.add_argument("--data-root", default=None, help="override the runs' data.params.root")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    table: dict[str, Any] = {}
    print(f"purity (%) of {args.shots} picks among {args.queue} queue entries, {args.batch} keys, {args.draws} draws")
    print("| run | encoder | psco (Sinkhorn top-K) | neighbors (cosine top-K) | chance | oracle |")
    print("|---|---|---:|---:|---:|---:|")
    for path in args.checkpoints:
        res = measure(path, args)
        run = path.parent.parent.name if path.parent.name == "checkpoints" else str(path)
        table[run] = res
        for which, rows in res.items():
            cells = " | ".join(fmt(rows[c]) for c in ("psco", "neighbors", "chance", "oracle"))
            print(f"| {run} | {which} | {cells} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
