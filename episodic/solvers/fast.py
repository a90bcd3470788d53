"""``backend=fast``: the Crammer-Singer dual by accelerated projected gradient, implicit backward.

It solves exactly the QP of :mod:`episodic.solvers.base` (the one qpth and cvxpylayers solve), in
float64 whatever the input dtype, batched over episodes, using the problem's structure instead of a
generic ``nk x nk`` KKT factorisation:

* **Hessian.** ``kron(K, I_k) + I`` is never formed: a gradient is ``K alpha + alpha - Y``, one
  ``[n, n] x [n, k]`` product, or ``X (X^T alpha)`` when the width ``d < n / 2``. Its largest
  eigenvalue ``L = lambda_max(K) + 1`` comes from the smaller Gram matrix (``d x d`` or ``n x n``);
  its smallest is at least 1 (the ``+ I``), so the condition number is ``L``.
* **Variables.** The iterates are ``beta = C Y - alpha``, whose rows live on the simplex
  ``{beta >= 0, sum = C}``: FISTA's gradient step is then one affine map, ``M beta + b`` (one
  ``baddbmm`` per iteration, ``M`` and ``b`` made once per solve), and the projection is the simplex's.
* **Constraints.** Boxes plus one equality per row make each row's feasible set a scaled simplex;
  the projection is exact (sorted entries, :class:`~episodic.solvers.base.SimplexRows`). Only the
  ``width`` largest entries of each row are sorted (``topk``, 16 to start with: the dual's rows have
  a few non-zeros). The projections the stopping test uses must be exact: their longest support is kept
  on the device, and when it reached ``width`` the round's host read repeats the round with twice the
  width; the next solve sorts this one's longest support plus a margin.
* **Solver.** FISTA for a 1-strongly convex objective: step ``1 / L``, constant momentum
  ``(sqrt(L) - 1) / (sqrt(L) + 1)``, gradient-based adaptive restart, tested with the stopping test
  (``restart_every``): on unit-norm embeddings (the head's default) it fires once or never in a solve,
  early, and testing it every iteration saves no iterations; on raw ones it saves up to a fifth, for
  more operators than it saves (``tests/test_svm_head.py``). It converges linearly with rate
  ``1 - 1 / sqrt(L)``: about 30 iterations on spread-out 256-way episodes, a few hundred when the
  embeddings have collapsed to one direction (``L ~ n``). An iteration is 9 operators (the step, the
  projection, the momentum), plus about 15 at each stopping test: what a GPU pays for, as they are
  launched one by one.
* **Warm start.** The previous call's solution, when the labels (hence the constraints) are the
  same, competes with a cold start (the exact solution for a diagonal kernel); the one with the
  lower objective is used, so warm start never slows a solve down. Both tests run on the device.
* **Stopping rule and accuracy.** Every 8th iteration (``check_every``: the test is about ten
  operators, the restart test four more), an episode stops when the RMS gradient mapping per support
  row is ``<= tol`` (default ``1e-7``); its iterate is kept from then on while the others go on. Strong
  convexity gives the certificate ``||alpha - alpha*||_F <= 2 sqrt(n) tol``, hence query scores within
  ``2 sqrt(n) tol ||X q||`` of the exact ones (``<= 2 n tol`` on unit-norm embeddings, ``5e-5`` at
  ``n = 256``; observed errors are 10-100x smaller). Not reaching ``tol`` within ``max_iter``
  iterations raises an :class:`~episodic.errors.EpisodicError`; there is no silent fallback.
* **Host reads.** The loop runs a budget of iterations without looking (the iterations the previous
  solve needed, plus an eighth), then reads one small tensor: whether every episode has converged, the
  iterations they needed, the largest ``L``, the longest support and the backward's condition bound.
  One read per solve in the steady state; a budget that was too small costs another round (as long as
  FISTA's rate needs to reach ``tol`` from the residual read) and another read.
* **Backward.** Implicit differentiation of the KKT conditions, not unrolling. On the free set
  ``F = {alpha_i^c < C [c = y_i]}`` the solution satisfies ``((K + I) alpha)_F + nu = Y_F`` with
  the row sums fixed, so for an upstream gradient ``G`` the adjoint ``w`` solves
  ``P (K + I) P w = P G`` (``P``: zero off ``F``, subtract each row's mean over ``F``), a symmetric
  positive definite system solved by conjugate gradients with the same ``K v`` products (condition
  number at most ``L``), and ``dL/dK = -w alpha^T`` gives
  ``dL/dX = -(w (alpha^T X) + alpha (w^T X))``. Like qpth's OptNet backward this assumes strict
  complementarity (no variable at a bound with a zero multiplier), which holds almost surely. The
  number of CG iterations is fixed in advance by CG's bound for the system's condition number
  ``kappa`` (read in the forward's one host read): ``0.5 sqrt(kappa) ln(2 / cg_tol)``. On the free set
  the system is ``kron(K, I) + I`` restricted to each column's free rows ``F_c``, so ``kappa`` is at
  most ``1 + max_c ||K[F_c, F_c]||_F``, and at most ``L``: below ``L`` when each class has few free
  rows. Converged episodes stop changing, and an episode still above ``cg_tol`` after it (only
  possible through rounding) gets a NaN gradient, which the non-finite guard reports: no host read in
  the backward. A zero (or negligible) projected gradient has the adjoint 0. A CG iteration is about 15
  operators.
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
    SimplexRows,
    lipschitz,
    objective,
    project_rows,
    use_explicit_kernel,
)


def _subspace(free: Tensor, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    """Orthogonal projection onto ``{v : v = 0 off free, every row of v sums to 0}``."""
    keep = free.to(dtype)  # masking by a product: a third of torch.where's time on CPU
    inv_count = 1 / keep.sum(-1, keepdim=True).clamp_min(1)

    def proj(v: Tensor) -> Tensor:
        v = v * keep
        return torch.addcmul(v, keep, v.sum(-1, keepdim=True) * inv_count, value=-1)

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
    #: iterations between two stopping tests (on the device; each is about ten operators)
    check_every = 8
    #: iterations between two restart tests (each needs the gradient mapping, which the stopping test computes)
    restart_every = 8

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
        self.ran = 0  # FISTA iterations the last solve ran (its rounds' budgets, repeated rounds included)
        self.condition = 1.0  # the bound on the condition number of the last solve's backward system
        self.rounds = 0  # host reads of the last solve (1 when the budget was large enough)
        self.budget = 16  # iterations run before the next read: the last solve's need plus a margin
        self.cg_iters = cg_max_iter  # CG iterations of the next backward (from the last forward's L)
        self.width = 16  # entries per row the projection sorts (grows when a row's support reaches it)
        self._last: tuple[Tensor, Tensor] | None = None  # (onehot, alpha) of the previous solve

    def reset(self) -> None:
        """Forget the warm-start solution."""
        self._last = None

    def diagnostics(self) -> dict[str, float]:
        """The last solve's FISTA iterations (needed by its slowest episode, and run), its host reads, the
        backward's condition bound and the CG iterations that bound gave its backward."""
        return {
            "solver_iters": self.last_iters,
            "solver_ran": self.ran,
            "solver_reads": self.rounds,
            "solver_condition": self.condition,
            "solver_cg_iters": self.cg_iters,
        }

    def solve(self, support: Tensor, onehot: Tensor) -> Tensor:
        alpha = _CSDualFunction.apply(support.double(), onehot.double(), self)
        return alpha.to(support.dtype)

    def _initial(self, support: Tensor, onehot: Tensor, upper: Tensor) -> Tensor:
        """``beta`` of the cold start (exact for a diagonal kernel) or of the previous solution, whichever
        is better (decided on the device)."""
        diag = (support * support).sum(-1, keepdim=True)  # K_ii
        cold = project_rows(onehot / (diag + 1), upper, self.C)
        last = self._last
        if not (self.warm_start and last is not None and last[0].shape == onehot.shape):
            return upper - cold
        warm = upper - last[1]
        same = (last[0] == onehot).flatten(1).all(1)  # the constraints are the same: warm is feasible
        better = same & (objective(warm, support, onehot) < objective(cold, support, onehot))
        return upper - torch.where(better.view(-1, 1, 1), warm, cold)

    @torch.no_grad()
    def solve_numeric(self, support: Tensor, onehot: Tensor) -> Tensor:
        """The optimal ``alpha [E, n, k]`` (float64, no autograd); raises if ``tol`` is not reached."""
        e, n, _ = support.shape
        k, every = onehot.shape[-1], self.check_every
        upper = self.C * onehot
        big_l = lipschitz(support).view(e, 1, 1)
        kernel = support @ support.transpose(1, 2)
        gradient_step = _gradient_step(support, kernel, onehot, big_l, self.C)
        squared = kernel * kernel  # for the backward's condition number, below
        momentum = (big_l.sqrt() - 1) / (big_l.sqrt() + 1)
        to_residual = (big_l.view(e) / math.sqrt(n)).to(support.dtype)  # RMS gradient mapping per ||step||
        x = y = out = self._initial(support, onehot, upper)
        done = torch.zeros(e, dtype=torch.bool, device=support.device)
        needed = torch.zeros(e, dtype=torch.int64, device=support.device)  # iterations until tol
        residual = torch.full((e,), math.inf, dtype=support.dtype, device=support.device)
        it, self.rounds, self.ran, size = 0, 0, 0, self.budget
        while True:
            start = (it, x, y, out, done, needed, residual)
            project = SimplexRows(k, self.C, self.width, support.dtype, support.device)
            reach = torch.full((e, n, project.width), -math.inf, dtype=support.dtype, device=support.device)
            count = min(size, self.max_iter - it)
            self.ran += count
            for _ in range(count):
                x_new, largest, theta = project(gradient_step(y))
                moved = x_new - x
                it += 1
                gain = momentum
                check = it % every == 0 or it == self.max_iter
                if check or it % self.restart_every == 0:
                    mapping = x_new - y  # the gradient mapping over -L
                    # O'Donoghue-Candes restart: drop the momentum when it points uphill, <G, x_new - x> > 0
                    # in alpha; with the strongly convex momentum it rarely fires (once or never in a unit-norm solve)
                    gain = momentum * (_dot(mapping, moved) >= 0)
                if check:
                    # the projections the stopping test uses must be exact (a support shorter than width);
                    # one in between that is not only slows FISTA down: the certificate
                    # ||y - alpha*|| <= 2 ||G(y)|| holds for any y, feasible or not
                    # positive where a row's support reached (a prefix of the sorted entries)
                    reach = torch.maximum(reach, largest - theta)
                    # an episode stops at tol, or at a NaN residual (NaN input: NaN for the guard)
                    now = mapping.flatten(1).norm(dim=1) * to_residual
                    stop = ~((now > self.tol) | done)
                    out = torch.where(stop.view(e, 1, 1), x_new, out)
                    residual = torch.where(done, residual, now)
                    needed = torch.where(stop, it, needed)
                    done = done | stop
                y = torch.addcmul(x_new, gain, moved)
                x = x_new
            longest = (reach > 0).sum(-1).amax()  # the longest support at the round's stopping tests
            # the backward's system lives on the free set F (beta > 0); its largest eigenvalue is at most
            # 1 + max_c ||K[F_c, F_c]||_F (F_c: the rows free in column c), and at most L
            free = (out > 0).to(out.dtype)
            block = ((squared @ free) * free).sum(1).amax(-1).sqrt() + 1
            finished, worst, iters, top, supported, condition = torch.stack(
                [
                    done.all().double(),
                    residual.max(),
                    needed.max().double(),
                    big_l.max(),
                    longest.double(),
                    torch.minimum(block, big_l.view(e)).max().double(),
                ]
            ).tolist()  # the one host read of a round
            self.rounds += 1
            if project.width < k and supported >= project.width:  # a support may be longer: again, wider
                it, x, y, out, done, needed, residual = start
                self.width *= 2
                continue
            if finished or it >= self.max_iter or not (math.isfinite(worst) and math.isfinite(top)):
                break
            # another round, as long as FISTA's rate 1 - 1/sqrt(L) needs to bring the residual down to tol
            size = _multiple(max(every, int(math.sqrt(top) * math.log(worst / self.tol))), every)
        if not (math.isfinite(worst) and math.isfinite(top)):  # non-finite embeddings: NaN for the guard
            self._last = None
            return torch.full_like(out, math.nan)
        if not finished:
            self._last = None
            raise self.fail(support, k, worst, f"{self.max_iter} FISTA iterations")
        self.last_iters = int(iters)
        # the next solve's round: this one's need plus a margin for the embeddings' drift between steps
        self.budget = min(self.max_iter, _multiple(int(iters) + max(every, int(iters) // 8), every))
        self.width = max(16, int(supported * 1.25) + 4)  # the next solve's: room for this one's supports
        self.condition = condition
        self.cg_iters = min(self.cg_max_iter, int(0.5 * math.sqrt(condition) * math.log(2 / self.cg_tol)) + 10)
        alpha = upper - out
        self._last = (onehot, out)
        return alpha

    @torch.no_grad()
    def adjoint(self, support: Tensor, alpha: Tensor, onehot: Tensor, grad_alpha: Tensor, iters: int) -> Tensor:
        """Solve ``P (K + I) P w = P grad_alpha`` on the free set by ``iters`` conjugate-gradient
        iterations (no host read; an episode that ends above ``cg_tol`` gets NaN)."""
        e, n, d = support.shape
        proj = _subspace(alpha < self.C * onehot, alpha.dtype)
        explicit = use_explicit_kernel(n, d)
        xt = support.transpose(1, 2)
        hessian = support @ xt + torch.eye(n, dtype=alpha.dtype, device=alpha.device) if explicit else None

        def apply(p: Tensor) -> Tensor:  # (K + I) p
            return hessian.bmm(p) if hessian is not None else torch.baddbmm(p, support, xt @ p)

        g = grad_alpha.to(alpha.dtype)
        # projected twice: once leaves rounding of g's size outside the subspace, which the system cannot
        # reduce, and which stalls CG when the projection is small (the gradient of a loss flat along
        # the row sums, computed in float32)
        b = proj(proj(g))
        rs = _dot(b, b)
        # a projected gradient at rounding level of the incoming one (the gradient of logits.sum(), say,
        # which the free set's row-mean removes): the adjoint is 0, and CG never starts
        negligible = rs <= (torch.finfo(rs.dtype).eps * g.flatten(1).norm(dim=1).view(e, 1, 1)) ** 2
        target = torch.where(negligible, math.inf, rs * self.cg_tol**2)
        w = torch.zeros_like(b)
        r, p = b, b
        tiny, zero = torch.finfo(rs.dtype).tiny, torch.zeros((), dtype=rs.dtype, device=rs.device)
        for _ in range(iters):
            # a converged episode takes zero steps: w and r stay, and p (unused from then on) drifts, finite:
            # it grows by r each iteration (a zero r gives p = 0, whose 0 / 0 the where drops)
            ap = proj(apply(p))
            a = torch.where(rs > target, rs / _dot(p, ap), zero)
            w = torch.addcmul(w, a, p)
            r = torch.addcmul(r, a, ap, value=-1)
            rs, rs_old = _dot(r, r), rs
            p = torch.addcmul(r, rs / rs_old.clamp_min(tiny), p)
        return torch.where(rs <= target, w, math.nan)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """``<a_e, b_e>`` per episode of ``[E, n, k]`` tensors, as ``[E, 1, 1]`` (one kernel)."""
    e = a.shape[0]
    return torch.bmm(a.reshape(e, 1, -1), b.reshape(e, -1, 1))


def _multiple(count: int, every: int) -> int:
    """``count`` rounded up to a multiple of ``every``."""
    return -(-count // every) * every


def _gradient_step(
    support: Tensor, kernel: Tensor, onehot: Tensor, big_l: Tensor, C: float
) -> Callable[[Tensor], Tensor]:
    """FISTA's gradient step in ``beta = C Y - alpha``, ``beta -> beta - grad_beta f / L``, as one affine map.

    With ``grad_alpha f = (K + I) alpha - Y`` and ``alpha = C Y - beta`` the step is
    ``((1 - 1/L) I - K / L) beta + (C K Y + (C - 1) Y) / L``: with the explicit kernel, one ``baddbmm``
    per iteration of a matrix and an offset made once; as ``X (X^T beta)``, three operators."""
    n, d = support.shape[1:]
    inv_l = 1 / big_l
    offset = (C * (kernel @ onehot) + (C - 1) * onehot) * inv_l
    if use_explicit_kernel(n, d):
        eye = torch.eye(n, dtype=support.dtype, device=support.device)
        matrix = eye * (1 - inv_l) - kernel * inv_l
        return lambda beta: torch.baddbmm(offset, matrix, beta)
    xt = support.transpose(1, 2)
    keep, shrink = 1 - inv_l, support * -inv_l
    return lambda beta: torch.baddbmm(torch.addcmul(offset, keep, beta), shrink, xt @ beta)
