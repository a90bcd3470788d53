"""``psco``: pseudo-supervised episodes from the momentum queue (PsCo; Jang, Lee, Shin, ICLR 2023).

Every image is its own class, as with ``views`` (its key view is the class's one support example, its
other views the queries), and the class also gets ``K`` pseudo-shots: the queue entries that an
entropic optimal transport assigns to it. For the keys ``z_i`` (momentum encoder, L2-normalised) of
the ``B`` images of the (global) batch and the ``Q`` L2-normalised queue rows ``m_j``::

    S = z m^T  [B, Q]                          P = exp(S / eps) / sum(exp(S / eps))
    repeat `iterations` times (Sinkhorn-Knopp, uniform marginals):
        P <- P / (Q * colsum(P))               every queue entry carries mass 1/Q
        P <- P / (B * rowsum(P))               every image carries mass 1/B
    A = B P                                    rows sum to 1: image i's distribution over the queue
    shots(i) = top-K_j A_ij                    (``selection=topk``; ``sample``: K draws from A_i.)

The shots (raw queue rows, no gradient) form a second, B-way K-shot episode with the same online
queries (:meth:`~episodic.tasks.episode.Episode.pseudo_episode`); the model scores it with the head
and adds its loss to the instance episode's. With ``head=contrastive head.params.symmetric=false``
that term is PsCo's supervised-contrastive one::

    L_pseudo(q) = logsumexp_{all B K shots s} (q . s / T)  -  q . mean(shots of q's class) / T

(the mean of the shots' dot products is the dot product with their mean; the head normalises the
rows, as PsCo's queue holds normalised keys), and the instance episode scored with the MoCo queue is
its MoCo term. ``head=protonet`` scores the shots' prototype instead.

Public code's defaults (alinlab/PsCo ``train.py``, ``models.py`` ``PsCoMoCo``, ``utils.py``
``distributed_sinkhorn``, read for this module): K = 4 shots (``--num-shots``; the class default is
16), top-K selection, 3 Sinkhorn iterations with eps = 0.05 and the column step first, the marginals
reduced over every process, queue 16,384, momentum 0.99, T = 0.2 for the MoCo term and T2 = 1.0 for
the pseudo term. Differences: both terms here use the head's one temperature (a second temperature
would need a second head), and the selection uses the keys before the head's embedding transform
(a variant's standardisation), on the untransformed queue rows the pairing stores. Not verified
against the paper's text (only the public code was read).

Requires ``method=moco`` with a queue (``method.params.queue_size >= K``) and not symmetric; task
augmentations that change the classes (stage 1: rotate, crop, invert) are refused, since the shots are
chosen for the sampled images before task augmentations run; query mixing and auxiliary losses apply.
The selection's momentum-encoder pass over the key views is also the pairing's: the episode carries the
keys on (``Episode.support_keys``), as PsCo's code computes its keys once. Under DDP the Sinkhorn sums
are all-reduced, so every process gets the rows of the assignment one process on the global batch would
compute.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from episodic.errors import check
from episodic.tasks.episode import Episode
from episodic.tasks.samplers.base import SAMPLERS
from episodic.tasks.samplers.views import ViewSampler
from episodic.tasks.scope import ScopePlan

SELECTIONS = ("topk", "sample")


def _all_reduce_sum(x: Tensor) -> Tensor:
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def cosine_scores(keys: Tensor, queue: Tensor) -> Tensor:
    """``[B, Q]`` cosine similarities of the (unnormalised) keys and queue rows, in float32."""
    return F.normalize(keys.float(), dim=-1) @ F.normalize(queue.float(), dim=-1).T


@torch.no_grad()
def sinkhorn(
    scores: Tensor,
    epsilon: float = 0.05,
    iterations: int = 3,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Entropic OT of the rows of ``scores [B, Q]`` (this process's part of the global rows) onto ``Q``
    columns with uniform marginals; returns ``A [B, Q]`` whose rows sum to 1. ``reduce`` sums a tensor
    over the processes that hold the other rows (``None``: one process holds them all)."""
    reduce = reduce or (lambda x: x)
    p = (scores.double() / epsilon).exp()  # cosine scores: finite in float64 for epsilon >= 0.002
    p /= reduce(p.sum().reshape(1))
    n_rows = reduce(p.new_full((1,), float(p.shape[0])))  # made on the device: no host-to-device copy
    n_cols = p.shape[1]
    for _ in range(iterations):
        p /= reduce(p.sum(0, keepdim=True)) * n_cols
        p /= p.sum(1, keepdim=True) * n_rows
    return (p * n_rows).to(scores.dtype)


@SAMPLERS.register("psco")
class PsCoSampler(ViewSampler):
    """``views`` episodes plus ``shots`` pseudo-shots per class from the pairing's queue (optimal transport)."""

    def __init__(
        self,
        n_supp: int = 1,
        n_query: int = 1,
        n_way: int | None = None,
        shots: int = 4,
        iterations: int = 3,
        epsilon: float = 0.05,
        selection: str = "topk",
    ) -> None:
        super().__init__(n_supp, n_query, n_way)
        check(
            n_supp == 1, f"sampler={self.name} takes one key view per image as its support; got n_supp={n_supp}, use 1"
        )
        check(isinstance(shots, int) and shots >= 1, f"sampler.params.shots={shots!r} is not allowed; use >= 1")
        check(
            isinstance(iterations, int) and iterations >= 1,
            f"sampler.params.iterations={iterations!r} is not allowed; use an integer >= 1",
        )
        check(epsilon >= 0.002, f"sampler.params.epsilon={epsilon!r} is not allowed; use a number >= 0.002")
        check(
            selection in SELECTIONS,
            f"sampler.params.selection={selection!r} is not allowed; use {' or '.join(SELECTIONS)}",
        )
        self.shots, self.iterations, self.epsilon, self.selection = shots, iterations, float(epsilon), selection
        self._pseudo_labels: dict[tuple[int, int, torch.device], Tensor] = {}

    def validate(self, method: nn.Module, task_stages: list[int]) -> None:
        queue = int(getattr(method, "queue_size", 0))
        check(
            hasattr(method, "key") and queue >= self.shots,
            f"sampler={self.name} takes its {self.shots} shots per class from the momentum queue of method=moco; "
            f"got method={getattr(method, 'name', '?')} with a queue of {queue}: use method=moco with "
            f"method.params.queue_size >= {self.shots}",
        )
        check(
            not getattr(method, "symmetric", False),
            f"sampler={self.name} scores the key view as the support: use method.params.symmetric=false",
        )
        check(
            1 not in task_stages,
            f"sampler={self.name} chooses the shots of the sampled images before task augmentations run, which "
            "task augmentations that change the classes (rotate, crop, invert) would contradict; use "
            "mixing (query_mix) or auxiliary (rotation_loss) task augmentations only",
        )

    def pseudo_labels(self, e: int, n_way: int, device: torch.device) -> Tensor:
        """``[E, K * n_way]``: ``[0 .. n_way-1] * K`` (view-major), the same tensor every step."""
        key = (e, n_way, device)
        if key not in self._pseudo_labels:
            self._pseudo_labels[key] = torch.arange(n_way, device=device).repeat(self.shots).expand(e, -1)
        return self._pseudo_labels[key]

    @torch.no_grad()
    def select(self, keys: Tensor, queue: Tensor, scope: ScopePlan | None = None) -> Tensor:
        """Indices ``[B, K]`` of each key's shots among the ``queue`` rows (both unnormalised)."""
        distributed = scope is not None and scope.world_size > 1
        reduce = _all_reduce_sum if distributed else None
        assign = sinkhorn(cosine_scores(keys, queue), self.epsilon, self.iterations, reduce)
        if self.selection == "topk":
            return assign.topk(self.shots, dim=1).indices
        return torch.multinomial(assign, self.shots)

    def forward(self, views: Tensor, method: nn.Module | None = None, scope: ScopePlan | None = None) -> Episode:
        episode = super().forward(views, method, scope)
        check(method is not None, f"sampler={self.name} needs the encoder pairing (method=moco)")
        assert method is not None
        e, n_way = episode.n_episodes, episode.n_way
        pairing = cast(Any, method)  # a momentum encoder (key) and a queue: checked by validate
        with torch.no_grad():
            keys = pairing.keys(episode)  # [E * n_way, d]: one key per image
            rows = pairing.queue.rows
            shots = rows[self.select(keys, rows, scope)]  # [E * n_way, K, d]
        pseudo = shots.view(e, n_way, self.shots, -1).transpose(1, 2).reshape(e, self.shots * n_way, -1)
        labels = self.pseudo_labels(e, n_way, views.device)
        # the keys go with the episode: the pairing embeds the support with them, not with a second pass
        return episode.replace(pseudo_support=pseudo, pseudo_labels=labels, support_keys=keys)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, shots={self.shots}, iterations={self.iterations}, epsilon={self.epsilon}, "
            f"selection={self.selection}"
        )
