"""Episode construction from unlabeled batches and task-level augmentations."""

from episodic.tasks.episode import Episode, ViewSampler

__all__ = ["Episode", "ViewSampler"]
