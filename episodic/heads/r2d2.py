"""R2D2 head: closed-form ridge regression from support embeddings to one-hot labels
(Bertinetto et al., 2019; MetaOptNet-RR).

With support ``S [n, d]``, one-hot targets ``Y [n, k]`` and ridge penalty ``lam``::

    W = (S^T S + lam I_d)^{-1} S^T Y   (primal, a d x d solve)
      = S^T (S S^T + lam I_n)^{-1} Y   (dual / Woodbury, an n x n solve)
    logits = scale * (Q W) + bias

Both forms give the same classifier; the head solves whichever system is smaller (``solve="auto"``),
with an LU solve. Training without memory rows or variants takes the fused function of
:mod:`episodic.heads.ridge` (the same logits by one Cholesky factor, its own backward, half the operators).

Names. The metacontrastive reference divides unit-normalised embeddings by sqrt(T) before the
ridge solve; that leaves the logits unchanged and only rescales the penalty: ``lam_eff = reg * T``
(its defaults reg = 50, T = 0.1 are ``lam = 5``; the default here, ``lam = 0.2`` with an initial logit
scale of 10, was tuned on digits). So this head has an honest ``lam`` and a separate logit ``scale``
(learnable by default, as in MetaOptNet and MetaAug) and optional bias.

Extensions used by encoder pairings and variants (all off by default):

* ``memory [K, d]`` (MoCo's queue): ``K`` extra support rows, each its own class (one-hot on a new
  column), so ``Y`` becomes ``[[Y, 0], [0, I_K]]``; queries are scored over ``n_way + K`` classes;
* a variant's ``gram`` (Student-t) turns the ridge into kernel ridge in dual form,
  ``logits = scale * K(Q, S) (K(S, S) + lam I)^{-1} Y``;
* ``augment_support`` (soft neighbours) appends support rows with soft targets;
* ``transform_queries`` (feature transformation) moves the training queries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn

from episodic.errors import check
from episodic.heads.base import (
    HEADS,
    Head,
    HeadOutput,
    LogitScale,
    Scoring,
    expand_memory,
    full_precision,
    one_hot,
    pad_columns,
    query_targets,
)
from episodic.heads.ridge import ridge_eye, ridge_logits, uses_primal
from episodic.tasks.episode import Episode, joined


def _ridge_solve(gram: Tensor, rhs: Tensor, lam: float) -> Tensor:
    """``(gram + lam I)^{-1} rhs`` by an LU solve, whose backward is one more solve with the same factors
    (a Cholesky factorisation's backward launches about twice the kernels). No host read and no exception:
    a system that cannot be solved (a zero pivot; non-finite embeddings of a diverging run) comes out
    inf or NaN, which the non-finite guard catches and names the step of."""
    return torch.linalg.solve_ex(gram + ridge_eye(gram, lam), rhs).result


def ridge_weights(
    support: Tensor, targets: Tensor, lam: float, solve: str = "auto", memory: Tensor | None = None
) -> Tensor:
    """Ridge weights ``W [E, d, k (+ K)]`` for ``support [E, n, d]`` and ``targets [E, n, k]``, plus
    ``memory [E, K, d]`` rows that are each their own class (targets ``[[Y, 0], [0, I_K]]``). In the primal
    the memory's targets are never formed: ``S^T Y`` is ``[S^T Y, M^T]`` (a queue of 65536 rows would make
    them 65536 x 65536)."""
    n, d = support.shape[-2:]
    primal = uses_primal(n + (0 if memory is None else memory.shape[1]), d, solve)
    if memory is None:
        if primal:
            return _ridge_solve(support.transpose(1, 2) @ support, support.transpose(1, 2) @ targets, lam)
        return support.transpose(1, 2) @ _ridge_solve(support @ support.transpose(1, 2), targets, lam)
    if primal:
        st, mt = support.transpose(1, 2), memory.transpose(1, 2)
        return _ridge_solve(st @ support + mt @ memory, torch.cat([st @ targets, mt], -1), lam)
    return ridge_weights(*with_memory(support, targets, memory), lam, "dual")


def with_memory(support: Tensor, targets: Tensor, memory: Tensor) -> tuple[Tensor, Tensor]:
    """Support rows and targets with ``memory [E, K, d]`` appended, each memory row a class of its own:
    ``[S; M]`` and ``[[Y, 0], [0, I_K]]`` (dense: for the dual and kernel forms, where ``K`` is small)."""
    k = memory.shape[1]
    eye = torch.eye(k, dtype=targets.dtype, device=targets.device).expand(targets.shape[0], k, k)
    y_mem = torch.cat([eye.new_zeros(*eye.shape[:2], targets.shape[-1]), eye], -1)
    return torch.cat([support, memory], 1), torch.cat([pad_columns(targets, k), y_mem], 1)


def kernel_ridge_coefficients(gram: Tensor, targets: Tensor, lam: float) -> Tensor:
    """Dual coefficients ``alpha = (K + lam I)^{-1} Y`` for a kernel Gram matrix ``K [E, n, n]``."""
    return _ridge_solve(gram, targets, lam)


@HEADS.register("r2d2")
class R2D2Head(Head):
    """Ridge regression to one-hot labels, solved in closed form (primal or dual, whichever is smaller)."""

    scoring: ClassVar[Scoring] = "ridge"
    supports_memory: ClassVar[bool] = True

    def __init__(
        self,
        lam: float = 0.2,
        scale: float = 10.0,
        learn_scale: bool = True,
        bias: bool = False,
        normalize: bool = True,
        solve: str = "auto",
    ) -> None:
        super().__init__()
        check(lam > 0, f"head.params.lam={lam} is not allowed; the ridge penalty must be > 0")
        check(
            solve in ("auto", "primal", "dual"), f"head.params.solve={solve!r} is not allowed; use auto, primal or dual"
        )
        self.lam, self.normalize, self.solve = lam, normalize, solve
        self.scale = LogitScale(scale, learn=learn_scale)
        self.bias = nn.Parameter(torch.zeros(())) if bias else None

    def norm(self, x: Tensor) -> Tensor:
        return self.l2(x) if self.normalize else x

    def fit(self, support: Tensor, targets: Tensor, memory: Tensor | None = None) -> Callable[[Tensor], Tensor]:
        """The fitted classifier ``query [E, Nq, d] -> logits [E, Nq, k (+ K)]`` (linear or kernel ridge;
        ``memory`` rows are classes of their own, see :func:`ridge_weights`)."""
        gram = next((v.gram for v in self.active_variants if v.replaces_kernel), None)
        if gram is None:
            w = ridge_weights(support, targets, self.lam, self.solve, memory)
            return lambda q: self._out(q @ w)
        if memory is not None:
            support, targets = with_memory(support, targets, memory)
        alpha = kernel_ridge_coefficients(gram(support, support), targets, self.lam)
        return lambda q: self._out(gram(q, support) @ alpha)

    def _out(self, raw: Tensor) -> Tensor:
        return self._bias(self.scale(raw))

    def _bias(self, logits: Tensor) -> Tensor:
        return logits if self.bias is None else logits + self.bias

    def scores(self, support: Tensor, support_labels: Tensor, query: Tensor, n_way: int) -> Tensor:
        s = self.norm(support)
        return self.fit(s, one_hot(support_labels, n_way, s.dtype))(self.norm(query))

    def forward(self, episode: Episode, memory: Tensor | None = None) -> HeadOutput:
        # one normalisation of every row (fewer kernels than two)
        both = self.norm(full_precision(joined([episode.support, episode.query], 1)))
        s, q = both.split([episode.support.shape[1], episode.query.shape[1]], 1)
        n = episode.n_way
        y = one_hot(episode.support_labels, n, s.dtype)
        soft = query_targets(episode, q.dtype)
        positive = episode.query_labels if episode.mix_weight is None else None
        if memory is None and not self.active_variants:  # the plain ridge: one fused function
            primal = uses_primal(s.shape[1], s.shape[2], self.solve)
            scale = self.scale
            logits = self._bias(ridge_logits(both, s.shape[1], y, self.lam, scale.init, scale.log_gain, primal))
            loss, extras = self.target_loss(logits, soft, positive=positive)
            return HeadOutput(loss=loss, logits=logits, extras=extras)
        s_all, y_all, q_train = s, y, q
        if self.training:
            for v in self.active_variants:
                s_all, y_all = v.augment_support(s_all, y_all)
                q_train = v.transform_queries(q_train, s, y, soft)
        mem = None if memory is None else self.norm(expand_memory(memory, s))
        k = 0 if mem is None else mem.shape[1]
        classifier = self.fit(s_all, y_all, mem)
        logits = classifier(q_train)
        loss, extras = self.target_loss(logits, pad_columns(soft, k), positive=positive)
        raw = logits if q_train is q else classifier(q)
        return HeadOutput(loss=loss, logits=raw[..., :n], extras=extras)
