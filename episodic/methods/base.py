"""Encoder pairings: which encoder embeds what, and how the embedded episode is scored.

A :class:`Method` owns the trainable encoder (and any predictor or momentum copy). In the model's
forward (:mod:`episodic.model`) it does three things, in this order:

* :meth:`Method.embed`: the image episode -> the episode(s) of embeddings the loss is computed on
  (``simclr``: one pass of one encoder; ``moco``: queries through the online encoder, support
  through the momentum encoder, plus the swapped episode when symmetric);
* :meth:`Method.score`: those episodes (gathered across processes as the head declares) -> a
  :class:`~episodic.heads.base.HeadOutput`; by default each is scored by the head, with the
  method's :meth:`Method.memory` rows (a queue) as extra classes, and the losses are summed;
* :meth:`Method.update`: state that follows the batch (MoCo's queue), from this process's
  embedded episode and, across processes, those of the others.

``after_step`` runs once per optimizer step (momentum encoders move there). What a pairing is
declared, as class attributes: ``negatives`` (whether it scores against negatives: variants that
act on them are refused without), ``trains_head`` (whether the loss reaches the head's parameters;
the model freezes them otherwise, so neither DDP nor the optimizer waits for gradients that cannot
come), ``gathers`` (whether its episodes are gathered across processes at all) and, per instance,
``queue_size`` (extra classes it adds to the head).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn

from episodic.heads.base import Head, HeadOutput
from episodic.models import Encoder
from episodic.registry import Registry
from episodic.tasks.episode import Episode
from episodic.tasks.scope import ScopePlan

METHODS: Registry[type[Method]] = Registry("method", "episodic.methods")

Embeddings = Callable[[Tensor], Tensor]


class Method(nn.Module):
    """Base pairing: one encoder, the head's loss on one embedded episode."""

    name: ClassVar[str] = ""  # the registry name, set by ``METHODS.register``
    negatives: ClassVar[bool] = True
    trains_head: ClassVar[bool] = True
    gathers: ClassVar[bool] = True
    queue_size: int = 0

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder

    def validate_head(self, head: Head) -> None:
        """Refuse a head this pairing cannot score with (one line; default: every head)."""

    def embed(self, episode: Episode, transform: Embeddings) -> list[Episode]:
        """The episodes of embeddings the loss is computed on; ``transform`` is the head's hook on each
        encoder pass (``Head.transform_embeddings``). The first one's logits are the step's."""
        raise NotImplementedError

    def memory(self) -> Tensor | None:
        """Rows the head adds as extra classes (a queue), the same on every process; ``None``: none."""
        return None

    def score(self, episodes: list[Episode], head: Head) -> HeadOutput:
        """Each episode scored by ``head`` with :meth:`memory` (not those whose support came from it);
        losses summed, logits of the first."""
        memory = self.memory()  # heads without memory support need not take the argument at all
        # an episode whose support rows came from the memory does not get the memory again as classes
        outs = [head(e) if memory is None or e.support_from_memory else head(e, memory=memory) for e in episodes]
        loss = outs[0].loss
        for o in outs[1:]:
            loss = loss + o.loss
        return HeadOutput(loss=loss, logits=outs[0].logits, extras=outs[0].extras)

    @torch.no_grad()
    def update(self, embedded: Episode, scope: ScopePlan) -> None:
        """State that follows the batch, from this process's (ungathered) embedded episode."""

    def after_step(self, step: int, total_steps: int) -> None:
        """Hook after each optimizer step that was not skipped (momentum encoders update here)."""
