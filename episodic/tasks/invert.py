"""``invert``: colour inversion as a new class; every view of a chosen image becomes its negative.

In pixel space ``x' = 1 - x``. Views normalised with ``(x - mean) / std`` are inverted in the same
space: ``x'_norm = (1 - 2 * mean) / std - x_norm``. Off by default; ``mode`` and ``p`` as for every
new-class transform (:class:`~episodic.tasks.augment.NewClassTransform`).
"""

from __future__ import annotations

from torch import Tensor

from episodic.tasks.augment import TASK_AUGMENTS, Draw, NewClassTransform, pixel_affine


@TASK_AUGMENTS.register("invert")
class Invert(NewClassTransform):
    def sample(self, n: int, draw: Draw) -> dict[str, Tensor]:
        return {}

    def transform(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        mean, std = pixel_affine(self.ctx, x.shape[-3], x)
        return (1.0 - 2.0 * mean) / std - x
