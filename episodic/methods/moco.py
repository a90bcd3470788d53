"""``moco``: MoCo v2 (Chen et al., 2020) as an encoder pairing for any head.

The queries are embedded by the online encoder, the support set by a momentum encoder (an EMA
copy, no gradient), and a queue of past support embeddings joins the episode as ``queue_size``
extra classes that have a support example but no query::

    support = f_momentum(x_support)   query = f_online(x_query)   memory = queue [K, d]
    loss    = head(support + memory, query)                       (MoCo v2: head=contrastive,
                                                                   head.params.symmetric=false)
    queue  <- the episode's support rows (first in, first out)    after the forward

Differences from MoCo v2: the current batch's other keys are also negatives (they are the
episode's other classes), there is no shuffle-BN (one process: the key pass has its own
BatchNorm statistics already; across processes see ``task.scope``), and the queue is a ring
buffer of any size (MoCo needs ``K`` to be a multiple of the batch).

Options beyond MoCo v2: ``predictor_hidden`` adds MoCo v3's predictor MLP on the online branch;
``symmetric=true`` adds the loss with the roles of support and query images swapped (MoCo v3;
queries never mixed then); ``momentum_schedule=cosine`` raises the momentum to 1. The queue (a
buffer) and the momentum encoder are part of the model's state dict, hence of checkpoints.
"""

from __future__ import annotations

import torch
from torch import Tensor

from episodic import distributed
from episodic.errors import check
from episodic.heads.base import Head
from episodic.methods.base import METHODS, Embeddings, Method
from episodic.methods.momentum import check_momentum, ema_update, frozen_copy, momentum_at
from episodic.models import Encoder, Projector
from episodic.models.memory import RingBuffer
from episodic.tasks.episode import Episode
from episodic.tasks.scope import ScopePlan


@METHODS.register("moco")
class MoCo(Method):
    """Momentum-encoder support, online-encoder queries, a queue of past supports as extra classes."""

    def __init__(
        self,
        encoder: Encoder,
        momentum: float = 0.999,
        queue_size: int = 65536,
        momentum_schedule: str = "constant",
        predictor_hidden: int | None = None,
        symmetric: bool = False,
    ) -> None:
        super().__init__(encoder)
        check_momentum(momentum, momentum_schedule)
        check(
            isinstance(queue_size, int) and queue_size >= 0,
            f"method.params.queue_size={queue_size!r} is not allowed; use an integer >= 0",
        )
        self.momentum, self.schedule = float(momentum), momentum_schedule
        self.queue_size, self.symmetric = queue_size, symmetric
        self.momentum_encoder = frozen_copy(encoder)
        d = encoder.projector.out_dim
        self.predictor = Projector(d, predictor_hidden, d, layers=2) if predictor_hidden else None
        # MoCo initialises the queue with random vectors; heads normalise (or a variant standardises) rows
        self.queue = RingBuffer(torch.randn(queue_size, d))

    def validate_head(self, head: Head) -> None:
        check(
            not self.queue_size or head.supports_memory,
            f"method=moco with queue_size={self.queue_size} adds that many classes to the head, which "
            f"head={head.name} cannot take; use head=contrastive, protonet or r2d2, or "
            "method.params.queue_size=0",
        )

    def online(self, x: Tensor) -> Tensor:
        z = self.encoder(x)
        return z if self.predictor is None else self.predictor(z)

    @torch.no_grad()
    def key(self, x: Tensor) -> Tensor:
        return self.momentum_encoder(x)

    def keys(self, episode: Episode) -> Tensor:
        """The momentum encoder's embeddings of the support images: the sampler's, when it ran that pass."""
        if episode.support_keys is not None:
            return episode.support_keys
        return self.key(episode.support.flatten(0, 1))

    def _embed(self, episode: Episode, transform: Embeddings) -> Episode:
        return episode.embed(lambda x: transform(self.online(x)), support=transform(self.keys(episode)).detach())

    def embed(self, episode: Episode, transform: Embeddings) -> list[Episode]:
        if not self.symmetric:
            return [self._embed(episode, transform)]
        check(
            episode.mix_weight is None,
            "method.params.symmetric=true swaps support and query images, which mixed (CutMix) "
            "queries cannot be; turn one of them off",
        )
        swapped = episode.replace(
            support=episode.query,
            query=episode.support,
            support_labels=episode.query_labels,
            query_labels=episode.support_labels,
            n_supp=episode.n_query,
            n_query=episode.n_supp,
        )
        return [self._embed(episode, transform), self._embed(swapped, transform)]

    def memory(self) -> Tensor | None:
        return self.queue.rows.clone() if self.queue_size else None

    @torch.no_grad()
    def update(self, embedded: Episode, scope: ScopePlan) -> None:
        """Enqueue the keys (support embeddings) of every process, in rank order."""
        if self.training and self.queue_size:
            keys = embedded.support.reshape(-1, embedded.support.shape[-1])
            self.queue.push(distributed.gather_no_grad(keys).flatten(0, 1) if scope.world_size > 1 else keys)

    def after_step(self, step: int, total_steps: int) -> None:
        ema_update(self.momentum_encoder, self.encoder, momentum_at(self.momentum, step, total_steps, self.schedule))
