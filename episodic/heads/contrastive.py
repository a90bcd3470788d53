"""Contrastive softmax head: SimCLR's NT-Xent (Chen et al., 2020) cast as an episode.

Every view in the episode (support and query alike) is an anchor scored against all the other
views with cosine similarity over a temperature; its positives are the other views of the same
image (class), everything else is a negative::

    s_ab   = cos(z_a, z_b) / tau
    loss_a = - sum_{b != a} t_ab * log( exp(s_ab) / sum_{c != a} exp(s_ac) )

where ``t_ab`` spreads the anchor's label mass uniformly over the candidates of that label
(``1/|P(a)|`` on each positive; a mixed query splits its mass ``w, 1-w`` over two labels). With
``n_supp = n_query = 1`` this is exactly NT-Xent over the 2N views. Unlike ProtoNet it is
symmetric (queries also classify supports) and counts same-view negatives.

``symmetric=False`` keeps only the queries as anchors and only the support views as candidates:
the one-directional InfoNCE of MoCo (query against keys). A ``memory`` (MoCo's queue) adds
candidate columns that are negatives for every anchor.

As a classifier (:meth:`scores`, used for accuracy and few-shot evaluation) a query's logit for
class k is ``log sum_{i: y_i = k} exp(s_qi)``: the softmax mass the anchor puts on class k's
support examples (``s_qk`` itself for one shot).

Kernel reading (for variants): on unit vectors ``s_ab = -||z_a - z_b||^2 / (2 tau) + 1/tau``, so the
energy is ``u = ||z_a - z_b||^2 / (2 tau)`` and the smallest logit ``-1/tau``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from episodic.errors import check
from episodic.heads.base import (
    HEADS,
    Gathers,
    Geometry,
    HeadOutput,
    KernelHead,
    LogitScale,
    Pairs,
    expand_memory,
    full_precision,
    label_constant,
    one_hot,
    pad_columns,
    query_targets,
)
from episodic.tasks.episode import Episode, joined


def class_logsumexp(sim: Tensor, labels: Tensor, n_way: int) -> Tensor:
    """``log sum_{i: labels_i = k} exp(sim[..., i])`` for ``sim [E, Nq, Ns]`` -> ``[E, Nq, n_way]``."""
    m = sim.amax(-1, keepdim=True).detach()
    mass = (sim - m).exp() @ one_hot(labels, n_way, sim.dtype)
    return mass.clamp_min(torch.finfo(sim.dtype).tiny).log() + m


def class_logits(sim: Tensor, labels: Tensor, n_way: int) -> Tensor:
    """The class logits of :func:`class_logsumexp`, detached (accuracy and histograms). With one support
    example per class (``n_way`` columns, each label once) a class's logit is its column's: one scatter."""
    sim = sim.detach()
    if sim.shape[-1] != n_way:
        return class_logsumexp(sim, labels, n_way)
    return torch.empty_like(sim).scatter_(-1, labels.unsqueeze(1).expand_as(sim), sim)


def soft_positive_targets(labels: Tensor, soft: Tensor) -> Tensor:
    """Target weights ``t [E, M, M]`` over candidates from anchor label distributions ``soft [E, M, K]``.

    Candidate ``b`` has the hard label ``labels[b]``; anchor ``a`` puts mass ``soft[a, c]`` on
    label ``c``, shared equally by the candidates ``b != a`` of that label.
    """
    cand = one_hot(labels, soft.shape[-1], soft.dtype)  # [E, M, K]
    counts = cand.sum(1, keepdim=True) - cand  # candidates per label, excluding the anchor itself
    t = (soft / counts.clamp_min(1)) @ cand.transpose(1, 2)
    return t * (1 - torch.eye(t.shape[-1], dtype=t.dtype, device=t.device))


def spread_targets(soft: Tensor, labels: Tensor) -> Tensor:
    """``[E, A, K]`` anchor label mass -> ``[E, A, N]`` mass per candidate with ``labels [E, N]``,
    shared equally by the candidates of each label."""
    cand = one_hot(labels, soft.shape[-1], soft.dtype)
    return (soft / cand.sum(1, keepdim=True).clamp_min(1)) @ cand.transpose(1, 2)


@HEADS.register("contrastive")
class ContrastiveHead(KernelHead):
    """Symmetric InfoNCE over all views of the episode (NT-Xent for two views)."""

    gathers: ClassVar[Gathers] = "all"  # every view is an anchor

    def __init__(self, temperature: float = 0.2, learn_scale: bool = False, symmetric: bool = True) -> None:
        super().__init__()
        check(temperature > 0, f"head.params.temperature={temperature} is not allowed; use a value > 0")
        self.scale = LogitScale(1.0 / temperature, learn=learn_scale)
        self.symmetric = symmetric

    # kernel: s = scale * <a, c>;  energy u = scale * ||a - c||^2 / 2
    def base_kernel(self, geo: Geometry) -> Tensor:
        return self.scale(geo.dot)

    def energy(self, geo: Geometry) -> Tensor:
        return self.scale(geo.sq_dist()) / 2

    def max_energy(self) -> float | None:
        return 2.0 * self.scale.value  # ||a - c||^2 <= 4 on the unit sphere

    def base_min_logit(self) -> float | None:
        return -self.scale.value

    def scores(self, support: Tensor, support_labels: Tensor, query: Tensor, n_way: int) -> Tensor:
        sim = self.kernel(Geometry.of(self.l2(query), self.l2(support)))
        return class_logsumexp(sim, support_labels, n_way)

    def forward(self, episode: Episode, memory: Tensor | None = None) -> HeadOutput:
        ns = episode.support.shape[1]
        z = self.l2(full_precision(joined([episode.support, episode.query], 1)))
        support = z[:, :ns]
        mem = self.l2(expand_memory(memory, z)) if memory is not None else None
        k = 0 if mem is None else mem.shape[1]
        soft, targets, valid, positive = self.label_terms(episode, z.dtype, k)
        if self.symmetric:
            pairs = Pairs(
                anchors=z,
                cands=z if mem is None else torch.cat([z, mem], 1),
                targets=targets,
                valid=valid,
                anchor_soft=soft,
                support=support,
                support_labels=episode.support_labels,
                n_way=episode.n_way,
                positive=positive,
            )
            rows, cols = slice(ns, None), slice(None, ns)
        else:
            pairs = Pairs(
                anchors=z[:, ns:],
                cands=support if mem is None else torch.cat([support, mem], 1),
                targets=targets,
                valid=None,
                anchor_soft=soft,
                support=support,
                support_labels=episode.support_labels,
                n_way=episode.n_way,
                positive=positive,
            )
            rows, cols = slice(None), slice(None, ns)
        loss, extras, logits, transformed = self.pair_loss(pairs)
        if transformed:  # accuracy and histograms from the untransformed scores
            qs = self.kernel(Geometry.of(pairs.anchors[:, rows], support))
        else:
            qs = logits[:, rows, cols]
        return HeadOutput(loss=loss, logits=class_logits(qs, episode.support_labels, episode.n_way), extras=extras)

    def label_terms(
        self, episode: Episode, dtype: torch.dtype, k: int
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Anchor label mass, targets over the candidates (``k`` memory columns last), the valid mask (no
        anchor is its own candidate) and, when every anchor has a single positive (two views of each
        image, or one support view for one-directional scoring; no mixing), its column. Functions of
        the labels only, so kept while the same label tensors repeat."""
        labels = [episode.support_labels, episode.query_labels]
        mixed = episode.mix_weight is not None and episode.query_labels_mix is not None
        if mixed:
            labels += [episode.query_labels_mix, episode.mix_weight]  # type: ignore[list-item]  # both set
        single = not mixed and (episode.n_supp + episode.n_query == 2 if self.symmetric else episode.n_supp == 1)

        def make() -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
            q_soft = query_targets(episode, dtype)
            if not self.symmetric:
                targets = pad_columns(spread_targets(q_soft, episode.support_labels), k)
                return q_soft, targets, None, targets.argmax(-1) if single else None
            every = torch.cat([episode.support_labels, episode.query_labels], 1)
            soft = torch.cat([one_hot(episode.support_labels, episode.n_way, dtype), q_soft], 1)
            e, m = every.shape
            eye = torch.eye(m, dtype=torch.bool, device=every.device).expand(e, m, m)
            valid = torch.cat([~eye, eye.new_ones(e, m, k)], -1)
            targets = pad_columns(soft_positive_targets(every, soft), k)
            return soft, targets, valid, targets.argmax(-1) if single else None

        return label_constant(make, ("contrastive", self.symmetric, episode.n_way, dtype, k), *labels)
