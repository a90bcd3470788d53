"""Episode samplers (``sampler=views|...``): how a batch's views become few-shot episodes."""

from episodic.tasks.samplers.base import SAMPLERS, Sampler
from episodic.tasks.samplers.views import ViewSampler

__all__ = ["SAMPLERS", "Sampler", "ViewSampler"]
