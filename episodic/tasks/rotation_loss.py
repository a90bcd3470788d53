"""``rotation_loss``: auxiliary 4-way rotation prediction (Gidaris et al., 2018; metacontrastive §3).

A share of the episode's views (``share`` in (0, 1], chosen at random among all support and query
views, at least one) is rotated by ``k * 90`` degrees, ``k ~ U{0, 1, 2, 3}``, and embedded by the
encoder in a second forward pass; a linear layer ``W`` (``embed_dim -> 4``, registered in the model,
so the optimizer and any DDP wrapper see it) predicts ``k`` from the L2-normalised embedding::

    L_rot = CE(W z_hat + b, k),   z_hat = z / ||z||    (no normalisation with normalize=false)
    loss  = L_episode + w_t * L_rot,   w_t = w  or  w * (1 + cos(pi * t / T)) / 2  (decay=cosine)

The views are taken from the episode as the view sampler built it, before the new-class
transforms, so ``k`` is relative to the image's own orientation even when ``rotate`` is on too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from episodic.errors import check
from episodic.tasks.augment import TASK_AUGMENTS, AuxBatch, Draw, TaskAugment, TaskContext, cosine_weight, rotate_groups
from episodic.tasks.episode import Episode


@TASK_AUGMENTS.register("rotation_loss")
class RotationLoss(TaskAugment):
    stage = 0

    def __init__(
        self, ctx: TaskContext, weight: float = 0.5, decay: str = "none", share: float = 1.0, normalize: bool = True
    ) -> None:
        super().__init__()
        check(
            isinstance(weight, (int, float)) and weight >= 0, f"task.rotation_loss.weight must be >= 0, got {weight!r}"
        )
        check(decay in ("none", "cosine"), f"task.rotation_loss.decay={decay!r} is not allowed; use none or cosine")
        check(
            isinstance(share, (int, float)) and 0.0 < share <= 1.0,
            f"task.rotation_loss.share must be in (0, 1], got {share!r}",
        )
        self.weight, self.decay, self.share, self.normalize = float(weight), decay, float(share), bool(normalize)
        self.classifier = nn.Linear(ctx.embed_dim, 4)

    def aux_batch(self, episode: Episode, draw: Draw, step: int, total: int) -> AuxBatch | None:
        views = torch.cat([episode.support.flatten(0, 1), episode.query.flatten(0, 1)])  # [M, C, H, W]
        m = len(views)
        take = max(1, round(self.share * m))
        idx = draw.perm(1, m)[0, :take]
        k = draw.randint(0, 4, take)
        w = cosine_weight(self.weight, self.decay, step, total)
        return AuxBatch(rotate_groups(views[idx], k), k, w, -1)

    def logits(self, z: Tensor) -> Tensor:
        return self.classifier(F.normalize(z, dim=-1) if self.normalize else z)

    def aux_loss(self, encoder: nn.Module, batch: AuxBatch) -> Tensor:
        z = encoder(batch.images).float()
        return F.cross_entropy(self.logits(z), batch.targets)
