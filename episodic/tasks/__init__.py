"""Episodes and what builds them: samplers (:mod:`episodic.tasks.samplers`), the layout over
processes (:mod:`episodic.tasks.scope`) and task augmentations (:mod:`episodic.tasks.augment`
holds their registry and pipeline; one module per augmentation: ``rotate``, ``invert``, ``crop``,
``query_mix``, ``rotation_loss``).
"""

from episodic.tasks.augment import TASK_AUGMENTS, TaskContext, TaskPipeline, build_task_pipeline
from episodic.tasks.episode import Episode
from episodic.tasks.samplers import SAMPLERS, Sampler, ViewSampler

__all__ = [
    "SAMPLERS",
    "TASK_AUGMENTS",
    "Episode",
    "Sampler",
    "TaskContext",
    "TaskPipeline",
    "ViewSampler",
    "build_task_pipeline",
]
