"""``rotate``: task-level large rotation, the rotated image is a new class (MetaAug / metacontrastive).

Each chosen image draws ``k`` uniformly from {1, 2, 3} and **all** its views (support and query)
are rotated by ``k * 90`` degrees counter-clockwise, so rotation is never within-class variation::

    x'[v] = rot90(x[v], k)   for every view v of the image

``mode: replace`` (default) rotates each image with probability ``p`` and keeps its class index;
``mode: add`` appends ``round(p * n_way)`` rotated copies per episode as new classes. Unlike the
reference (which draws k from {0, 1, 2, 3}, so only 3/4 of its "rotated" images turn), ``p`` here is
the probability of an actual rotation. Needs square views.
"""

from __future__ import annotations

from torch import Tensor

from episodic.tasks.augment import TASK_AUGMENTS, Draw, NewClassTransform, rotate_groups


@TASK_AUGMENTS.register("rotate")
class Rotate(NewClassTransform):
    def sample(self, n: int, draw: Draw) -> dict[str, Tensor]:
        return {"k": draw.randint(1, 4, n)}

    def transform(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        return rotate_groups(x, params["k"])
