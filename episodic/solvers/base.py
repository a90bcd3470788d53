"""The QP every SVM backend solves, and what the backends share.

MetaOptNet's SVM head is the dual of a Crammer-Singer multi-class SVM. Per episode, with support
rows ``x_i`` (``n = n_way * n_supp`` of them, ``X [n, d]``), labels ``y_i`` in ``[0, k)``,
``k = n_way``, kernel ``K = X X^T`` and dual variables ``alpha [n, k]``::

    minimise    f(alpha) = 1/2 sum_k alpha_k^T (K + I) alpha_k  -  sum_i alpha_i^{y_i}
    subject to  alpha_i^c <= C [c = y_i]      (n * k box constraints)
                sum_c alpha_i^c = 0           (one equality per support row)

(``alpha_k`` is column ``k``). The ``+ I`` is MetaOptNet's ``1.0 * I`` added to the block kernel
``kron(K, I_k)``: it makes ``f`` 1-strongly convex, so the solution is unique. Query ``q`` scores
class ``k`` as ``sum_i alpha_i^k <x_i, q>``.

Each row's feasible set is a shifted, scaled simplex: with ``beta_i = C e_{y_i} - alpha_i`` the
constraints read ``beta_i >= 0, sum_c beta_i^c = C``. :func:`project_rows` projects onto it exactly.

Convergence is measured the same way for every backend, by the gradient mapping
``G(alpha) = L (alpha - P(alpha - grad f(alpha) / L))`` with ``L = lambda_max(K) + 1`` and ``P``
the projection: ``G = 0`` exactly at the optimum, and strong convexity (modulus 1) bounds the
distance to it, ``||alpha - alpha*||_F <= 2 ||G(alpha)||_F``. :func:`kkt_residual` reports the
per-row RMS ``||G||_F / sqrt(n)``; a solve is accepted when it is ``<= tol``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from episodic.errors import EpisodicError, check
from episodic.registry import Registry

SOLVERS: Registry[type[QPSolver]] = Registry("QP backend", "episodic.solvers")


def project_rows(v: Tensor, upper: Tensor, C: float, width: int | None = None) -> Tensor:
    """Euclidean projection of every row of ``v [..., k]`` onto ``{a <= upper, sum(a) = 0}``.

    ``upper`` is ``C`` at the row's label and ``0`` elsewhere, so ``beta = upper - a`` lives on the
    simplex ``{beta >= 0, sum(beta) = C}``: ``a = upper - simplex_rows(upper - v, C)``. ``width``: see
    :func:`simplex_rows`.
    """
    return upper - SimplexRows(v.shape[-1], C, width, v.dtype, v.device)(upper - v)[0]


def simplex_rows(w: Tensor, C: float, width: int | None = None) -> tuple[Tensor, Tensor]:
    """Euclidean projection of every row of ``w [..., k]`` onto ``{beta >= 0, sum(beta) = C}``, and ``u - theta``
    for the sorted entries ``u`` (positive on each row's support): see :class:`SimplexRows`."""
    beta, top, theta = SimplexRows(w.shape[-1], C, width, w.dtype, w.device)(w)
    return beta, top - theta


class SimplexRows:
    """Euclidean projection of every row of ``w [..., k]`` onto the simplex ``{beta >= 0, sum(beta) = C}``,
    with its constants made once (a solver calls it every iteration).

    ``beta = max(w - theta, 0)``, with ``theta`` the root of ``sum(max(w - theta, 0)) = C``. With the
    entries ``u`` sorted decreasingly and their cumulative sums ``S_j``, the running threshold
    ``t_j = (S_j - C) / j`` rises while ``u_j > t_{j-1}`` and falls from the first ``j`` where it does not
    (``t_j`` is a weighted mean of ``t_{j-1}`` and ``u_j``), so its maximum is at the support size and
    ``theta = max_j t_j`` exactly (Held, Wolfe and Crowder; Condat, 2016). A fixed number of kernels, no
    loop, no index arithmetic and no host read.

    ``width``: sort only the ``width`` largest entries of each row (``topk``: a few entries of each row
    are in the support at the dual's solution). Exact for every row whose support is shorter than
    ``width``; ``width=None`` (or ``>= k``): the full sort, always exact. A call returns ``beta``, the
    sorted entries ``u [..., width]`` and ``theta [..., 1]``: ``u - theta`` is positive on each row's
    support, so a positive last entry with ``width < k`` means the support may be longer and the
    projection must be repeated wider (left to the caller: a solver checks it only now and then).
    """

    def __init__(self, k: int, C: float, width: int | None, dtype: torch.dtype, device: torch.device) -> None:
        self.width = k if width is None else min(width, k)
        self.full = self.width == k
        self.inv_ranks = 1 / torch.arange(1, self.width + 1, dtype=dtype, device=device)
        self.offsets = -C * self.inv_ranks  # t_j = S_j / j - C / j

    def __call__(self, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        u = w.sort(-1, descending=True).values if self.full else w.topk(self.width, -1).values
        theta = torch.addcmul(self.offsets, u.cumsum(-1), self.inv_ranks).amax(-1, keepdim=True)
        return (w - theta).clamp_min(0), u, theta


def kernel_matvec(support: Tensor, kernel: Tensor | None, v: Tensor) -> Tensor:
    """``K v`` for ``v [E, n, k]``: with the explicit ``kernel [E, n, n]`` or as ``X (X^T v)``."""
    if kernel is not None:
        return kernel @ v
    return support @ (support.transpose(1, 2) @ v)


def use_explicit_kernel(n: int, d: int) -> bool:
    """Whether ``K v`` is cheaper with ``K [n, n]`` (``n^2 k`` flops) than as ``X (X^T v)`` (``2ndk``)."""
    return n <= 2 * d


def lipschitz(support: Tensor, squarings: int = 6) -> Tensor:
    """An upper bound of ``lambda_max(X X^T) + 1`` per episode, ``[E]``, without an eigensolver (whose
    error check would make the host wait). For the Gram matrix ``G`` (the smaller of ``X X^T`` and
    ``X^T X``) and ``p = 2^squarings``, ``lambda_max^p = ||G^p||_2 <= ||G^p||_F <= sqrt(rank) lambda_max^p``:
    the bound ``||G^p||_F^(1/p)`` is at most ``rank^(1 / 2p)`` above ``lambda_max`` (4.4% for rank 256 at
    six squarings), so FISTA's step stays safe and its rate within about 2% of the exact constant's.
    ``G^p`` by repeated squaring, each square rescaled to unit Frobenius norm (the logs of the scales add
    up), so nothing overflows or underflows. ``squarings`` products of the small Gram matrix."""
    n, d = support.shape[-2:]
    power = support @ support.transpose(1, 2) if n <= d else support.transpose(1, 2) @ support
    # with P_0 = G and P_i = P_{i-1}^2 / f_i (f_i its Frobenius norm): ||G^p||_F^(1/p) = f_0 prod_i f_i^(2^-i)
    tiny = torch.finfo(power.dtype).tiny
    scale = torch.linalg.matrix_norm(power).clamp_min(tiny)
    log_bound = scale.log()
    power = power / scale.view(-1, 1, 1)
    for i in range(1, squarings + 1):
        power = power @ power
        scale = torch.linalg.matrix_norm(power).clamp_min(tiny)
        log_bound = log_bound + scale.log() / 2**i
        power = power / scale.view(-1, 1, 1)
    # a relative 1e-6 margin keeps 1 / L a safe step whatever the rounding of the products
    return log_bound.exp() * (1 + 1e-6) + 1


def objective(alpha: Tensor, support: Tensor, onehot: Tensor) -> Tensor:
    """``f(alpha)`` per episode, ``[E]``."""
    k_alpha = kernel_matvec(support, None, alpha)
    return 0.5 * (alpha * (k_alpha + alpha)).sum((1, 2)) - (alpha * onehot).sum((1, 2))


def kkt_residual(alpha: Tensor, support: Tensor, onehot: Tensor, C: float) -> Tensor:
    """Per-episode RMS gradient mapping ``||G(alpha)||_F / sqrt(n)``, ``[E]`` (0 at the optimum)."""
    alpha, support, onehot = alpha.double(), support.double(), onehot.double()
    big_l = lipschitz(support).view(-1, 1, 1)
    grad = kernel_matvec(support, None, alpha) + alpha - onehot
    step = alpha - project_rows(alpha - grad / big_l, C * onehot, C)
    return (big_l * step).flatten(1).norm(dim=1) / math.sqrt(alpha.shape[1])


def require(module: str, backend: str) -> None:
    """Raise a one-line :class:`EpisodicError` unless ``module`` can be imported."""
    try:
        __import__(module)
    except ImportError as exc:
        raise EpisodicError(
            f"head.params.backend={backend} needs the Python package {module!r}, which is not installed "
            f"({exc}); run `pip install {module}` or use head.params.backend=fast"
        ) from None


class QPSolver:
    """A differentiable solver of the Crammer-Singer dual above, batched over episodes.

    Subclasses implement :meth:`solve` (``support [E, n, d]``, ``onehot [E, n, k]`` ->
    ``alpha [E, n, k]``, differentiable with respect to ``support``); calling the solver checks the
    inputs, solves, and rejects a solution whose KKT residual exceeds ``tol`` with a message that
    names the episode size, the backend and what to change.

    Args:
        C: the box bound on the dual variables (MetaOptNet: 0.1); must be > 0.
        max_iter: iteration cap of the underlying solver (``None``: the backend's default).
        tol: accepted KKT residual (RMS gradient mapping per support row; ``None``: the default).
    """

    name: str = ""
    default_max_iter: int = 100
    default_tol: float = 1e-7
    #: a backend whose :meth:`solve` already enforces ``tol`` skips the generic residual check
    checks_itself: bool = False

    def __init__(self, C: float = 0.1, max_iter: int | None = None, tol: float | None = None) -> None:
        check(
            isinstance(C, (int, float)) and math.isfinite(C) and C > 0,
            f"head.params.C={C!r} is not allowed; the SVM box bound must be a finite number > 0 (MetaOptNet uses 0.1)",
        )
        check(
            max_iter is None or (isinstance(max_iter, int) and max_iter >= 1),
            f"head.params.max_iter={max_iter!r} is not allowed; use an integer >= 1 or null",
        )
        check(
            tol is None or (isinstance(tol, (int, float)) and tol > 0),
            f"head.params.tol={tol!r} is not allowed; use a number > 0 or null",
        )
        self.C = float(C)
        self.max_iter = self.default_max_iter if max_iter is None else max_iter
        self.tol = self.default_tol if tol is None else float(tol)

    def solve(self, support: Tensor, onehot: Tensor) -> Tensor:
        raise NotImplementedError

    def diagnostics(self) -> dict[str, float]:
        """What the last solve cost, as numbers the host already holds (logged every ``train.log_every``
        steps); empty for a backend that does not report."""
        return {}

    def describe(self, support: Tensor, n_way: int) -> str:
        """``'2 episodes of 16-way x 1-shot (256 dual variables each), backend=fast'``."""
        e, n = support.shape[:2]
        shot = f"{n // n_way}-shot" if n % n_way == 0 else f"{n} support rows"
        return (
            f"{e} episode{'s' if e != 1 else ''} of {n_way}-way x {shot} "
            f"({n * n_way} dual variables each), backend={self.name}"
        )

    def fail(self, support: Tensor, n_way: int, residual: float, iters: str) -> EpisodicError:
        """The error for a QP that did not converge."""
        return EpisodicError(
            f"SVM QP did not converge on {self.describe(support, n_way)}: KKT residual {residual:.2e} > "
            f"tol={self.tol:.0e} after {iters}; raise head.params.max_iter (now {self.max_iter}), loosen "
            "head.params.tol, or lower the learning rate if the embeddings are blowing up"
        )

    def __call__(self, support: Tensor, labels: Tensor, n_way: int) -> Tensor:
        """Dual variables ``alpha [E, n, n_way]`` for ``support [E, n, d]`` and ``labels [E, n]``."""
        check(
            support.dim() == 3 and labels.shape == support.shape[:2],
            f"support {tuple(support.shape)} and labels {tuple(labels.shape)} must be [E, n, d] and [E, n]",
        )
        check(n_way >= 2, f"n_way={n_way} is not allowed for the SVM head; use n_way >= 2")
        # one-hot by comparison: F.one_hot reads the labels' range on the host
        onehot = (labels.unsqueeze(-1) == torch.arange(n_way, device=labels.device)).to(support.dtype)
        if self.checks_itself:  # no host read before the solve: it reports non-finite input as NaN itself
            return self.solve(support, onehot)
        check(
            bool(((labels >= 0) & (labels < n_way)).all()),
            f"support labels must lie in [0, {n_way}); got values from {int(labels.min())} to {int(labels.max())}",
        )
        if not bool(torch.isfinite(support).all()):  # a diverged run: NaN for the non-finite guard
            return torch.full((*support.shape[:2], n_way), math.nan, dtype=support.dtype, device=support.device)
        alpha = self.solve(support, onehot)
        residual = kkt_residual(alpha.detach(), support.detach(), onehot, self.C)
        worst = float(residual.max())
        if not math.isfinite(worst) or worst > self.tol:
            raise self.fail(support, n_way, worst, f"at most {self.max_iter} iterations")
        return alpha
