"""``task.scope``: does an episode span the global batch (all processes) or one process's share?

Layout. A step's global batch of ``B = batch_size`` images is cut into ``A = optim.accu_iter``
micro-batches of ``M = B / A`` images; rank ``r`` of ``W`` holds images ``[r b, (r + 1) b)`` of each
micro-batch, ``b = M / W``. A single process builds episodes from a micro-batch with image ``i``
in episode ``i // n_way`` as class ``i % n_way`` (``n_way = null``: the whole micro-batch is one
episode).

``global`` (default): the episode is the one a single process would build from the global
micro-batch.

* ``n_way`` divides ``b``: every episode lies inside one process; nothing is gathered.
* ``b`` divides ``n_way`` (``n_way = null`` included): an episode spans ``k = n_way / b`` processes.
  Each process embeds its own ``b`` images; the support embeddings of the episode's ``k``
  processes are all-gathered *with gradient* (:func:`episodic.distributed.gather_with_grad`) and
  their labels offset by the owner's position ``j`` in the episode (``label + j * n_local``), rows
  re-interleaved so the global support is view-major exactly as in one process. Then

  What is gathered is what the head declares (``Head.gathers``):

  - ``support`` (protonet, r2d2, svm): the head scores *this process's queries* against the
    gathered support (labels offset by ``j``); the process's loss is the mean over its
    ``b * n_query`` queries;
  - ``all`` (the contrastive head, where each view is an anchor and every other view a candidate):
    the queries are gathered too, so negatives come from the global episode, and the head computes
    the whole episode's loss (the same value on its ``k`` processes).

  Loss scaling: none is needed. With DDP's average over ``W`` ranks and the gather's SUM backward,
  the local-query path gives ``(1/W) sum_r L_r`` with ``L_r`` the mean over an equal number of
  local queries, i.e. the single-process mean over all queries; the all-views path gives
  ``(1/W) sum_r L_{e(r)} = (1/E) sum_e L_e`` (each of the ``E = W / k`` episodes counted by its
  ``k`` ranks), again the single-process loss. Both rely on every process holding the same number
  of images, which drop-last batches guarantee.
* any other ``n_way`` (an episode would cover part of a process's images and part of
  another's) is refused with a message naming the allowed values.

``local``: each process's ``b`` images form its own episodes (``n_way`` classes, or ``b`` with
``n_way = null``); nothing is gathered. Cheaper, but the episode (and with it the task) depends on
the number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from episodic import distributed
from episodic.errors import EpisodicError, check
from episodic.tasks.episode import Episode

SCOPES = ("global", "local")
Gathered = Literal["support", "all", "none"]


@dataclass(frozen=True)
class ScopePlan:
    """How a micro-batch becomes episodes on this process.

    Attributes:
        scope: ``global`` or ``local``.
        n_way: classes per episode.
        n_way_local: classes of one episode held by this process (``n_way`` unless it spans).
        local_batch: images per process per micro-batch (``b``).
        world_size, rank: the process group.
        accu_iter: micro-batches per optimizer step.
    """

    scope: str
    n_way: int
    n_way_local: int
    local_batch: int
    world_size: int = 1
    rank: int = 0
    accu_iter: int = 1

    @property
    def ranks_per_episode(self) -> int:
        return self.n_way // self.n_way_local

    @property
    def spans(self) -> bool:
        """True when an episode spans several processes (and support is gathered)."""
        return self.ranks_per_episode > 1

    @property
    def sampler_way(self) -> int | None:
        """The ``n_way`` of this process's episode sampler (``None``: its whole batch)."""
        return None if self.n_way_local == self.local_batch else self.n_way_local

    @staticmethod
    def one_process() -> ScopePlan:
        """The plan of a model run by one process alone: episodes as its sampler builds them."""
        return ScopePlan("local", 1, 1, 1)

    def gather(self, episode: Episode, views: Gathered) -> Episode:
        """This process's embedded episode, or, when episodes span processes, the part of the global
        episode it scores: ``views`` says what is gathered (``Head.gathers``; ``none``: nothing)."""
        if not self.spans or views == "none":
            return episode
        return globalize(episode, self, views == "all")

    def describe(self) -> str:
        micro = self.local_batch * self.world_size
        per = (
            f"{self.world_size} processes x {self.local_batch} images"
            if self.world_size > 1
            else f"{self.local_batch} images"
        )
        text = f"task.scope={self.scope}: {self.n_way}-way episodes from micro-batches of {micro} ({per})"
        if self.spans:
            text += f"; each episode spans {self.ranks_per_episode} processes (support gathered with gradient)"
        if self.accu_iter > 1:
            text += f"; {self.accu_iter} micro-batches per optimizer step"
        return text


def plan_scope(
    scope: str, n_way: int | None, batch_size: int, world_size: int = 1, rank: int = 0, accu_iter: int = 1
) -> ScopePlan:
    """Check the episode layout for ``batch_size`` images over ``world_size`` processes and
    ``accu_iter`` micro-batches; raise :class:`EpisodicError` naming the allowed values."""
    check(scope in SCOPES, f"task.scope={scope!r} is not allowed; use {' or '.join(SCOPES)}")
    check(
        isinstance(accu_iter, int) and accu_iter >= 1,
        f"optim.accu_iter={accu_iter!r} is not allowed; use an integer >= 1",
    )
    parts = accu_iter * world_size
    check(
        batch_size % parts == 0,
        f"batch_size={batch_size} is not divisible by optim.accu_iter x processes = "
        f"{accu_iter} x {world_size}; use a multiple of {parts}",
    )
    micro = batch_size // accu_iter
    b = micro // world_size
    check(
        n_way is None or (isinstance(n_way, int) and n_way >= 2),
        f"n_way={n_way!r} is not allowed; use an integer >= 2 or null (the whole batch)",
    )
    if scope == "local" and parts > 1:
        n = n_way or b
        check(
            b % n == 0,
            f"n_way={n} does not divide the {b} images each process holds per micro-batch "
            f"(task.scope=local, batch_size={batch_size} / optim.accu_iter={accu_iter} / {world_size} "
            f"processes); use a divisor of {b} or n_way=null",
        )
        return ScopePlan(scope, n, n, b, world_size, rank, accu_iter)
    n = n_way or micro
    check(
        micro % n == 0,
        f"n_way={n} does not divide the batch of {micro} images; use a divisor of {micro} "
        f"(or n_way=null for one episode per batch)",
    )
    if not (b % n == 0 or n % b == 0):
        raise EpisodicError(
            f"n_way={n} would split an episode unevenly over processes holding {b} images each "
            f"(batch_size={batch_size}, {world_size} processes, optim.accu_iter={accu_iter}); "
            f"use n_way dividing {b}, or a multiple of {b} dividing {micro} "
            f"(n_way=null: the whole micro-batch)"
        )
    return ScopePlan(scope, n, min(n, b), b, world_size, rank, accu_iter)


def _interleave(parts: Tensor, n_views: int) -> Tensor:
    """``[k, E, N, ...]`` (N rows view-major per process) -> ``[E, k N, ...]`` view-major globally.

    Row ``v * n + c`` of process ``j`` becomes row ``v * k n + j n + c``: the order one process
    would have built. Rows that are not a whole number of views are concatenated process by process.
    """
    k, e, n = parts.shape[:3]
    v = n_views if n % n_views == 0 else 1
    rest = parts.shape[3:]
    x = parts.reshape(k, e, v, n // v, *rest).permute(1, 2, 0, 3, *range(4, 4 + len(rest)))
    return x.reshape(e, k * n, *rest)


def globalize(episode: Episode, plan: ScopePlan, all_views: bool) -> Episode:
    """This process's embedded episode -> the part of the global episode it computes the loss on.

    Support (and, with ``all_views``, queries) of the processes sharing the episode are gathered
    with gradient; labels are offset by each owner's position in the episode.
    """
    k = plan.ranks_per_episode
    members = slice((plan.rank // k) * k, (plan.rank // k + 1) * k)
    j = plan.rank % k
    n_l = episode.n_way
    offsets = (torch.arange(k, device=episode.support_labels.device) * n_l).view(k, 1, 1)

    def join(x: Tensor, n_views: int, grad: bool) -> Tensor:
        parts = (distributed.gather_with_grad(x) if grad else distributed.gather_no_grad(x))[members]
        return _interleave(parts, n_views)

    def join_labels(y: Tensor, n_views: int) -> Tensor:
        return _interleave(distributed.gather_no_grad(y)[members] + offsets, n_views)

    changes: dict[str, Any] = dict(
        support=join(episode.support, episode.n_supp, True),
        support_labels=join_labels(episode.support_labels, episode.n_supp),
        n_way=k * n_l,
    )
    mix_labels, mix_weight = episode.query_labels_mix, episode.mix_weight
    if all_views:
        changes["query"] = join(episode.query, episode.n_query, True)
        changes["query_labels"] = join_labels(episode.query_labels, episode.n_query)
        if mix_labels is not None and mix_weight is not None:
            changes["query_labels_mix"] = join_labels(mix_labels, episode.n_query)
            changes["mix_weight"] = join(mix_weight, episode.n_query, False)
    else:
        changes["query_labels"] = episode.query_labels + j * n_l
        if mix_labels is not None and mix_weight is not None:
            changes["query_labels_mix"] = mix_labels + j * n_l
    return episode.replace(**changes)


__all__ = ["SCOPES", "Gathered", "ScopePlan", "globalize", "plan_scope"]
