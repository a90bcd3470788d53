"""ProtoNet head (Snell et al., 2017).

Prototype of class k is the mean support embedding, ``c_k = mean_{i: y_i = k} s_i``; query logits
are negative squared Euclidean distances divided by a temperature::

    logit_{q,k} = -||q - c_k||^2 / tau

With ``normalize=True`` (default) embeddings are L2-normalised first. For one shot on the unit
sphere ``-||q - c||^2 / tau = (2/tau) cos(q, c) - 2/tau``, i.e. a one-directional InfoNCE with
temperature ``tau / 2``. (The metacontrastive reference divides embeddings by sqrt(T), which is
this head with ``tau = T``.) ``metric="cosine"`` scores ``cos(q, c_k) / tau`` instead.

A ``memory`` (MoCo's queue) adds one-example prototypes that are negatives for every query.
Kernel reading (for variants): the energy is ``u = ||q - c||^2 / tau`` (``(1 - cos) / tau`` for the
cosine metric) and the logit ``-u``; prototypes lie in the unit ball, so ``u <= 4 / tau``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from episodic.errors import check
from episodic.heads.base import (
    HEADS,
    Geometry,
    HeadOutput,
    KernelHead,
    LogitScale,
    Pairs,
    expand_memory,
    full_precision,
    one_hot,
    pad_columns,
    prototypes,
    query_targets,
)
from episodic.tasks.episode import Episode, joined


@HEADS.register("protonet")
class ProtoNetHead(KernelHead):
    """Prototypes as class means; logits = -squared distance / tau (or cosine / tau)."""

    def __init__(
        self, temperature: float = 0.4, normalize: bool = True, metric: str = "euclidean", learn_scale: bool = False
    ) -> None:
        super().__init__()
        check(temperature > 0, f"head.params.temperature={temperature} is not allowed; use a value > 0")
        check(
            metric in ("euclidean", "cosine"),
            f"head.params.metric={metric!r} is not allowed; use 'euclidean' or 'cosine'",
        )
        self.normalize, self.metric = normalize, metric
        self.scale = LogitScale(1.0 / temperature, learn=learn_scale)

    @property
    def unit_rows(self) -> bool:
        """Whether :meth:`norm` gives unit rows."""
        return (self.normalize or self.metric == "cosine") and not self.replaces_l2

    def norm(self, x: Tensor) -> Tensor:
        return self.l2(x) if (self.normalize or self.metric == "cosine") else x

    def _cos(self, geo: Geometry) -> Tensor:
        if geo.unit:
            return geo.dot
        return geo.dot / (geo.na * geo.nc).sqrt().clamp_min(1e-12)

    def base_kernel(self, geo: Geometry) -> Tensor:
        if self.metric == "cosine":
            return self.scale(self._cos(geo))
        if geo.unit:  # -||q - c||^2 = 2 q.c - 2 on the unit sphere
            return self.scale.affine(geo.dot, 2.0, -2.0)
        # -||q - c||^2 = 2 q.c - ||q||^2 - ||c||^2
        return self.scale(2 * geo.dot - geo.na - geo.nc)

    def energy(self, geo: Geometry) -> Tensor:
        return self.scale(1 - self._cos(geo) if self.metric == "cosine" else geo.sq_dist())

    def max_energy(self) -> float | None:
        if self.metric == "cosine":
            return 2.0 * self.scale.value
        return 4.0 * self.scale.value if self.normalize else None

    def base_min_logit(self) -> float | None:
        u = self.max_energy()
        return None if u is None else (-self.scale.value if self.metric == "cosine" else -u)

    def scores(self, support: Tensor, support_labels: Tensor, query: Tensor, n_way: int) -> Tensor:
        s = self.norm(support)
        c = prototypes(s, one_hot(support_labels, n_way, s.dtype))
        return self.kernel(Geometry.of(self.norm(query), c))

    def forward(self, episode: Episode, memory: Tensor | None = None) -> HeadOutput:
        # one normalisation of every row (fewer kernels than two)
        both = self.norm(full_precision(joined([episode.support, episode.query], 1)))
        s, q = both.split([episode.support.shape[1], episode.query.shape[1]], 1)
        c = prototypes(s, one_hot(episode.support_labels, episode.n_way, s.dtype))
        k = 0
        if memory is not None:
            mem = self.norm(expand_memory(memory, s))
            k = mem.shape[1]
            c = torch.cat([c, mem], 1)
        soft = query_targets(episode, q.dtype)
        pairs = Pairs(
            anchors=q,
            cands=c,
            targets=pad_columns(soft, k),
            valid=None,
            anchor_soft=soft,
            support=s,
            support_labels=episode.support_labels,
            n_way=episode.n_way,
            positive=episode.query_labels if episode.mix_weight is None else None,
            unit=self.unit_rows and episode.n_supp == 1,  # a prototype of one normalised row is one
        )
        loss, extras, logits, transformed = self.pair_loss(pairs)
        n = episode.n_way
        raw = self.kernel(Geometry.of(q, c[:, :n], pairs.unit)) if transformed else logits[..., :n]
        return HeadOutput(loss=loss, logits=raw, extras=extras)
