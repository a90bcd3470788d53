"""Episode construction from unlabeled batches and task-level augmentations.

:mod:`episodic.tasks.episode` builds episodes from views; :mod:`episodic.tasks.augment` holds the
task-augmentation registry and pipeline; one module per augmentation (``rotate``, ``invert``,
``crop``, ``query_mix``, ``rotation_loss``).
"""

from episodic.tasks.augment import TASK_AUGMENTS, TaskContext, TaskPipeline, build_task_pipeline
from episodic.tasks.episode import Episode, ViewSampler

__all__ = ["Episode", "ViewSampler", "TASK_AUGMENTS", "TaskContext", "TaskPipeline", "build_task_pipeline"]
