"""SVM head: MetaOptNet's Crammer-Singer multi-class SVM, solved as a differentiable QP.

For each episode, with support embeddings ``x_i`` (labels ``y_i``), ``K = X X^T`` and ``k = n_way``,
the dual variables solve (see :mod:`episodic.solvers.base`)::

    alpha* = argmin  1/2 sum_k alpha_k^T (K + I) alpha_k - sum_i alpha_i^{y_i}
             s.t.    alpha_i^c <= C [c = y_i],   sum_c alpha_i^c = 0

and a query ``q`` gets ``logit^k = scale * sum_i alpha*_i^k <x_i, q>`` with a learnable positive
``scale`` (MetaOptNet's gamma, initialised to 1). Labels only shape the constraints (no gradient);
gradients reach support and query embeddings through the kernel and ``alpha*``.

``backend`` picks the solver: ``fast`` (structure-exploiting, the default; feasible at 256-way),
``qpth`` or ``cvxpylayers`` (generic references, small episodes only). ``normalize`` L2-normalises
the embeddings first, as the metacontrastive reference does.
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from episodic.errors import check
from episodic.heads.base import HEADS, Head, LogitScale, Scoring
from episodic.solvers.base import SOLVERS, QPSolver


@HEADS.register("svm")
class SVMHead(Head):
    """Crammer-Singer SVM fitted on the support set, scoring the queries.

    Args:
        C: box bound on the dual variables (soft-margin penalty), > 0; MetaOptNet uses 0.1.
        backend: ``fast`` | ``qpth`` | ``cvxpylayers``.
        max_iter: solver iteration cap (``None``: the backend's default).
        tol: accepted KKT residual, the RMS gradient mapping per support row (``None``: default).
        normalize: L2-normalise support and query embeddings before the SVM.
        scale: initial logit scale; ``learn_scale`` makes it a parameter.
        warm_start: ``fast`` only: start from the previous solution when the labels are unchanged.
    """

    scoring: ClassVar[Scoring] = "qp"

    def __init__(
        self,
        C: float = 0.1,
        backend: str = "fast",
        max_iter: int | None = None,
        tol: float | None = None,
        normalize: bool = True,
        scale: float = 1.0,
        learn_scale: bool = True,
        warm_start: bool = True,
    ) -> None:
        super().__init__()
        check(scale > 0, f"head.params.scale={scale!r} is not allowed; use a number > 0")
        options: dict[str, object] = {"C": C, "max_iter": max_iter, "tol": tol}
        if backend == "fast":
            options["warm_start"] = warm_start
        self.solver: QPSolver = SOLVERS.build(backend, **options)
        self.backend, self.normalize = backend, normalize
        self.scale = LogitScale(scale, learn=learn_scale)

    def scores(self, support: Tensor, support_labels: Tensor, query: Tensor, n_way: int) -> Tensor:
        if self.normalize:
            support, query = F.normalize(support, dim=-1), F.normalize(query, dim=-1)
        alpha = self.solver(support, support_labels, n_way)  # [E, n, n_way]
        return self.scale((query @ support.transpose(1, 2)) @ alpha)

    def diagnostics(self) -> dict[str, float]:
        return self.solver.diagnostics()

    def extra_repr(self) -> str:
        return f"C={self.solver.C}, backend={self.backend}, normalize={self.normalize}"
