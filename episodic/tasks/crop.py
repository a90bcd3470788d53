"""``crop``: a large zoom-in as a new class; every view of a chosen image shows the same close-up.

Per chosen image one square box is drawn in relative coordinates: area fraction
``s ~ U(scale[0], scale[1])`` (side ``a = sqrt(s)``), top-left corner ``(t, l) ~ U[0, 1 - a]^2``.
Each of its views is resampled (bilinear, border padding) so that the box fills the view::

    x'(u, v) = x(t + a * u, l + a * v)    for u, v in [0, 1] (relative coordinates)

The views were already cropped independently by the SimCLR augmentation, so the box is the same
relative region of every view. Off by default; ``mode`` and ``p`` as for every new-class transform.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from episodic.errors import check
from episodic.tasks.augment import TASK_AUGMENTS, Draw, NewClassTransform, TaskContext


@TASK_AUGMENTS.register("crop")
class LargeCrop(NewClassTransform):
    def __init__(
        self,
        ctx: TaskContext,
        p: float = 0.25,
        mode: str = "replace",
        scale: tuple[float, float] | list[float] = (0.1, 0.3),
    ) -> None:
        super().__init__(ctx, p, mode)
        try:
            lo, hi = (float(v) for v in scale)
        except (TypeError, ValueError):
            lo, hi = -1.0, -1.0
        check(0.0 < lo <= hi <= 1.0, f"task.crop.scale must be [low, high] with 0 < low <= high <= 1, got {scale!r}")
        self.scale = (lo, hi)

    def sample(self, n: int, draw: Draw) -> dict[str, Tensor]:
        lo, hi = self.scale
        side = (lo + (hi - lo) * draw.rand(n)).sqrt()
        return {"side": side, "top": (1.0 - side) * draw.rand(n), "left": (1.0 - side) * draw.rand(n)}

    def transform(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        n, v, c, h, w = x.shape
        a, t, l = (params[k].to(x.dtype) for k in ("side", "top", "left"))
        theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
        # normalised coordinates in [-1, 1]: x_in = a * x_out + (2 * offset + a - 1)
        theta[:, 0, 0], theta[:, 0, 2] = a, 2.0 * l + a - 1.0
        theta[:, 1, 1], theta[:, 1, 2] = a, 2.0 * t + a - 1.0
        theta = theta.repeat_interleave(v, dim=0)
        grid = F.affine_grid(theta, [n * v, c, h, w], align_corners=False)
        out = F.grid_sample(
            x.reshape(n * v, c, h, w), grid, mode="bilinear", padding_mode="border", align_corners=False
        )
        return out.view(n, v, c, h, w)
