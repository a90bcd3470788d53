"""The head contract.

A head turns the support set of an episode into a classifier and scores the queries::

    scores(support [E, Ns, d], support_labels [E, Ns], query [E, Nq, d], n_way) -> logits [E, Nq, n_way]

``forward(episode)`` returns a :class:`HeadOutput`: the training loss (cross-entropy of the query
logits over the episode's classes, mixed labels included) and the logits it came from. Heads
run in float32 (or float64 when given it) whatever the autocast dtype. A head only overrides ``forward`` when its loss is not
a cross-entropy over ``scores`` (the contrastive head's symmetric loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from episodic.registry import Registry
from episodic.tasks.episode import Episode

HEADS: Registry[type["Head"]] = Registry("head", "episodic.heads")


@dataclass
class HeadOutput:
    """What a head returns for an episode.

    Attributes:
        loss: scalar training loss.
        logits: ``[E, Nq, n_way]`` query scores (used for accuracy and score histograms).
    """

    loss: Tensor
    logits: Tensor


def one_hot(labels: Tensor, n_way: int, dtype: torch.dtype) -> Tensor:
    """``[E, N]`` integer labels -> ``[E, N, n_way]`` one-hot of ``dtype``."""
    return F.one_hot(labels, n_way).to(dtype)


def episode_cross_entropy(logits: Tensor, episode: Episode) -> Tensor:
    """Mean cross-entropy of ``logits [E, Nq, n_way]`` against the episode's query labels.

    With ``episode.mix_weight`` set (mixup / CutMix queries), the loss of query ``j`` is
    ``w_j * CE(label_j) + (1 - w_j) * CE(mix_label_j)``.
    """
    logp = logits.log_softmax(-1)
    nll = -logp.gather(-1, episode.query_labels.unsqueeze(-1)).squeeze(-1)
    if episode.mix_weight is not None and episode.query_labels_mix is not None:
        nll_mix = -logp.gather(-1, episode.query_labels_mix.unsqueeze(-1)).squeeze(-1)
        w = episode.mix_weight.to(nll.dtype)
        nll = w * nll + (1 - w) * nll_mix
    return nll.mean()


def full_precision(x: Tensor) -> Tensor:
    """Half-precision tensors (autocast output) -> float32; float32/float64 pass through."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class Head(nn.Module):
    """Base class: subclasses implement :meth:`scores`; the loss is cross-entropy over it."""

    def scores(self, support: Tensor, support_labels: Tensor, query: Tensor, n_way: int) -> Tensor:
        raise NotImplementedError

    def forward(self, episode: Episode) -> HeadOutput:
        s, q = full_precision(episode.support), full_precision(episode.query)
        logits = self.scores(s, episode.support_labels, q, episode.n_way)
        return HeadOutput(loss=episode_cross_entropy(logits, episode), logits=logits)


class LogitScale(nn.Module):
    """A positive logit multiplier: ``exp(log_scale)`` when learnable, else the exact constant ``init``."""

    def __init__(self, init: float = 1.0, learn: bool = False) -> None:
        super().__init__()
        self.init = float(init)
        self.log_scale = nn.Parameter(torch.tensor(self.init).log()) if learn else None

    @property
    def value(self) -> float:
        return self.init if self.log_scale is None else float(self.log_scale.exp())

    def forward(self, logits: Tensor) -> Tensor:
        return logits * (self.init if self.log_scale is None else self.log_scale.exp())
