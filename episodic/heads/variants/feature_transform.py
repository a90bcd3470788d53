"""``feature_transform``: positive extrapolation and negative interpolation (FT; Zhu et al., ICCV 2021).

The official code (``DTennant/CL-Visualizing-Feature-Transformation``, ``RGBMoCo_dropmix_norm``
with the README flags ``--sep_alpha --pos_alpha 2.0 --neg_alpha 1.6 --expolation_mask
--dim_mask none``) draws one scalar of each per iteration and, on unit-norm ``q`` and ``k``::

    lam ~ 1 + Beta(alpha_pos, alpha_pos)  in [1, 2]        mu ~ Beta(alpha_neg, alpha_neg)  in [0, 1]
    q^ = lam q + (1 - lam) k,    k^ = lam k + (1 - lam) q                  (harder positive pair)
    n^_j = mu n_j + (1 - mu) n_pi(j)      for every negative, pi a random permutation
    logits = [<q^, k^>, <q^, n^_1>, ...] / T                         (no re-normalisation)

active from the first iteration (``mix_start_epoch = 0``), the queue keeping the original keys.

Here, for every anchor ``a`` of a kernel head, ``k`` is ``p = sum_c t_ac c / sum_c t_ac`` (the
target-weighted mean of its positive columns: its key for one shot, its prototype for ProtoNet)
and each positive column ``c`` becomes ``lam c + (1 - lam) a``; negatives are mixed with the
column ``pi(c)`` of one random permutation, or left alone when ``pi(c)`` is not a negative of that
anchor (a positive must not leak into a negative). With scalar coefficients every transformed dot
product and norm is a linear combination of the original ones, so the head's kernel is applied to
the transformed geometry without materialising vectors; the gradient is that of the feature-level
transform. Per head:

* contrastive (with or without a MoCo queue): the exact port for one positive per anchor;
* protonet: the target column uses ``(q^, p^_y)``, ``p^_y = lam p_y + (1 - lam) q``, and the other
  prototypes are mixed (``-||.||^2`` of the transformed features, not a score-level shortcut);
* the Student-t kernel applies to the transformed (possibly off-sphere) features;
* r2d2 (partial support): only the training queries are extrapolated away from their class's
  support mean, ``q^ = lam q + (1 - lam) p_y``; mixing the ridge's classes would be mixup, not FT;
* svm: refused.

Gradients: the official key is detached (momentum encoder), so the extrapolated anchor
``a^ = lam a + (1 - lam) p`` passes gradient to ``a`` only. ``detach_partner=true`` (default) keeps
that with every pairing: with end-to-end embeddings (``method=simclr``) the partner's negative
coefficient ``1 - lam`` would otherwise push the positive towards the negatives (on digits the
encoder then ends below its random initialisation). With ``method=moco`` both settings give the
same gradient; ``false`` makes the transform fully differentiable.

Not implemented: element-wise coefficients (``--dim_mask pos|neg|both``). Logits for accuracy and
the score histograms come from the untransformed features; the transformed positive and negative
logits go to ``extras`` (``scores/ft_pos``, ``scores/ft_neg``) as the FT visualisation's data.
``positive=false, negative=false`` (or ``lambda_pos=1, lambda_neg=1``) is the base head exactly.
Coefficients come from torch's global generator (seeded by the trainer).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Beta

from episodic.errors import check
from episodic.heads.base import Geometry, Pairs, prototypes
from episodic.heads.variants.base import VARIANTS, Variant


@VARIANTS.register("feature_transform")
class FeatureTransform(Variant):
    """Extrapolated (harder) positives and interpolated (mixed) negatives."""

    conflicts = ("soft_neighbors",)
    applies_to = ("kernel", "ridge")
    refusal = "its classes come from a fitted QP; use head=contrastive, protonet or r2d2"

    def __init__(
        self,
        alpha_pos: float = 2.0,
        alpha_neg: float = 1.6,
        positive: bool = True,
        negative: bool = True,
        lambda_pos: float | None = None,
        lambda_neg: float | None = None,
        detach_partner: bool = True,
    ) -> None:
        super().__init__()
        check(
            alpha_pos > 0 and alpha_neg > 0,
            f"variant.feature_transform.alpha_pos/alpha_neg={alpha_pos}/{alpha_neg} are not allowed; use values > 0",
        )
        check(
            lambda_pos is None or 1 <= lambda_pos <= 2,
            f"variant.feature_transform.lambda_pos={lambda_pos} is not allowed; use null or a value in [1, 2]",
        )
        check(
            lambda_neg is None or 0 <= lambda_neg <= 1,
            f"variant.feature_transform.lambda_neg={lambda_neg} is not allowed; use null or a value in [0, 1]",
        )
        self.alpha_pos, self.alpha_neg = float(alpha_pos), float(alpha_neg)
        self.positive, self.negative = positive, negative
        self.lambda_pos, self.lambda_neg = lambda_pos, lambda_neg
        self.detach_partner = detach_partner

    def sample_pos(self, like: Tensor) -> float | Tensor:
        """lambda+ in [1, 2]: fixed, or ``1 + Beta(alpha_pos, alpha_pos)`` drawn on ``like``'s device (a
        0-d tensor, never read by the host)."""
        if self.lambda_pos is not None:
            return float(self.lambda_pos)
        a = torch.full((), self.alpha_pos, dtype=torch.float64, device=like.device)  # a fill, not a copy
        return 1.0 + Beta(a, a, validate_args=False).sample()

    def sample_neg(self, like: Tensor) -> float | Tensor:
        """lambda- in [0, 1]: fixed, or ``Beta(alpha_neg, alpha_neg)`` on ``like``'s device."""
        if self.lambda_neg is not None:
            return float(self.lambda_neg)
        a = torch.full((), self.alpha_neg, dtype=torch.float64, device=like.device)
        return Beta(a, a, validate_args=False).sample()

    def transform_geometry(self, geo: Geometry, pairs: Pairs) -> Geometry:
        if not (self.positive or self.negative):
            return geo
        a, c, t = pairs.anchors, pairs.cands, pairs.targets
        valid = pairs.valid_mask()
        pos, neg = (t > 0) & valid, (t == 0) & valid
        dot = geo.dot
        na, nc = geo.na.expand_as(dot), geo.nc.expand_as(dot)
        dhat, na_hat, new_dot, new_nc = dot, na, dot, nc
        if self.positive:
            lam = self.sample_pos(dot)
            w = t * pos
            p = prototypes(c, w.transpose(1, 2), torch.finfo(w.dtype).tiny)  # [E, A, d]: each anchor's partner
            p = p.detach() if self.detach_partner else p
            ap, pp = (a * p).sum(-1, keepdim=True), p.pow(2).sum(-1, keepdim=True)
            dhat = lam * dot + (1 - lam) * (p @ c.transpose(1, 2))  # <a^, c>
            na_hat = (lam**2 * geo.na + 2 * lam * (1 - lam) * ap + (1 - lam) ** 2 * pp).expand_as(dot)
            a_ahat = lam * geo.na + (1 - lam) * ap  # <a^, a>
            new_dot = torch.where(pos, lam * dhat + (1 - lam) * a_ahat, dhat)
            new_nc = torch.where(pos, lam**2 * nc + 2 * lam * (1 - lam) * dot + (1 - lam) ** 2 * na, nc)
        if self.negative:
            mu = self.sample_neg(dot)
            n_cols = c.shape[1]
            perm = torch.randperm(n_cols).to(c.device)
            cols = torch.arange(n_cols, device=c.device)
            partner = torch.where(neg & neg[..., perm], perm, cols)  # [E, A, C]
            cc = torch.where(partner == cols, nc, (c * c[:, perm]).sum(-1).unsqueeze(1).expand_as(dot))
            mixed_dot = mu * dhat + (1 - mu) * dhat.gather(-1, partner)
            mixed_nc = mu**2 * nc + 2 * mu * (1 - mu) * cc + (1 - mu) ** 2 * nc.gather(-1, partner)
            new_dot = torch.where(neg, mixed_dot, new_dot)
            new_nc = torch.where(neg, mixed_nc, new_nc)
        return Geometry(new_dot, na_hat, new_nc)

    def transform_queries(self, query: Tensor, support: Tensor, support_targets: Tensor, query_soft: Tensor) -> Tensor:
        if not self.positive:
            return query
        lam = self.sample_pos(query)
        p = query_soft @ prototypes(support, support_targets, 1e-12)
        return lam * query + (1 - lam) * (p.detach() if self.detach_partner else p)

    def extra_repr(self) -> str:
        return (
            f"alpha_pos={self.alpha_pos}, alpha_neg={self.alpha_neg}, positive={self.positive}, "
            f"negative={self.negative}"
        )
