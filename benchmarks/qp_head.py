"""Benchmark the SVM head's QP backends on contrastive-style episodes, next to the conv4 backbone.

For each ``n_way`` (one episode, ``n_supp`` support and one query view per class, width ``d``) it
times forward + backward of the head (logits -> cross-entropy -> gradients w.r.t. the support and
query embeddings), median of several runs after one warm-up run, for:

* ``fast``, ``qpth``, ``cvxpylayers``: the three backends of ``head=svm`` (the same Crammer-Singer
  QP; ``fast`` cold-started, since a new batch of images is a new problem);
* ``qpth-ovr``: the baseline quoted in the issue, one-vs-rest binary SVM duals (box ``0 <= a <= C``
  plus ``s^T a = 0``) batched over the classes in qpth, float32, 15 iterations (a different QP, so
  no deviation is reported for it).

It also reports the largest absolute logit difference from cvxpylayers (where it ran) and the conv4
backbone's forward + backward time on the episode's ``n_way * n_supp`` 32x32 images. A backend is
skipped at a size where its time, extrapolated from the previous size, exceeds ``--budget`` seconds.

    .venv/bin/python benchmarks/qp_head.py                      # the full table
    .venv/bin/python benchmarks/qp_head.py --ways 5,16 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from episodic.heads.svm import SVMHead
from episodic.models.backbones import BACKBONES
from episodic.solvers import kkt_residual
from episodic.solvers.fast import FastSolver

# how a backend's time grows with n_way at n_supp = 1 (exponents measured between 32 and 128 classes;
# qpth factors a dense (n k)^2 KKT matrix, one-vs-rest k matrices of n^2), used to skip hopeless sizes
GROWTH = {"fast": 3.0, "qpth": 5.5, "cvxpylayers": 4.5, "qpth-ovr": 4.0}
MIN_EXTRAPOLATE = 0.5  # below this many seconds fixed overheads dominate: run instead of extrapolating


def ovr_qpth_scores(support: Tensor, labels: Tensor, query: Tensor, n_way: int, C: float) -> Tensor:
    """One-vs-rest binary SVM duals (hinge loss, bias equality), batched over classes in qpth."""
    from qpth.qp import QPFunction

    x = F.normalize(support[0], dim=-1)
    q = F.normalize(query[0], dim=-1)
    n = x.shape[0]
    signs = 2 * F.one_hot(labels[0], n_way).T.to(x.dtype) - 1  # [k, n]
    kernel = x @ x.T + torch.eye(n, dtype=x.dtype)  # the same + I safeguard as MetaOptNet
    q_mat = signs[:, :, None] * kernel[None] * signs[:, None, :]
    eye = torch.eye(n, dtype=x.dtype)
    g = torch.cat([eye, -eye])
    h = torch.cat([torch.full((n,), C, dtype=x.dtype), torch.zeros(n, dtype=x.dtype)])
    p = -torch.ones(n_way, n, dtype=x.dtype)
    a = QPFunction(verbose=-1, maxIter=15, check_Q_spd=False)(
        q_mat, p, g, h, signs[:, None, :], torch.zeros(n_way, 1, dtype=x.dtype)
    )
    return ((q @ x.T) @ (a * signs).T)[None]  # [1, Nq, k]


def time_runs(fn: Callable[[], Tensor], repeats: int, budget: float) -> tuple[float, int, Tensor]:
    """Median seconds of ``fn`` over up to ``repeats`` runs after a warm-up, within ``budget`` seconds."""
    start = time.perf_counter()
    out = fn()  # warm-up (first-call allocation, cvxpylayers canonicalisation)
    first = time.perf_counter() - start
    times: list[float] = []
    while len(times) < repeats and (time.perf_counter() - start) + first <= budget:
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    if not times:
        times = [first]
    return statistics.median(times), len(times), out


def head_step(
    head: Callable[..., Tensor], support: Tensor, labels: Tensor, query: Tensor, n_way: int
) -> Callable[[], Tensor]:
    """A closure: logits, cross-entropy against the query labels, backward; returns the logits."""
    query_labels = torch.arange(n_way).repeat(query.shape[1] // n_way)

    def run() -> Tensor:
        s = support.clone().requires_grad_()
        q = query.clone().requires_grad_()
        logits = head(s, labels, q, n_way)
        F.cross_entropy(logits[0], query_labels).backward()
        return logits.detach()

    return run


def measure(
    backend: str, support: Tensor, labels: Tensor, query: Tensor, n_way: int, C: float, repeats: int, budget: float
) -> tuple[float, int, Tensor, str, str]:
    """Median seconds, timed runs, logits, and (fast only) FISTA iterations and KKT residual."""
    if backend == "qpth-ovr":
        fn = head_step(lambda s, y, q, k: ovr_qpth_scores(s, y, q, k, C), support, labels, query, n_way)
        return (*time_runs(fn, repeats, budget), "-", "-")
    head = SVMHead(C=C, backend=backend, warm_start=False)
    seconds, runs, logits = time_runs(head_step(head.scores, support, labels, query, n_way), repeats, budget)
    if not isinstance(head.solver, FastSolver):
        return seconds, runs, logits, "-", "-"
    iters = str(head.solver.last_iters)
    unit = F.normalize(support.double(), dim=-1)
    alpha = head.solver(unit, labels, n_way)
    kkt = float(kkt_residual(alpha, unit, F.one_hot(labels, n_way).double(), C).max())
    return seconds, runs, logits, iters, f"{kkt:.0e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ways", default="5,16,32,64,128,256")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--n-supp", type=int, default=1)
    parser.add_argument("--C", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget", type=float, default=30.0, help="seconds allowed per backend and size")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--backends", default="fast,qpth,cvxpylayers,qpth-ovr")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backends = args.backends.split(",")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"SVM head, Crammer-Singer dual, C={args.C}, d={args.dim}, n_supp={args.n_supp}, "
        f"1 query per class; torch {torch.__version__}, {args.threads} threads, load average {load}"
    )
    print(
        "seconds: forward+backward of one episode, median of the timed runs after a warm-up run\n"
        "iters, kkt: fast's FISTA iterations and KKT residual (tol 1e-7)\n"
        "dev: max |logit - cvxpylayers logit| (no ref: cvxpylayers skipped at this size)\n"
        "conv4 s: conv4 forward+backward on the n_way*n_supp 32x32 images; ratio: seconds / conv4 s"
    )
    header = (
        f"{'n_way':>5} {'backend':<12} {'seconds':>9} {'runs':>4} {'iters':>5} {'kkt':>6} {'dev':>9} "
        f"{'conv4 s':>8} {'ratio':>7}"
    )
    print(header)
    print("-" * len(header))
    last: dict[str, tuple[int, float]] = {}  # backend -> (n_way, seconds) of its last measurement
    conv_times: dict[int, float] = {}
    conv4 = BACKBONES.build("conv4", in_channels=3)
    for n_way in [int(w) for w in args.ways.split(",")]:
        n = n_way * args.n_supp
        base = torch.randn(1, n_way, args.dim)
        support = base.repeat(1, args.n_supp, 1) + 0.5 * torch.randn(1, n, args.dim)
        query = base + 0.5 * torch.randn(1, n_way, args.dim)
        labels = torch.arange(n_way).repeat(args.n_supp)[None]
        images = torch.randn(n, 3, 32, 32)

        def conv_step() -> Tensor:
            conv4.zero_grad(set_to_none=True)
            out = conv4(images)
            out.sum().backward()
            return out

        conv_s = conv_times[n_way] = time_runs(conv_step, args.repeats, args.budget)[0]
        reference: Tensor | None = None
        rows: dict[str, str] = {}
        for backend in sorted(backends, key=lambda b: b != "cvxpylayers"):  # the reference first
            prefix = f"{n_way:>5} {backend:<12}"
            if backend in last and last[backend][1] >= MIN_EXTRAPOLATE:
                prev_n, prev_s = last[backend]
                predicted = prev_s * (n_way / prev_n) ** GROWTH[backend]
                if predicted > args.budget:
                    rows[backend] = (
                        f"{prefix} {'skipped':>9}   (~{predicted:,.0f} s predicted from "
                        f"{prev_s:.2f} s at {prev_n}-way > budget {args.budget:.0f} s)"
                    )
                    continue
            seconds, runs, logits, iters, kkt = measure(
                backend, support, labels, query, n_way, args.C, args.repeats, args.budget
            )
            last[backend] = (n_way, seconds)
            if backend == "cvxpylayers":
                reference = logits
            if backend == "qpth-ovr":
                dev = "other QP"
            else:
                dev = "no ref" if reference is None else f"{float((logits - reference).abs().max()):.1e}"
            rows[backend] = (
                f"{prefix} {seconds:>9.3f} {runs:>4} {iters:>5} {kkt:>6} {dev:>9} "
                f"{conv_s:>8.3f} {seconds / conv_s:>7.2f}"
            )
        for backend in backends:
            print(rows[backend], flush=True)
        if "fast" in last and last["fast"][0] == n_way:
            fast_s = last["fast"][1]
            ovr = last.get("qpth-ovr", (0, 0.0))
            versus = f"; qpth-ovr / fast = {ovr[1] / fast_s:.0f}x" if ovr[0] == n_way else ""
            print(f"      -> fast / conv4 = {fast_s / conv_s:.2f}{versus}", flush=True)


if __name__ == "__main__":
    main()
