"""``backend=cvxpylayers``: the Crammer-Singer dual written in CVXPY, differentiated by cvxpylayers.

The problem is stated once per shape ``(n, k, d)`` with the support embeddings ``X`` and the one-hot
labels ``Y`` as parameters (DPP-compliant: ``X^T alpha`` is a parameter times a variable)::

    minimise    1/2 ||X^T alpha||_F^2 + 1/2 ||alpha||_F^2 - <Y, alpha>
    subject to  alpha <= C Y,   alpha 1_k = 0

which is the QP of :mod:`episodic.solvers.base` (``sum_k alpha_k^T K alpha_k = ||X^T alpha||_F^2``).
cvxpylayers solves the cone program with diffcp (Clarabel's interior-point method with its tolerances
tightened to 1e-11) and differentiates its residual map, so gradients reach ``X`` directly. A reference:
canonicalisation and solve take seconds from ``n k`` in the low thousands. cvxpy and cvxpylayers are
imported on first use.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from episodic.errors import EpisodicError
from episodic.solvers.base import SOLVERS, QPSolver, require


@SOLVERS.register("cvxpylayers")
class CvxpyLayersSolver(QPSolver):
    """cvxpylayers + diffcp + Clarabel on the CVXPY statement of the dual (reference backend).

    Args:
        C, max_iter, tol: see :class:`~episodic.solvers.base.QPSolver`; ``max_iter`` is Clarabel's
            iteration cap (default 200).
        solve_method: the cone solver diffcp calls (``Clarabel`` or ``SCS``).
    """

    default_max_iter = 200
    default_tol = 1e-4

    def __init__(
        self, C: float = 0.1, max_iter: int | None = None, tol: float | None = None, solve_method: str = "Clarabel"
    ) -> None:
        super().__init__(C, max_iter, tol)
        require("cvxpylayers", self.name)
        require("cvxpy", self.name)
        if solve_method not in ("Clarabel", "SCS"):
            raise EpisodicError(f"solve_method={solve_method!r} is not allowed; use Clarabel or SCS")
        self.solve_method = solve_method
        self._layers: dict[tuple[int, int, int], Any] = {}

    def _layer(self, n: int, k: int, d: int) -> Any:
        key = (n, k, d)
        if key not in self._layers:
            import cvxpy as cp
            from cvxpylayers.torch import CvxpyLayer

            x = cp.Parameter((n, d))
            y = cp.Parameter((n, k))
            alpha = cp.Variable((n, k))
            objective = 0.5 * cp.sum_squares(x.T @ alpha) + 0.5 * cp.sum_squares(alpha) - cp.sum(cp.multiply(y, alpha))
            problem = cp.Problem(cp.Minimize(objective), [alpha <= self.C * y, cp.sum(alpha, axis=1) == 0])
            self._layers[key] = CvxpyLayer(problem, parameters=[x, y], variables=[alpha])
        return self._layers[key]

    def solve(self, support: Tensor, onehot: Tensor) -> Tensor:
        _, n, d = support.shape
        k = onehot.shape[-1]
        args: dict[str, Any] = {"solve_method": self.solve_method}
        if torch.is_grad_enabled() and support.requires_grad:
            # diffcp differentiates by a dense factorisation, exactly (its default, "lsqr", is an iterative
            # least-squares solve that can be percent-level off on small episodes); a solve without
            # gradients goes to the cone solver alone, which takes no such option
            args["mode"] = "dense"
        if self.solve_method == "Clarabel":
            args.update(max_iter=self.max_iter, tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11, tol_ktratio=1e-9)
        else:
            args.update(max_iters=self.max_iter * 1000, eps_abs=1e-10, eps_rel=1e-10)
        try:
            (alpha,) = self._layer(n, k, d)(support.double().cpu(), onehot.double().detach().cpu(), solver_args=args)
        except Exception as exc:  # diffcp / the cone solver raise assorted types on failure
            raise EpisodicError(
                f"SVM QP failed on {self.describe(support, k)}: {type(exc).__name__}: {exc}; "
                "use head.params.backend=fast or qpth, or raise head.params.max_iter"
            ) from None
        return alpha.to(device=support.device, dtype=support.dtype)
