"""``neighbors``: pseudo-shots as the nearest queue entries of each image's key (no transport).

The episode of :mod:`~episodic.tasks.samplers.psco` with the plain nearest-neighbour choice: image
``i``'s ``K`` shots are the queue rows of highest cosine similarity to its key,
``shots(i) = top-K_j cos(z_i, m_j)`` (NNCLR's support, Dwibedi et al. 2021, with K neighbours as
shots). Without Sinkhorn's column marginals one queue entry can serve as a shot of every class, which
is what PsCo's optimal transport prevents; ``sampler=neighbors`` against ``sampler=psco`` measures that
choice. Everything else (the pairing it needs, the refused task augmentations, the second episode) is
PsCo's sampler's; the selection needs no reduction across processes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from episodic.tasks.samplers.base import SAMPLERS
from episodic.tasks.samplers.psco import PsCoSampler, cosine_scores
from episodic.tasks.scope import ScopePlan


@SAMPLERS.register("neighbors")
class NeighborSampler(PsCoSampler):
    """``views`` episodes plus each image's ``shots`` nearest queue entries as pseudo-shots."""

    def __init__(self, n_supp: int = 1, n_query: int = 1, n_way: int | None = None, shots: int = 4) -> None:
        super().__init__(n_supp, n_query, n_way, shots=shots)

    @torch.no_grad()
    def select(self, keys: Tensor, queue: Tensor, scope: ScopePlan | None = None) -> Tensor:
        return cosine_scores(keys, queue).topk(self.shots, dim=1).indices

    def extra_repr(self) -> str:
        return f"n_supp={self.n_supp}, n_query={self.n_query}, n_way={self.n_way}, shots={self.shots}"
