"""The ridge head's linear algebra: one symmetric positive definite solve forward and one with the same matrix
backward, done five ways, per matrix size.

    python benchmarks/linalg_solve.py --device cuda                 # 128, 256, 512; 256 right-hand sides
    python benchmarks/linalg_solve.py --device cuda --library cusolver magma --json runs/solve.json

Ways: ``solve`` (``torch.linalg.solve_ex`` twice: two LU factorisations), ``lu`` (``lu_factor_ex`` once,
``lu_solve`` twice), ``cholesky`` (``cholesky_ex`` once, ``cholesky_solve`` twice: what
:mod:`episodic.heads.ridge` does), ``cholesky_triangular`` (the same factor, four ``solve_triangular``) and
``inverse`` (``inv_ex`` once, two products). The matrix is ``S S^T + 0.5 I`` for unit-norm rows ``S``
(a ridge Gram matrix), float32, one episode. Reported per way: milliseconds per forward-and-backward pair
(wall clock over ``--iters`` calls, the device drained before and after), the largest error against a
float64 solve relative to the largest entry, and, on CUDA, the kernels one pair launches (torch.profiler).
``--library``: ``torch.backends.cuda.preferred_linalg_library`` settings to run under (CUDA only).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def _solve(a: Tensor, b: Tensor) -> Tensor:
    x = torch.linalg.solve_ex(a, b).result
    return torch.linalg.solve_ex(a, x).result


def _lu(a: Tensor, b: Tensor) -> Tensor:
    lu, pivots, _ = torch.linalg.lu_factor_ex(a)
    return torch.linalg.lu_solve(lu, pivots, torch.linalg.lu_solve(lu, pivots, b))


def _cholesky(a: Tensor, b: Tensor) -> Tensor:
    low = torch.linalg.cholesky_ex(a).L
    return torch.cholesky_solve(torch.cholesky_solve(b, low), low)


def _cholesky_triangular(a: Tensor, b: Tensor) -> Tensor:
    low = torch.linalg.cholesky_ex(a).L
    up = low.transpose(1, 2)

    def solve(r: Tensor) -> Tensor:
        return torch.linalg.solve_triangular(up, torch.linalg.solve_triangular(low, r, upper=False), upper=True)

    return solve(solve(b))


def _inverse(a: Tensor, b: Tensor) -> Tensor:
    inv = torch.linalg.inv_ex(a).inverse
    return inv @ (inv @ b)


WAYS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "solve": _solve,
    "lu": _lu,
    "cholesky": _cholesky,
    "cholesky_triangular": _cholesky_triangular,
    "inverse": _inverse,
}


def problem(m: int, rhs: int, device: str) -> tuple[Tensor, Tensor]:
    """A ridge Gram matrix ``[1, m, m]`` of unit-norm rows plus ``0.5 I``, and right-hand sides ``[1, m, rhs]``."""
    g = torch.Generator().manual_seed(0)
    s = torch.nn.functional.normalize(torch.randn(1, m, m + 64, generator=g), dim=-1)
    a = s @ s.transpose(1, 2) + 0.5 * torch.eye(m)
    return a.to(device), torch.randn(1, m, rhs, generator=g).to(device)


def kernels(fn: Callable[[], Any]) -> int:
    """CUDA kernels one call of ``fn`` launches."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")


def measure(way: str, m: int, args: argparse.Namespace, library: str) -> dict[str, Any]:
    a, b = problem(m, args.rhs, args.device)
    fn = WAYS[way]
    cuda = a.device.type == "cuda"
    ref = torch.linalg.solve(a.double(), torch.linalg.solve(a.double(), b.double()))
    err = float(((fn(a, b).double() - ref).abs().max() / ref.abs().max()).item())
    for _ in range(10):
        fn(a, b)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        fn(a, b)
    if cuda:
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / args.iters * 1e3
    return {
        "way": way,
        "size": m,
        "rhs": args.rhs,
        "device": args.device,
        "library": library,
        "ms": ms,
        "rel_error": err,
        "kernels": kernels(lambda: fn(a, b)) if cuda else None,
    }


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--rhs", type=int, default=256, help="right-hand sides (the episode's classes)")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--ways", nargs="+", default=list(WAYS), choices=list(WAYS))
    ap.add_argument("--library", nargs="+", default=["default"], choices=["default", "cusolver", "magma"])
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for library in args.library:
        if library != "default":
            torch.backends.cuda.preferred_linalg_library(library)
        for m in args.sizes:
            for way in args.ways:
                r = measure(way, m, args, library)
                rows.append(r)
                launched = "" if r["kernels"] is None else f"  {r['kernels']} kernels"
                print(
                    f"{library:<9} {m:>4} {way:<20} {r['ms']:8.3f} ms  rel. error {r['rel_error']:.1e}{launched}",
                    flush=True,
                )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
