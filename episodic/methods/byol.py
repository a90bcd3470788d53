"""``byol``: BYOL (Grill et al., 2020) as an encoder pairing: regression to a momentum target, no negatives.

The queries go through the online encoder and a predictor, the support set through a momentum
(EMA) target encoder. Each query regresses onto its class's target: the mean of the normalised
target embeddings of the class's support examples, weighted by the query's label mass when the
query is mixed (CutMix)::

    p_q  = g(f_online(x_q)),        t_k = mean_{i: y_i = k} f_target(x_i) / ||f_target(x_i)||
    loss = mean_q ( 2 - 2 <p_q / ||p_q||, sum_k m_q(k) t_k> )

For one shot and one query this is BYOL's ``2 - 2 cos(p, t)``; ``symmetric=true`` (BYOL's
default) adds the swapped direction, support views predicting the targets of their class's query
views. In meta-learning terms it is a ProtoNet whose loss keeps only the attraction to the
query's own prototype. Task augmentations (large rotations as new classes, query CutMix) act on
the image episode before the pairing, so they apply unchanged; the head is not part of the loss
here: it only scores the predicted queries against the target support (``HeadOutput.logits``, for
accuracy and histograms). Variants act on negatives and are refused with this pairing.

Its loss stays on each process: every class's views live on one process, so an episode spanning
processes changes neither the loss nor the gradient, and nothing is gathered (``gathers = False``).
The second (swapped) direction is returned as an episode of target query embeddings and predicted
support embeddings; its regression targets are weighted by the first episode's label mass, which is
where a mixed query's two labels live.

Defaults follow BYOL: target momentum 0.996 raised to 1 on a cosine schedule, predictor
``Linear(d, hidden) - BN - ReLU - Linear(hidden, d)``. Difference: the online (and target) encoder
embeds all views of a step in one pass, so BatchNorm statistics span both views.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from episodic.heads.base import Head, HeadOutput, one_hot, prototypes, query_targets
from episodic.methods.base import METHODS, Embeddings, Method
from episodic.methods.momentum import check_momentum, ema_update, frozen_copy, momentum_at
from episodic.models import Encoder, Projector
from episodic.tasks.episode import Episode


def regression_loss(pred: Tensor, target: Tensor) -> Tensor:
    """``mean(2 - 2 <pred / ||pred||, target>)`` over rows (``target`` already a mean of unit vectors)."""
    return (2 - 2 * (F.normalize(pred, dim=-1) * target).sum(-1)).mean()


@METHODS.register("byol")
class BYOL(Method):
    """Online encoder + predictor for queries, momentum target for the support set, no negatives."""

    negatives = False
    trains_head = False  # the head only scores queries for the accuracy readout
    gathers = False

    def __init__(
        self,
        encoder: Encoder,
        momentum: float = 0.996,
        momentum_schedule: str = "cosine",
        predictor_hidden: int = 512,
        symmetric: bool = True,
    ) -> None:
        super().__init__(encoder)
        check_momentum(momentum, momentum_schedule)
        self.momentum, self.schedule, self.symmetric = float(momentum), momentum_schedule, symmetric
        self.target = frozen_copy(encoder)
        d = encoder.projector.out_dim
        self.predictor = Projector(d, predictor_hidden, d, layers=2)

    def embed(self, episode: Episode, transform: Embeddings) -> list[Episode]:
        """``[targets of the support, predictions of the queries]`` and, when symmetric, the swapped pair."""
        e, ns = episode.support.shape[:2]
        nq = episode.query.shape[1]
        imgs_s, imgs_q = episode.support.flatten(0, 1), episode.query.flatten(0, 1)
        if not self.symmetric:
            p_q = self.predictor(self.encoder(imgs_q)).view(e, nq, -1)
            with torch.no_grad():
                t_s = self.target(imgs_s).view(e, ns, -1)
            return [episode.replace(support=t_s, query=p_q)]
        p = self.predictor(self.encoder(torch.cat([imgs_s, imgs_q])))
        with torch.no_grad():
            t = self.target(torch.cat([imgs_s, imgs_q]))
        t_s, t_q = t[: e * ns].view(e, ns, -1), t[e * ns :].view(e, nq, -1)
        p_s, p_q = p[: e * ns].view(e, ns, -1), p[e * ns :].view(e, nq, -1)
        swapped = episode.replace(
            support=t_q,
            query=p_s,
            support_labels=episode.query_labels,
            query_labels=episode.support_labels,
            n_supp=episode.n_query,
            n_query=episode.n_supp,
            query_labels_mix=None,
            mix_weight=None,
        )
        return [episode.replace(support=t_s, query=p_q), swapped]

    def score(self, episodes: list[Episode], head: Head) -> HeadOutput:
        """Each prediction regresses onto its class's mean normalised target (label-mass weighted)."""
        first = episodes[0]
        t_s, p_q = first.support.float(), first.query.float()
        m_q = query_targets(first, p_q.dtype)  # [E, Nq, n_way] label mass of each query
        y_s = one_hot(first.support_labels, first.n_way, p_q.dtype)  # [E, Ns, n_way]
        loss = regression_loss(p_q, m_q @ prototypes(F.normalize(t_s, dim=-1), y_s))
        if len(episodes) > 1:
            t_q, p_s = episodes[1].support.float(), episodes[1].query.float()
            tiny = torch.finfo(p_q.dtype).tiny
            loss = loss + regression_loss(p_s, y_s @ prototypes(F.normalize(t_q, dim=-1), m_q, tiny))
        with torch.no_grad():
            logits = head.scores(t_s, first.support_labels, p_q, first.n_way)
        return HeadOutput(loss=loss, logits=logits)

    def after_step(self, step: int, total_steps: int) -> None:
        ema_update(self.target, self.encoder, momentum_at(self.momentum, step, total_steps, self.schedule))
