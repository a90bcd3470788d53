"""Episodes: an unlabeled batch of B images seen as B/n_way few-shot tasks.

Every image is its own class. Each image comes with ``V = n_supp + n_query`` augmented views,
stored view-major (``x[v, i]`` is view ``v`` of image ``i``). Image ``i`` belongs to episode
``i // n_way`` as class ``i % n_way``; views ``0 .. n_supp-1`` are its support examples and the
remaining ``n_query`` views its queries. Support and query rows are ordered view-major inside an
episode, so ``support_labels = [0, 1, .., n_way-1] * n_supp``.

The same :class:`Episode` carries images (before the encoder) and embeddings (after it), so task
augmentations act on images and heads act on embeddings with one type.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import Tensor

from episodic.errors import check


@dataclass
class Episode:
    """A batch of ``E`` few-shot tasks with ``n_way`` classes each.

    Attributes:
        support: ``[E, n_way * n_supp, ...]`` images or embeddings.
        query: ``[E, Nq, ...]`` (``Nq = n_way * n_query`` unless a task augmentation changed it).
        support_labels: ``[E, n_way * n_supp]`` class index in ``[0, n_way)``.
        query_labels: ``[E, Nq]`` class index of each query.
        n_way, n_supp, n_query: the task's shape.
        query_labels_mix: optional second label per query (mixup / CutMix against another class).
        mix_weight: ``[E, Nq]`` weight of ``query_labels`` in the loss (``1 - w`` goes to the mix label).
    """

    support: Tensor
    query: Tensor
    support_labels: Tensor
    query_labels: Tensor
    n_way: int
    n_supp: int
    n_query: int
    query_labels_mix: Tensor | None = None
    mix_weight: Tensor | None = None

    @property
    def n_episodes(self) -> int:
        return self.support.shape[0]

    def replace(self, **changes: object) -> "Episode":
        return replace(self, **changes)

    def embed(
        self,
        encoder: Callable[[Tensor], Tensor],
        support_encoder: Callable[[Tensor], Tensor] | None = None,
    ) -> "Episode":
        """Run images through ``encoder`` and return the same episode holding embeddings.

        With one encoder, support and query go through a single forward (BatchNorm sees every
        view). ``support_encoder`` (e.g. a momentum encoder) embeds the support set instead.
        """
        e, ns = self.support.shape[:2]
        nq = self.query.shape[1]
        if support_encoder is None:
            flat = torch.cat([self.support.flatten(0, 1), self.query.flatten(0, 1)])
            z = encoder(flat)
            zs, zq = z[: e * ns], z[e * ns :]
        else:
            zs = support_encoder(self.support.flatten(0, 1))
            zq = encoder(self.query.flatten(0, 1))
        return self.replace(support=zs.view(e, ns, -1), query=zq.view(e, nq, -1))


class ViewSampler:
    """Split ``V = n_supp + n_query`` views of ``B`` images into ``B / n_way`` episodes."""

    def __init__(self, n_supp: int = 1, n_query: int = 1, n_way: int | None = None) -> None:
        check(isinstance(n_supp, int) and n_supp >= 1, f"n_supp={n_supp!r} is not allowed; use an integer >= 1")
        check(isinstance(n_query, int) and n_query >= 1, f"n_query={n_query!r} is not allowed; use an integer >= 1")
        check(n_way is None or (isinstance(n_way, int) and n_way >= 2),
              f"n_way={n_way!r} is not allowed; use an integer >= 2 or null (the whole batch)")
        self.n_supp, self.n_query, self.n_way = n_supp, n_query, n_way

    @property
    def n_views(self) -> int:
        return self.n_supp + self.n_query

    def way(self, batch_size: int) -> int:
        """The number of classes per episode for a batch of ``batch_size`` images."""
        n_way = self.n_way or batch_size
        check(batch_size % n_way == 0,
              f"n_way={n_way} does not divide the batch of {batch_size} images; "
              f"use a divisor of {batch_size} (or n_way=null for one episode per batch)")
        return n_way

    def __call__(self, views: Tensor) -> Episode:
        """Build episodes from ``views`` of shape ``[V, B, ...]`` (view-major)."""
        v, b = views.shape[:2]
        check(v == self.n_views,
              f"got {v} views per image but n_supp + n_query = {self.n_views}")
        n_way = self.way(b)
        e = b // n_way
        rest = views.shape[2:]
        # [V, E, n_way, ...] -> [E, V, n_way, ...]: episode-major, view-major inside
        x = views.reshape(v, e, n_way, *rest).transpose(0, 1)
        support = x[:, : self.n_supp].reshape(e, self.n_supp * n_way, *rest)
        query = x[:, self.n_supp :].reshape(e, self.n_query * n_way, *rest)
        labels = torch.arange(n_way, device=views.device)
        return Episode(
            support=support,
            query=query,
            support_labels=labels.repeat(self.n_supp).expand(e, -1),
            query_labels=labels.repeat(self.n_query).expand(e, -1),
            n_way=n_way,
            n_supp=self.n_supp,
            n_query=self.n_query,
        )
