"""``views``: every image is its own class; its augmented views are the class's examples.

For ``B`` images with ``V = n_supp + n_query`` views each (``x[v, i]``: view ``v`` of image ``i``),
image ``i`` is class ``i % n_way`` of episode ``i // n_way``; views ``0 .. n_supp-1`` are its
support examples, the remaining ``n_query`` its queries, rows view-major inside an episode::

    support[e] = [x[v, e n + c] for v < n_supp for c < n],     support_labels[e] = [0 .. n-1] * n_supp
    query[e]   = [x[v, e n + c] for v >= n_supp for c < n],    query_labels[e]   = [0 .. n-1] * n_query

This is SimCLR's instance discrimination (one support and one query view: NT-Xent's positive pair)
and UMTRA's unsupervised episodes (random images as classes, augmentations as shots).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from episodic.errors import check
from episodic.tasks.episode import Episode
from episodic.tasks.samplers.base import SAMPLERS, Sampler
from episodic.tasks.scope import ScopePlan


@SAMPLERS.register("views")
class ViewSampler(Sampler):
    """Split ``V = n_supp + n_query`` views of ``B`` images into ``B / n_way`` episodes."""

    def __init__(self, n_supp: int = 1, n_query: int = 1, n_way: int | None = None) -> None:
        super().__init__(n_supp, n_query, n_way)
        self._labels: dict[tuple[int, int, torch.device], tuple[Tensor, Tensor]] = {}

    def labels(self, e: int, n_way: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Support and query labels ``[E, n_supp * n_way]``, ``[E, n_query * n_way]``: they depend only on the
        shape, so the same (read-only) tensors are returned every step and the heads' label-derived
        targets and masks are computed once (:func:`episodic.heads.base.label_constant`)."""
        key = (e, n_way, device)
        if key not in self._labels:
            classes = torch.arange(n_way, device=device)
            self._labels[key] = (
                classes.repeat(self.n_supp).expand(e, -1),
                classes.repeat(self.n_query).expand(e, -1),
            )
        return self._labels[key]

    def forward(self, views: Tensor, method: nn.Module | None = None, scope: ScopePlan | None = None) -> Episode:
        """Build episodes from ``views`` of shape ``[V, B, ...]`` (view-major)."""
        v, b = views.shape[:2]
        check(v == self.n_views, f"got {v} views per image but n_supp + n_query = {self.n_views}")
        n_way = self.way(b)
        e = b // n_way
        rest = views.shape[2:]
        # [V, E, n_way, ...] -> [E, V, n_way, ...]: episode-major, view-major inside
        x = views.reshape(v, e, n_way, *rest).transpose(0, 1)
        support = x[:, : self.n_supp].reshape(e, self.n_supp * n_way, *rest)
        query = x[:, self.n_supp :].reshape(e, self.n_query * n_way, *rest)
        support_labels, query_labels = self.labels(e, n_way, views.device)
        return Episode(
            support=support,
            query=query,
            support_labels=support_labels,
            query_labels=query_labels,
            n_way=n_way,
            n_supp=self.n_supp,
            n_query=self.n_query,
        )
