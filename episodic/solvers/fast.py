"""``backend=fast``: the Crammer-Singer dual by accelerated projected gradient, implicit backward.

It solves exactly the QP of :mod:`episodic.solvers.base` (the one qpth and cvxpylayers solve), in
float64 whatever the input dtype, batched over episodes, using the problem's structure instead of a
generic ``nk x nk`` KKT factorisation:

* **Hessian.** ``kron(K, I_k) + I`` is never formed: a gradient is ``K alpha + alpha - Y``, one
  ``[n, n] x [n, k]`` product, or ``X (X^T alpha)`` when the width ``d < n / 2``. Its largest
  eigenvalue ``L = lambda_max(K) + 1`` comes from the smaller Gram matrix (``d x d`` or ``n x n``);
  its smallest is at least 1 (the ``+ I``), so the condition number is ``L``.
* **Constraints.** Boxes plus one equality per row make each row's feasible set a scaled simplex;
  the projection is exact (sorted entries, :func:`~episodic.solvers.base.project_rows`). Only the
  ``width`` largest entries of each row are sorted (``topk``, 16 to start with: the dual's rows have
  a few non-zeros); the longest support found is kept on the device, and when it reached ``width`` the
  round's host read repeats the round with twice the width; the next solve starts from this
  one's longest support plus a margin.
* **Solver.** FISTA for a 1-strongly convex objective: step ``1 / L``, constant momentum
  ``(sqrt(L) - 1) / (sqrt(L) + 1)``, gradient-based adaptive restart. It converges linearly with
  rate ``1 - 1 / sqrt(L)``: about 30 iterations on spread-out 256-way episodes, a few hundred when
  the embeddings have collapsed to one direction (``L ~ n``).
* **Warm start.** The previous call's solution, when the labels (hence the constraints) are the
  same, competes with a cold start (the exact solution for a diagonal kernel); the one with the
  lower objective is used, so warm start never slows a solve down. Both tests run on the device.
* **Stopping rule and accuracy.** An episode stops when the RMS gradient mapping per support row is
  ``<= tol`` (default ``1e-7``); its iterate is kept from then on while the others go on. Strong
  convexity gives the certificate ``||alpha - alpha*||_F <= 2 sqrt(n) tol``, hence query scores within
  ``2 sqrt(n) tol ||X q||`` of the exact ones (``<= 2 n tol`` on unit-norm embeddings, ``5e-5`` at
  ``n = 256``; observed errors are 10-100x smaller). Not reaching ``tol`` within ``max_iter``
  iterations raises an :class:`~episodic.errors.EpisodicError`; there is no silent fallback.
* **Host reads.** The loop runs a budget of iterations without looking (the iterations the previous
  solve needed, plus a margin), then reads one small tensor: whether every episode has converged, the
  iterations they needed and the largest ``L``. One read per solve in the steady state; a budget that
  was too small costs another round and another read.
* **Backward.** Implicit differentiation of the KKT conditions, not unrolling. On the free set
  ``F = {alpha_i^c < C [c = y_i]}`` the solution satisfies ``((K + I) alpha)_F + nu = Y_F`` with
  the row sums fixed, so for an upstream gradient ``G`` the adjoint ``w`` solves
  ``P (K + I) P w = P G`` (``P``: zero off ``F``, subtract each row's mean over ``F``), a symmetric
  positive definite system solved by conjugate gradients with the same ``K v`` products (condition
  number at most ``L``), and ``dL/dK = -w alpha^T`` gives
  ``dL/dX = -(w (alpha^T X) + alpha (w^T X))``. Like qpth's OptNet backward this assumes strict
  complementarity (no variable at a bound with a zero multiplier), which holds almost surely. The
  number of CG iterations is fixed in advance by CG's bound for condition number ``L`` (read in the
  forward's one host read): ``0.5 sqrt(L) ln(2 / cg_tol)``; converged episodes stop changing, and
  an episode still above ``cg_tol`` after it (only possible through rounding) gets a NaN gradient,
  which the non-finite guard reports: no host read in the backward. A zero (or negligible) projected
  gradient has the adjoint 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from episodic.errors import check
from episodic.solvers.base import (
    SOLVERS,
    QPSolver,
    kernel_matvec,
    lipschitz,
    objective,
    project_rows,
    project_rows_top,
    use_explicit_kernel,
)


def _subspace(free: Tensor, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    """Orthogonal projection onto ``{v : v = 0 off free, every row of v sums to 0}``."""
    count = free.sum(-1, keepdim=True).clamp_min(1)
    keep = free.to(dtype)  # masking by a product: a third of torch.where's time on CPU

    def proj(v: Tensor) -> Tensor:
        v = v * keep
        return (v - v.sum(-1, keepdim=True) / count) * keep

    return proj


class _CSDualFunction(torch.autograd.Function):
    """``support [E, n, d]`` (float64) -> ``alpha [E, n, k]``, with the implicit backward."""

    @staticmethod
    def forward(ctx: Any, support: Tensor, onehot: Tensor, solver: FastSolver) -> Tensor:
        alpha = solver.solve_numeric(support, onehot)
        ctx.solver, ctx.cg_iters = solver, solver.cg_iters
        ctx.save_for_backward(support, alpha, onehot)
        return alpha

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_alpha: Tensor) -> tuple[Tensor | None, None, None]:
        support, alpha, onehot = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        solver: FastSolver = ctx.solver
        w = solver.adjoint(support, alpha, onehot, grad_alpha, ctx.cg_iters)
        grad = -(w @ (alpha.transpose(1, 2) @ support) + alpha @ (w.transpose(1, 2) @ support))
        return grad, None, None


@SOLVERS.register("fast")
class FastSolver(QPSolver):
    """Structure-exploiting solver: FISTA + exact row projections + implicit CG backward.

    Args:
        C, max_iter, tol: see :class:`~episodic.solvers.base.QPSolver` (defaults 2000, 1e-7).
        warm_start: start from the previous solution when the labels are unchanged (and it is better).
        cg_tol: relative residual at which the backward's conjugate gradients stop.
        cg_max_iter: iteration cap of those conjugate gradients.
    """

    default_max_iter = 2000
    default_tol = 1e-7
    checks_itself = True

    def __init__(
        self,
        C: float = 0.1,
        max_iter: int | None = None,
        tol: float | None = None,
        warm_start: bool = True,
        cg_tol: float = 1e-10,
        cg_max_iter: int = 1000,
    ) -> None:
        super().__init__(C, max_iter, tol)
        check(
            cg_tol > 0 and cg_max_iter >= 1,
            f"cg_tol={cg_tol!r}, cg_max_iter={cg_max_iter!r} are not allowed; use > 0 and >= 1",
        )
        self.warm_start = warm_start
        self.cg_tol, self.cg_max_iter = cg_tol, cg_max_iter
        self.last_iters = 0  # FISTA iterations the slowest episode of the last solve needed
        self.rounds = 0  # host reads of the last solve (1 when the budget was large enough)
        self.budget = 16  # iterations run before the next read: the last solve's need plus a margin
        self.cg_iters = cg_max_iter  # CG iterations of the next backward (from the last forward's L)
        self.width = 16  # entries per row the projection sorts (grows when a row's support reaches it)
        self._last: tuple[Tensor, Tensor] | None = None  # (onehot, alpha) of the previous solve

    def reset(self) -> None:
        """Forget the warm-start solution."""
        self._last = None

    def solve(self, support: Tensor, onehot: Tensor) -> Tensor:
        alpha = _CSDualFunction.apply(support.double(), onehot.double(), self)
        return alpha.to(support.dtype)

    def _initial(self, support: Tensor, onehot: Tensor, upper: Tensor) -> Tensor:
        """Cold start (exact for a diagonal kernel) or the previous solution, whichever is better
        (decided on the device)."""
        diag = (support * support).sum(-1, keepdim=True)  # K_ii
        cold = project_rows(onehot / (diag + 1), upper, self.C)
        last = self._last
        if not (self.warm_start and last is not None and last[0].shape == onehot.shape):
            return cold
        warm = last[1]
        same = (last[0] == onehot).flatten(1).all(1)  # the constraints are the same: warm is feasible
        better = same & (objective(warm, support, onehot) < objective(cold, support, onehot))
        return torch.where(better.view(-1, 1, 1), warm, cold)

    @torch.no_grad()
    def solve_numeric(self, support: Tensor, onehot: Tensor) -> Tensor:
        """The optimal ``alpha [E, n, k]`` (float64, no autograd); raises if ``tol`` is not reached."""
        e, n, d = support.shape
        k = onehot.shape[-1]
        upper = self.C * onehot
        kernel = support @ support.transpose(1, 2) if use_explicit_kernel(n, d) else None
        big_l = lipschitz(support).view(e, 1, 1)
        momentum = (big_l.sqrt() - 1) / (big_l.sqrt() + 1)
        x = y = self._initial(support, onehot, upper)
        out = x
        done = torch.zeros(e, dtype=torch.bool, device=support.device)
        needed = torch.zeros(e, dtype=torch.int64, device=support.device)  # iterations until tol
        residual = torch.full((e,), math.inf, dtype=support.dtype, device=support.device)
        it, self.rounds = 0, 0
        while True:
            start = (it, x, y, out, done, needed, residual)
            support_max = torch.zeros((), dtype=torch.int64, device=support.device)  # longest row support
            for _ in range(min(self.budget, self.max_iter - it)):
                grad = kernel_matvec(support, kernel, y) + y - onehot
                x_new, rho = project_rows_top(y - grad / big_l, upper, self.C, self.width)
                support_max = torch.maximum(support_max, rho)
                step = y - x_new
                now = big_l.view(e) * step.flatten(1).norm(dim=1) / math.sqrt(n)
                # an episode stops at tol, or at a NaN residual (NaN input: NaN for the guard)
                stop = ~((now > self.tol) | done)
                out = torch.where(stop.view(e, 1, 1), x_new, out)
                residual = torch.where(done, residual, now)
                needed = torch.where(stop, it + 1, needed)
                done = done | stop
                # O'Donoghue-Candes restart: drop the momentum when it points uphill
                restart = (step * (x_new - x)).sum((1, 2)) > 0
                y = x_new + torch.where(restart.view(e, 1, 1), 0, momentum) * (x_new - x)
                x = x_new
                it += 1
            finished, worst, iters, top, longest = torch.stack(
                [done.all().double(), residual.max(), needed.max().double(), big_l.max(), support_max.double()]
            ).tolist()  # the one host read of a round
            self.rounds += 1
            if self.width < k and longest >= self.width:  # a support may be longer: this round again, wider
                it, x, y, out, done, needed, residual = start
                self.width *= 2
                continue
            if finished or it >= self.max_iter:
                break
            self.budget = min(2 * self.budget, self.max_iter)  # too few: a bigger round
        if not finished:
            self._last = None
            raise self.fail(support, onehot.shape[-1], worst, f"{self.max_iter} FISTA iterations")
        if not (math.isfinite(worst) and math.isfinite(top)):  # non-finite embeddings: NaN for the guard
            self._last = None
            return torch.full_like(out, math.nan)
        self.last_iters = int(iters)
        self.budget = max(8, min(self.max_iter, int(iters * 1.25) + 4))
        self.width = max(16, int(longest * 1.25) + 4)  # the next solve's: room for this one's supports
        self.cg_iters = min(self.cg_max_iter, int(0.5 * math.sqrt(top) * math.log(2 / self.cg_tol)) + 10)
        self._last = (onehot, out)
        return out

    @torch.no_grad()
    def adjoint(self, support: Tensor, alpha: Tensor, onehot: Tensor, grad_alpha: Tensor, iters: int) -> Tensor:
        """Solve ``P (K + I) P w = P grad_alpha`` on the free set by ``iters`` conjugate-gradient
        iterations (no host read; an episode that ends above ``cg_tol`` gets NaN)."""
        e, n, d = support.shape
        kernel = support @ support.transpose(1, 2) if use_explicit_kernel(n, d) else None
        proj = _subspace(alpha < self.C * onehot, alpha.dtype)
        g = grad_alpha.to(alpha.dtype)
        # projected twice: once leaves rounding of g's size outside the subspace, which the system cannot
        # reduce, and which stalls CG when the projection is small (the gradient of a loss flat along
        # the row sums, computed in float32)
        b = proj(proj(g))
        rs = (b * b).sum((1, 2))
        # a projected gradient at rounding level of the incoming one (the gradient of logits.sum(), say,
        # which the free set's row-mean removes): the adjoint is 0
        negligible = rs <= (torch.finfo(rs.dtype).eps * (g * g).sum((1, 2)).sqrt()) ** 2
        target = rs * self.cg_tol**2
        w = torch.zeros_like(b)
        r, p = b, b
        tiny = torch.finfo(rs.dtype).tiny
        for _ in range(iters):
            active = (~negligible & (rs > target)).view(e, 1, 1)
            ap = proj(kernel_matvec(support, kernel, p) + p)
            pap = (p * ap).sum((1, 2))
            a = torch.where(active.view(e) & (pap > 0), rs / pap.clamp_min(tiny), 0).view(e, 1, 1)
            w = w + a * p
            r = r - a * ap
            rs_new = (r * r).sum((1, 2))
            beta = torch.where(rs > 0, rs_new / rs.clamp_min(tiny), 0).view(e, 1, 1)
            p = torch.where(active, r + beta * p, p)
            rs = torch.where(active.view(e), rs_new, rs)
        ok = negligible | (rs <= target)
        return torch.where(ok.view(e, 1, 1), torch.where(negligible.view(e, 1, 1), 0, w), math.nan)
