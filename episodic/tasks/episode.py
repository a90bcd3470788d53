"""Episodes: a batch of few-shot tasks, each a support set and a query set with their labels.

An episode sampler (:mod:`episodic.tasks.samplers`) builds them from a batch's views; with the
default ``views`` sampler every image is its own class, its first ``n_supp`` views its support
examples and the remaining ``n_query`` views its queries, rows ordered view-major inside an episode
(``support_labels = [0, 1, .., n_way-1] * n_supp``).

The same :class:`Episode` carries images (before the encoder) and embeddings (after it), so task
augmentations act on images and heads act on embeddings with one type.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor


def _back_to_back(parts: list[Tensor], dim: int) -> bool:
    """The parts lie back to back in one storage along ``dim``, each dense (contiguous, or channels-last)
    with ``dim`` outermost and the first's strides from ``dim`` on: together they are one strided tensor."""
    first = parts[0]
    if math.prod(first.shape[:dim]) != 1:  # leading dimensions of size 1: the parts are memory blocks
        return False
    storage, at = first.untyped_storage().data_ptr(), first.data_ptr()
    for p in parts:
        dense = p.is_contiguous() or (p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last))
        if not (
            dense
            and p.untyped_storage().data_ptr() == storage
            and p.dtype == first.dtype
            and p.stride()[dim:] == first.stride()[dim:]  # the leading dimensions have size 1
            and p.shape[dim + 1 :] == first.shape[dim + 1 :]
            and p.stride(dim) * p.shape[dim] == p.numel()
            and p.data_ptr() == at
        ):
            return False
        at += p.numel() * p.element_size()
    return True


def joined(parts: list[Tensor], dim: int) -> Tensor:
    """``torch.cat(parts, dim)``, without the copy when the parts already lie back to back in one buffer:
    the support and query rows of a single episode are slices of one batch of views (channels-last ones
    included), and their embeddings slices of one encoder pass. Parts that need a gradient are joined by a
    view of the buffer they are slices of, so autograd sees no copy either."""
    if torch.compiler.is_compiling() or not _back_to_back(parts, dim):  # the compiled graph removes the copy
        return torch.cat(parts, dim)
    shape = list(parts[0].shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    base = parts[0]._base
    if (
        base is not None
        and base.is_contiguous()
        and parts[0].is_contiguous()
        and base.data_ptr() == parts[0].data_ptr()
        and base.numel() == math.prod(shape)
    ):
        return base.view(shape)
    if not any(p.requires_grad for p in parts):
        return parts[0].as_strided(shape, parts[0].stride())
    return torch.cat(parts, dim)


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
        pseudo_support: ``[E, n_way * K, d]`` support rows that are embeddings already (a pseudo-labelling
            sampler's shots from a memory, no gradient), view-major like ``support``; ``None``: none.
        pseudo_labels: ``[E, n_way * K]`` their classes.
        support_from_memory: the support rows came from the pairing's memory, so the memory is not
            added to this episode's classes again (:meth:`pseudo_episode`).
        support_keys: ``[E * n_way * n_supp, d]`` the pairing's momentum encoder on these support images,
            when a sampler ran that pass already (for its own choices): the pairing takes them instead of a
            second pass. Dropped by :meth:`replace` whenever ``support`` changes.
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
    pseudo_support: Tensor | None = None
    pseudo_labels: Tensor | None = None
    support_from_memory: bool = False
    support_keys: Tensor | None = None

    @property
    def n_episodes(self) -> int:
        return self.support.shape[0]

    def replace(self, **changes: Any) -> Episode:
        if "support" in changes:  # keys of other support images (or embeddings) are not these rows' keys
            changes.setdefault("support_keys", None)
        return replace(self, **changes)

    def pseudo_episode(self) -> Episode:
        """The same (embedded) queries against the pseudo-shots as the support: ``K`` shots per class."""
        if self.pseudo_support is None or self.pseudo_labels is None:
            raise ValueError("this episode has no pseudo-support")
        return self.replace(
            support=self.pseudo_support,
            support_labels=self.pseudo_labels,
            n_supp=self.pseudo_support.shape[1] // self.n_way,
            pseudo_support=None,
            pseudo_labels=None,
            support_from_memory=True,
        )

    def embed(self, encoder: Callable[[Tensor], Tensor], support: Tensor | None = None) -> Episode:
        """Run images through ``encoder`` and return the same episode holding embeddings.

        With one encoder, support and query go through a single forward (BatchNorm sees every
        view). ``support`` (``[E * n_way * n_supp, d]``, e.g. a momentum encoder's output): the support
        rows embedded already; ``encoder`` embeds the queries only.
        """
        e, ns = self.support.shape[:2]
        nq = self.query.shape[1]
        if support is None:
            flat = joined([self.support.flatten(0, 1), self.query.flatten(0, 1)], 0)
            z = encoder(flat)
            zs, zq = z[: e * ns], z[e * ns :]
        else:
            zs, zq = support, encoder(self.query.flatten(0, 1))
        return self.replace(support=zs.view(e, ns, -1), query=zq.view(e, nq, -1))
