"""What watches a training run from outside its steps: the :class:`Monitor` interface.

The loop (:mod:`episodic.engine`) calls every monitor it is given after each optimizer step with a
:class:`Progress`; the kNN monitor (:mod:`episodic.eval.knn`) is one. Neither side imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from episodic.data.datasets import Splits
from episodic.model import EpisodicModel


@dataclass
class Progress:
    """What a monitor sees after each optimizer step (on every process)."""

    step: int
    total: int
    model: EpisodicModel  # the unwrapped model
    data: Splits
    device: torch.device
    writer: Any  # TensorBoard SummaryWriter (every call a no-op on ranks > 0)
    bar: Any  # the tqdm progress bar


class Monitor(Protocol):
    """Anything with ``after_step(progress)``; the time it takes is not counted as training time. Its
    ``state_dict()`` goes into the training checkpoint under its ``name`` and comes back through
    ``load_state_dict`` when a run resumes (``{}`` for a monitor without state)."""

    name: str

    def after_step(self, progress: Progress) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
