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

As a classifier (:meth:`scores`, used for accuracy and few-shot evaluation) a query's logit for
class k is ``log sum_{i: y_i = k} exp(s_qi)``: the softmax mass the anchor puts on class k's
support examples (``s_qk`` itself for one shot).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from episodic.errors import check
from episodic.heads.base import HEADS, Head, HeadOutput, LogitScale, full_precision, one_hot
from episodic.tasks.episode import Episode


def class_logsumexp(sim: Tensor, labels: Tensor, n_way: int) -> Tensor:
    """``log sum_{i: labels_i = k} exp(sim[..., i])`` for ``sim [E, Nq, Ns]`` -> ``[E, Nq, n_way]``."""
    m = sim.amax(-1, keepdim=True).detach()
    mass = (sim - m).exp() @ one_hot(labels, n_way, sim.dtype)
    return mass.clamp_min(torch.finfo(sim.dtype).tiny).log() + m


def soft_positive_targets(labels: Tensor, soft: Tensor) -> Tensor:
    """Target weights ``t [E, M, M]`` over candidates from anchor label distributions ``soft [E, M, K]``.

    Candidate ``b`` has the hard label ``labels[b]``; anchor ``a`` puts mass ``soft[a, c]`` on
    label ``c``, shared equally by the candidates ``b != a`` of that label.
    """
    cand = one_hot(labels, soft.shape[-1], soft.dtype)  # [E, M, K]
    counts = cand.sum(1, keepdim=True) - cand  # candidates per label, excluding the anchor itself
    t = (soft / counts.clamp_min(1)) @ cand.transpose(1, 2)
    return t * (1 - torch.eye(t.shape[-1], dtype=t.dtype, device=t.device))


@HEADS.register("contrastive")
class ContrastiveHead(Head):
    """Symmetric InfoNCE over all views of the episode (NT-Xent for two views)."""

    def __init__(self, temperature: float = 0.2, learn_scale: bool = False) -> None:
        super().__init__()
        check(temperature > 0, f"head.params.temperature={temperature} is not allowed; use a value > 0")
        self.scale = LogitScale(1.0 / temperature, learn=learn_scale)

    def scores(self, support: Tensor, support_labels: Tensor, query: Tensor, n_way: int) -> Tensor:
        sim = self.scale(F.normalize(query, dim=-1) @ F.normalize(support, dim=-1).transpose(1, 2))
        return class_logsumexp(sim, support_labels, n_way)

    def similarities(self, episode: Episode) -> tuple[Tensor, Tensor, Tensor]:
        """All-pairs scaled cosine similarities of support+query views, their labels and soft labels."""
        z = F.normalize(full_precision(torch.cat([episode.support, episode.query], 1)), dim=-1)
        labels = torch.cat([episode.support_labels, episode.query_labels], 1)
        soft = one_hot(labels, episode.n_way, z.dtype)
        if episode.mix_weight is not None and episode.query_labels_mix is not None:
            ns, w = episode.support.shape[1], episode.mix_weight.to(z.dtype).unsqueeze(-1)
            mixed = w * soft[:, ns:] + (1 - w) * one_hot(episode.query_labels_mix, episode.n_way, z.dtype)
            soft = torch.cat([soft[:, :ns], mixed], 1)
        return self.scale(z @ z.transpose(1, 2)), labels, soft

    def forward(self, episode: Episode) -> HeadOutput:
        sim, labels, soft = self.similarities(episode)
        m = sim.shape[-1]
        eye = torch.eye(m, dtype=torch.bool, device=sim.device)
        logp = sim.masked_fill(eye, float("-inf")).log_softmax(-1).masked_fill(eye, 0.0)
        loss = -(soft_positive_targets(labels, soft) * logp).sum(-1).mean()
        ns = episode.support.shape[1]
        logits = class_logsumexp(sim[:, ns:, :ns], episode.support_labels, episode.n_way)
        return HeadOutput(loss=loss, logits=logits)
