"""The episode-sampler contract: a batch's views (and the pairing's state) -> an :class:`Episode`.

A sampler decides which examples form an episode's classes and which of them are support and query:
the default ``views`` sampler makes every image its own class; pseudo-labelling samplers build
classes from a momentum queue or from clusters. It runs first in the model's forward, on images
(views ``[V, B, C, H, W]``, view-major, ``V = n_views``), and may read the encoder pairing it is
given (its momentum encoder, its queue) but never trains it; ``scope`` is the process layout (a
sampler whose choices depend on the global batch reduces over its processes). A sampler with state
(centroids, a refresh counter) keeps it in buffers, so checkpoints carry it.

A sampler may also hand the head support rows that are embeddings already (``Episode.pseudo_support``:
e.g. pseudo-shots taken from the pairing's queue); the model scores them as a second episode of the
same queries (:meth:`Episode.pseudo_episode`).

Adding one is one module in this package, registered with ``@SAMPLERS.register("name")``: ``sampler=name``
then selects it, its constructor's other keyword parameters become ``sampler.params.*`` (episodic/config.py);
``n_supp``, ``n_query`` and ``n_way`` come from the top-level config.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from episodic.errors import check
from episodic.registry import Registry
from episodic.tasks.episode import Episode
from episodic.tasks.scope import ScopePlan

SAMPLERS: Registry[type[Sampler]] = Registry("sampler", "episodic.tasks.samplers")


class Sampler(nn.Module):
    """Base class: ``forward(views, method) -> Episode`` with ``n_supp`` support and ``n_query`` query
    examples per class and ``n_way`` classes per episode (``None``: the whole batch is one episode)."""

    name: ClassVar[str] = ""  # the registry name, set by ``SAMPLERS.register``

    def __init__(self, n_supp: int = 1, n_query: int = 1, n_way: int | None = None) -> None:
        super().__init__()
        check(isinstance(n_supp, int) and n_supp >= 1, f"n_supp={n_supp!r} is not allowed; use an integer >= 1")
        check(isinstance(n_query, int) and n_query >= 1, f"n_query={n_query!r} is not allowed; use an integer >= 1")
        check(
            n_way is None or (isinstance(n_way, int) and n_way >= 2),
            f"n_way={n_way!r} is not allowed; use an integer >= 2 or null (the whole batch)",
        )
        self.n_supp, self.n_query, self.n_way = n_supp, n_query, n_way

    @property
    def n_views(self) -> int:
        """Augmented views of each image the sampler needs from the loader."""
        return self.n_supp + self.n_query

    def way(self, batch_size: int) -> int:
        """The number of classes per episode for a batch of ``batch_size`` images."""
        n_way = self.n_way or batch_size
        check(
            batch_size % n_way == 0,
            f"n_way={n_way} does not divide the batch of {batch_size} images; "
            f"use a divisor of {batch_size} (or n_way=null for one episode per batch)",
        )
        return n_way

    def validate(self, method: nn.Module, task_stages: list[int]) -> None:
        """Refuse an encoder pairing this sampler cannot read its state from, or task augmentations (by
        ``stage``: 0 auxiliary, 1 new-class, 2 mixing) it cannot follow (default: anything)."""

    def forward(self, views: Tensor, method: nn.Module | None = None, scope: ScopePlan | None = None) -> Episode:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"n_supp={self.n_supp}, n_query={self.n_query}, n_way={self.n_way}"
