"""``query_mix``: query CutMix / mixup against another class of the episode; the loss uses both labels.

Every episode draws a random cyclic derangement ``pi`` of its classes (a random order
``sigma``, then ``pi(sigma_j) = sigma_{j+1 mod n_way}``), so a query of image ``i`` is always mixed
with the query of a *different* image ``pi(i)`` from the same view slot. Each query is mixed with
probability ``p``; a mixed query uses a CutMix box with probability ``cutmix_p``, else mixup, with
``lam ~ Beta(alpha, alpha)`` drawn per query:

- mixup:  ``x' = lam * x_i + (1 - lam) * x_pi(i)``, weight ``w = lam``;
- CutMix: a box of ``H*sqrt(1-lam)`` x ``W*sqrt(1-lam)`` pixels centred uniformly, clipped to the
  image, is pasted from ``x_pi(i)``; ``w = 1 - box area / (H * W)`` (the area actually pasted).

The episode gets ``query_labels_mix = pi(label)`` and ``mix_weight = w`` (``w = 1`` for unmixed
queries), so every head's loss is ``w * CE(label) + (1 - w) * CE(pi(label))`` per query
(:func:`~episodic.heads.base.episode_cross_entropy`; the contrastive head splits the target mass the
same way). With ``keep_clean`` (default) the clean queries stay in the episode too (the query set
doubles: clean first, then mixed), which is the reference's intended ``L_clean + L_mix`` (its code
overwrote the mixed loss). Needs the plain view-major episode layout (it runs after new-class
transforms, so it composes with them).
"""

from __future__ import annotations

import torch
from torch import Tensor

from episodic.errors import check
from episodic.tasks.augment import TASK_AUGMENTS, Draw, TaskAugment, TaskContext, check_probability
from episodic.tasks.episode import Episode


def cyclic_derangement(order: Tensor) -> Tensor:
    """From random orders ``[E, n]``, the maps ``pi [E, n]`` with ``pi[order[j]] = order[(j+1) % n]``."""
    pi = torch.empty_like(order)
    pi.scatter_(1, order, order.roll(-1, dims=1))
    return pi


def box_masks(lam: Tensor, cy: Tensor, cx: Tensor, h: int, w: int) -> tuple[Tensor, Tensor]:
    """CutMix boxes for cut fractions ``1 - lam``, centres ``(cy, cx)`` in pixels: masks
    ``[n, 1, h, w]`` (1 inside the box) and the kept-area weights ``1 - area / (h * w)``."""
    cut = (1.0 - lam).clamp(0.0, 1.0).sqrt()
    ch, cw = h * cut, w * cut
    y0 = (cy - ch / 2).round().clamp(0, h).long()
    y1 = (cy + ch / 2).round().clamp(0, h).long()
    x0 = (cx - cw / 2).round().clamp(0, w).long()
    x1 = (cx + cw / 2).round().clamp(0, w).long()
    ys = torch.arange(h, device=lam.device).view(1, h, 1)
    xs = torch.arange(w, device=lam.device).view(1, 1, w)
    inside = (ys >= y0.view(-1, 1, 1)) & (ys < y1.view(-1, 1, 1)) & (xs >= x0.view(-1, 1, 1)) & (xs < x1.view(-1, 1, 1))
    area = ((y1 - y0) * (x1 - x0)).to(lam.dtype)
    return inside.unsqueeze(1), 1.0 - area / (h * w)


@TASK_AUGMENTS.register("query_mix")
class QueryMix(TaskAugment):
    stage = 2

    def __init__(
        self, ctx: TaskContext, p: float = 1.0, cutmix_p: float = 0.5, alpha: float = 1.0, keep_clean: bool = True
    ) -> None:
        super().__init__()
        self.p = check_probability("query_mix.p", p)
        self.cutmix_p = check_probability("query_mix.cutmix_p", cutmix_p)
        check(isinstance(alpha, (int, float)) and alpha > 0, f"task.query_mix.alpha must be > 0, got {alpha!r}")
        self.alpha = float(alpha)
        self.keep_clean = bool(keep_clean)

    def forward(self, episode: Episode, draw: Draw) -> Episode:
        e, n, nq = episode.n_episodes, episode.n_way, episode.query.shape[1]
        check(
            nq == n * episode.n_query and episode.query_labels_mix is None,
            "query_mix needs the plain view-major query layout and can be applied once",
        )
        q = episode.query  # [E, Nq, C, H, W], row r = view r // n of image r % n
        h, w = q.shape[-2:]
        pi = cyclic_derangement(draw.perm(e, n))  # [E, n]
        partner_img = pi.repeat(1, episode.n_query)  # partner image per query row
        rows = torch.arange(nq, device=q.device)
        partner_row = (rows // n) * n + partner_img  # same view slot, other image
        other = q[torch.arange(e, device=q.device).unsqueeze(1), partner_row]
        mixed_on = draw.rand(e, nq) < self.p
        use_box = draw.rand(e, nq) < self.cutmix_p
        lam = draw.beta(self.alpha, e * nq).view(e, nq)
        cy, cx = draw.rand(e, nq) * h, draw.rand(e, nq) * w
        inside, box_w = box_masks(lam.flatten(), cy.flatten(), cx.flatten(), h, w)
        inside = inside.view(e, nq, 1, h, w)
        box_w = box_w.view(e, nq)
        # pixel weight of the query's own image: CutMix 0 inside the box, mixup lam everywhere
        own = torch.where(use_box.view(e, nq, 1, 1, 1), (~inside).to(q.dtype), lam.view(e, nq, 1, 1, 1).to(q.dtype))
        own = torch.where(mixed_on.view(e, nq, 1, 1, 1), own, torch.ones_like(own))
        x = own * q + (1.0 - own) * other
        weight = torch.where(mixed_on, torch.where(use_box, box_w, lam), torch.ones_like(lam))
        labels = episode.query_labels
        mix_labels = labels.gather(1, partner_row)
        if self.keep_clean:
            return episode.replace(
                query=torch.cat([q, x], 1),
                query_labels=torch.cat([labels, labels], 1),
                query_labels_mix=torch.cat([labels, mix_labels], 1),
                mix_weight=torch.cat([torch.ones_like(weight), weight], 1),
            )
        return episode.replace(query=x, query_labels=labels, query_labels_mix=mix_labels, mix_weight=weight)
