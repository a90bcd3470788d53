"""Per-step training losses of every head x variant x method x task-augmentation case, on fixed seeds.

A refactor of the step's data path must not change what it computes. This module runs each case of
:data:`CASES` for three optimizer steps through the real config and trainer (one process, and two gloo
processes on different halves of every batch) and returns the logged loss of each step, plus the SVM
head's logits on a fixed episode for each QP backend. ``tests/test_golden.py`` compares them with the
values recorded before the refactor, in ``tests/data/golden.json``::

    python tests/golden.py --write       # record (only when a change is *meant* to alter the numbers)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import TINY, make_cfg

GOLDEN = Path(__file__).resolve().parent / "data" / "golden.json"
STEPS = 3
COMMON = [
    *TINY,
    f"train.steps={STEPS}",
    "train.log_every=1",
    "eval.knn_every=0",
    "train.ckpt_every=0",
    "train.hist_every=0",
    "batch_size=16",
]
SN = ["variant.soft_neighbors.k=2", "variant.soft_neighbors.bank_size=40"]
MOCO = ["method=moco", "method.params.queue_size=40"]

CASES: dict[str, list[str]] = {}
for _head in ("contrastive", "protonet", "r2d2", "svm"):
    CASES[_head] = [f"head={_head}"]
    CASES[f"{_head}+debiased"] = [f"head={_head}", "variant=debiased"]
    if _head != "svm":
        CASES[f"{_head}+t_kernel"] = [f"head={_head}", "variant=t_kernel"]
        CASES[f"{_head}+t_kernel_l2"] = [f"head={_head}", "variant=t_kernel", "variant.t_kernel.standardize=l2"]
        CASES[f"{_head}+soft_neighbors"] = [f"head={_head}", "variant=soft_neighbors", *SN]
        CASES[f"{_head}+feature_transform"] = [f"head={_head}", "variant=feature_transform"]
        CASES[f"{_head}+moco"] = [f"head={_head}", *MOCO]
        CASES[f"{_head}+byol"] = [f"head={_head}", "method=byol"]
    for _aug in ("rotate", "invert", "crop", "query_mix", "rotation_loss"):
        CASES[f"{_head}+{_aug}"] = [
            f"head={_head}",
            f"task.augment=[{_aug}]",
            f"task.{_aug}.p=0.5"
            if _aug in ("rotate", "invert", "crop")
            else f"task.{_aug}.weight=0.5"
            if _aug == "rotation_loss"
            else "task.query_mix.p=1.0",
        ]
    CASES[f"{_head}+all_tasks"] = [f"head={_head}", "task.augment=[rotate,query_mix,rotation_loss]"]
    CASES[f"{_head}+2x2_way4"] = [f"head={_head}", "n_supp=2", "n_query=2", "n_way=4"]
CASES.update(
    {
        "contrastive+asym+moco": ["head=contrastive", "head.params.symmetric=false", *MOCO],
        "r2d2+moco_symmetric_predictor": [
            "head=r2d2",
            *MOCO,
            "method.params.symmetric=true",
            "method.params.predictor_hidden=16",
            "method.params.momentum_schedule=cosine",
        ],
        "contrastive+moco+t_kernel": ["head=contrastive", "head.params.symmetric=false", *MOCO, "variant=t_kernel"],
        "contrastive+moco+feature_transform": [
            "head=contrastive",
            "head.params.symmetric=false",
            *MOCO,
            "variant=feature_transform",
        ],
        "protonet+moco+soft_neighbors": ["head=protonet", *MOCO, "variant=soft_neighbors", *SN],
        "contrastive+debiased+t_kernel": ["head=contrastive", "variant=[t_kernel,debiased]"],
        "r2d2+rotate_add": ["head=r2d2", "task.augment=[rotate]", "task.rotate.mode=add", "task.rotate.p=0.25"],
        "protonet+byol+query_mix": ["head=protonet", "method=byol", "task.augment=[query_mix]"],
        "r2d2+moco+query_mix": ["head=r2d2", *MOCO, "task.augment=[query_mix]"],
        "r2d2+accu2_way4": ["head=r2d2", "n_way=4", "optim.accu_iter=2"],
        "contrastive+local_way4": ["head=contrastive", "task.scope=local", "n_way=4"],
    }
)
# cases whose two-process run is meaningful and cheap (one spawn runs them all)
TWO_PROCESS = [
    name
    for name in CASES
    if "+" not in name or name.endswith(("+moco", "+byol", "+debiased", "+all_tasks", "+2x2_way4", "+soft_neighbors"))
]
TWO_PROCESS += ["contrastive+asym+moco", "r2d2+moco_symmetric_predictor", "contrastive+local_way4"]


def run_case(name: str, run_dir: Path) -> list[float]:
    """The logged loss of each of the :data:`STEPS` steps (the mean over processes under several)."""
    from episodic.engine import Trainer

    trainer = Trainer(make_cfg(*COMMON, *CASES[name]), run_dir)
    trainer.fit()
    return [float(r["loss"]) for r in trainer.history]


def svm_logits() -> dict[str, list[float]]:
    """SVM head logits (fast backend and the references) on one fixed 5-way 2-shot episode."""
    from episodic.heads.base import HEADS

    g = torch.Generator().manual_seed(7)
    support, query = torch.randn(1, 10, 6, generator=g), torch.randn(1, 5, 6, generator=g)
    labels = torch.arange(5).repeat(2).unsqueeze(0)
    out = {}
    for backend in ("fast", "qpth", "cvxpylayers"):
        try:
            head = HEADS.build("svm", backend=backend, C=0.1, learn_scale=False)
        except Exception:
            continue
        out[backend] = head.scores(support, labels, query, 5).flatten().tolist()
    return out


def one_process() -> dict[str, Any]:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        losses = {name: run_case(name, Path(tmp) / name.replace("+", "_")) for name in CASES}
    return {"one_process": losses, "svm_logits": svm_logits()}


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=120))
    try:
        res = {name: run_case(name, Path(out) / name.replace("+", "_")) for name in TWO_PROCESS}
        if rank == 0:
            (Path(out) / "two.json").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def two_processes() -> dict[str, list[float]]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(port, tmp), nprocs=2, join=True, start_method="fork")
        return json.loads((Path(tmp) / "two.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help=f"write {GOLDEN.name} (else print)")
    args = ap.parse_args()
    res = one_process()
    res["two_processes"] = two_processes()
    text = json.dumps(res, indent=1, sort_keys=True)
    if args.write:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text + "\n")
        print(f"wrote {len(res['one_process'])} + {len(res['two_processes'])} cases to {GOLDEN}")
    else:
        print(text)


if __name__ == "__main__":
    main()
