"""R2D2 head: closed-form ridge regression from support embeddings to one-hot labels
(Bertinetto et al., 2019; MetaOptNet-RR).

With support ``S [n, d]``, one-hot targets ``Y [n, k]`` and ridge penalty ``lam``::

    W = (S^T S + lam I_d)^{-1} S^T Y   (primal, a d x d solve)
      = S^T (S S^T + lam I_n)^{-1} Y   (dual / Woodbury, an n x n solve)
    logits = scale * (Q W) + bias

Both forms give the same classifier; the head solves whichever system is smaller (``solve="auto"``),
with a Cholesky factorisation (the matrix is symmetric positive definite for ``lam > 0``).

Names. The metacontrastive reference divides unit-normalised embeddings by sqrt(T) before the
ridge solve; that leaves the logits unchanged and only rescales the penalty: ``lam_eff = reg * T``
(its defaults reg = 50, T = 0.1 are ``lam = 5`` here). So this head has an honest ``lam`` and a
separate logit ``scale`` (learnable by default, as in MetaOptNet and MetaAug) and optional bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from episodic.errors import check
from episodic.heads.base import HEADS, Head, LogitScale, one_hot


def ridge_weights(support: Tensor, targets: Tensor, lam: float, solve: str = "auto") -> Tensor:
    """Ridge weights ``W [E, d, k]`` for ``support [E, n, d]`` and ``targets [E, n, k]``."""
    n, d = support.shape[-2:]
    primal = d <= n if solve == "auto" else solve == "primal"
    if primal:
        gram = support.transpose(1, 2) @ support  # [E, d, d]
        rhs = support.transpose(1, 2) @ targets
    else:
        gram = support @ support.transpose(1, 2)  # [E, n, n]
        rhs = targets
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    chol = torch.linalg.cholesky(gram + lam * eye)
    x = torch.cholesky_solve(rhs, chol)
    return x if primal else support.transpose(1, 2) @ x


@HEADS.register("r2d2")
class R2D2Head(Head):
    """Ridge regression to one-hot labels, solved in closed form (primal or dual, whichever is smaller)."""

    def __init__(self, lam: float = 5.0, scale: float = 1.0, learn_scale: bool = True, bias: bool = False,
                 normalize: bool = True, solve: str = "auto") -> None:
        super().__init__()
        check(lam > 0, f"head.params.lam={lam} is not allowed; the ridge penalty must be > 0")
        check(solve in ("auto", "primal", "dual"),
              f"head.params.solve={solve!r} is not allowed; use auto, primal or dual")
        self.lam, self.normalize, self.solve = lam, normalize, solve
        self.scale = LogitScale(scale, learn=learn_scale)
        self.bias = nn.Parameter(torch.zeros(())) if bias else None

    def scores(self, support: Tensor, support_labels: Tensor, query: Tensor, n_way: int) -> Tensor:
        if self.normalize:
            support, query = F.normalize(support, dim=-1), F.normalize(query, dim=-1)
        w = ridge_weights(support, one_hot(support_labels, n_way, support.dtype), self.lam, self.solve)
        logits = self.scale(query @ w)
        return logits if self.bias is None else logits + self.bias
