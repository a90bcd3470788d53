"""``backend=qpth``: the Crammer-Singer dual as a dense QP for qpth, exactly as MetaOptNet builds it.

qpth's ``QPFunction`` solves ``min 1/2 z^T Q z + p^T z  s.t.  G z <= h,  A z = b`` for a batch with
a primal-dual interior-point method (an LU of the KKT system per iteration) and differentiates the
KKT conditions (OptNet). With ``z = vec(alpha)`` row-major (``z[i * k + c] = alpha_i^c``)::

    Q = kron(K, I_k) + I_{nk}     p = -vec(Y)
    G = I_{nk}                    h = C vec(Y)
    A = kron(I_n, 1_k^T)          b = 0

This is a reference: exact up to the interior-point tolerance, but with ``nk`` dense variables its
cost grows like ``(n k)^3`` per iteration (``n = k = 64``: 4096 variables, about a minute). It runs
in float64 and casts back; gradients reach the embeddings through ``K = X X^T`` inside ``Q``. qpth is
imported on first use, so ``import episodic`` never needs it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from episodic.solvers.base import SOLVERS, QPSolver, require


def cs_dual_qp(support: Tensor, onehot: Tensor, C: float) -> tuple[Tensor, ...]:
    """The dense ``(Q, p, G, h, A, b)`` of the Crammer-Singer dual (``Q`` batched, the rest shared)."""
    e, n, _ = support.shape
    k = onehot.shape[-1]
    nk = n * k
    kernel = support @ support.transpose(1, 2)
    eye_k = torch.eye(k, dtype=support.dtype, device=support.device)
    q_mat = (kernel[:, :, None, :, None] * eye_k[None, None, :, None, :]).reshape(e, nk, nk)
    q_mat = q_mat + torch.eye(nk, dtype=support.dtype, device=support.device)
    p = -onehot.reshape(e, nk)
    g = torch.eye(nk, dtype=support.dtype, device=support.device)
    h = C * onehot.reshape(e, nk)
    a = torch.kron(
        torch.eye(n, dtype=support.dtype, device=support.device),
        torch.ones(1, k, dtype=support.dtype, device=support.device),
    )
    b = torch.zeros(n, dtype=support.dtype, device=support.device)
    return q_mat, p, g, h, a, b


@SOLVERS.register("qpth")
class QpthSolver(QPSolver):
    """qpth's batched interior-point QP on the dense dual (reference backend).

    Args:
        C, max_iter, tol: see :class:`~episodic.solvers.base.QPSolver`; ``max_iter`` is qpth's
            ``maxIter`` (default 50; qpth also stops earlier once its own residuals are below 1e-12).
    """

    default_max_iter = 50
    default_tol = 1e-4

    def __init__(self, C: float = 0.1, max_iter: int | None = None, tol: float | None = None) -> None:
        super().__init__(C, max_iter, tol)
        require("qpth", self.name)

    def solve(self, support: Tensor, onehot: Tensor) -> Tensor:
        from qpth.qp import QPFunction

        e, n, _ = support.shape
        k = onehot.shape[-1]
        qp = cs_dual_qp(support.double(), onehot.double().detach(), self.C)
        z = QPFunction(verbose=-1, maxIter=self.max_iter, check_Q_spd=False)(*qp)
        return z.view(e, n, k).to(support.dtype)
