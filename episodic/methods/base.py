"""Encoder pairings: how the encoder(s) embed an episode and which loss they train.

A :class:`Method` owns the trainable encoder (and any predictor or momentum copy) and maps an
episode of images plus a head to a :class:`~episodic.heads.base.HeadOutput`. ``simclr`` uses one
encoder for support and query; MoCo- and BYOL-style pairings add momentum encoders and queues
in their own modules. ``after_step`` runs once per optimizer step (momentum updates).
``world_size`` (set by the model when its task scope is set) is the number of processes training together:
state shared across the batch, like MoCo's queue, gathers from all of them when it is above 1.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from episodic.heads.base import Head, HeadOutput
from episodic.models import Encoder
from episodic.registry import Registry
from episodic.tasks.episode import Episode

METHODS: Registry[type["Method"]] = Registry("method", "episodic.methods")


class Method(nn.Module):
    """Base pairing: ``forward(episode_of_images, head) -> HeadOutput``.

    ``trains_head = False`` marks pairings whose loss does not go through the head (BYOL only scores
    queries with it for the accuracy readout): the model then freezes the head's parameters, so that
    DDP and the optimizer never wait for gradients that cannot come.
    """

    trains_head = True

    def __init__(self, encoder: Encoder, **_: Any) -> None:
        super().__init__()
        self.encoder = encoder
        self.world_size = 1

    def forward(self, episode: Episode, head: Head) -> HeadOutput:
        raise NotImplementedError

    def after_step(self, step: int, total_steps: int) -> None:
        """Hook after each optimizer step (momentum encoders update here)."""
