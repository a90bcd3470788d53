"""``debiased``: Debiased Contrastive Learning (DCL; Chuang et al., NeurIPS 2020).

For an anchor with logits ``l_c`` over its candidate columns, positives ``P`` (target mass
``t_c > 0``) and ``N`` negatives (every other valid column)::

    pos  = sum_{c in P} t_c e^{l_c} / sum_{c in P} t_c                     (the positive estimate)
    Ng   = max( (sum_{c not in P} e^{l_c} - tau_plus * N * pos) / (1 - tau_plus),  N * e^{l_min} )
    loss = - sum_{c in P} t_c * log( e^{l_c} / (sum_{c' in P} e^{l_c'} + Ng) )

With one positive per anchor (two views, contrastive head) this is exactly the official code
(``chingyaoc/DCL`` ``main.py``): ``N = 2B - 2`` in-batch negatives, ``l = cos / t``, floor
``N e^{-1/t}`` (the code calls the clamp optional, but it is always on, and so it is here). With
``M`` positives it is the paper's estimator with ``(1/M) sum_j e^{l_j}`` (target-weighted for mixed
or soft targets); the denominator keeps every positive, as the base head does, so ``tau_plus = 0``
gives the base loss exactly (the floor cannot bind then: every negative term is ``>= e^{l_min}``).

The floor ``l_min`` is the head's smallest possible logit: ``-1/tau`` for the contrastive head,
``-4/tau`` for ProtoNet on unit vectors (prototypes lie in the unit ball), the Student-t kernel's
value at the largest distance when that variant is on. Heads with no bound (R2D2, SVM,
un-normalised or batch-standardised embeddings) use ``N * eps`` instead.

Heads: contrastive - the exact port; protonet - the same formula on prototype logits (the
paper's i.i.d.-negatives argument does not strictly hold for class means: a heuristic); r2d2,
svm - loss-level only: the base learner is still fitted on one-hot support targets that treat
false negatives as negatives (softening those targets would be an extension, not the paper's).

Numerics: computed in fp32/fp64 with a per-anchor shift ``m = max(max_c l_c, log-floor)``, so
neither ``e^{l}`` nor the floor overflows. When the floor binds, the negatives get no gradient;
``extras["dcl/clamped"]`` is the fraction of anchors where it binds (frequent in 5-way episodes).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from episodic.errors import check
from episodic.heads.variants.base import VARIANTS, Variant


@VARIANTS.register("debiased")
class Debiased(Variant):
    """DCL's debiased negative term; ``tau_plus`` is the prior that a "negative" shares the anchor's class:
    about 1 / (number of classes) of the training data (0.1: CIFAR-10; Omniglot wants about 0.01, and 0.1
    costs it 5-7 points; docs/benchmarks.md)."""

    replaces_loss = True

    def __init__(self, tau_plus: float = 0.1, eps: float = 1e-6) -> None:
        super().__init__()
        check(0 <= tau_plus < 1, f"variant.debiased.tau_plus={tau_plus} is not allowed; use 0 <= tau_plus < 1")
        check(eps > 0, f"variant.debiased.eps={eps} is not allowed; use a value > 0")
        self.tau_plus, self.eps = float(tau_plus), float(eps)

    def loss(
        self, logits: Tensor, targets: Tensor, valid: Tensor | None, min_logit: float | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if valid is None:
            valid = torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
        pos, neg = (targets > 0) & valid, (targets == 0) & valid
        floor_logit = min_logit if min_logit is not None else math.log(self.eps)
        masked = logits.masked_fill(~valid, float("-inf"))
        m = masked.amax(-1).detach().clamp_min(floor_logit)  # shift: e^{l - m} <= 1 and the floor <= N
        e = (masked - m.unsqueeze(-1)).exp()
        t = targets * pos
        pos_sum = (e * pos).sum(-1)
        pos_mean = (t * e).sum(-1) / t.sum(-1).clamp_min(torch.finfo(e.dtype).tiny)
        n = neg.sum(-1).to(e.dtype)
        raw = ((e * neg).sum(-1) - self.tau_plus * n * pos_mean) / (1 - self.tau_plus)
        floor = n * torch.exp(floor_logit - m)
        ng = torch.maximum(raw, floor)
        log_den = (pos_sum + ng).log() + m
        nll = -(t * (logits - log_den.unsqueeze(-1))).sum(-1)
        clamped = (raw < floor).to(e.dtype).mean().detach()
        return nll.mean(), {"dcl/clamped": clamped}
