"""ProtoNet head (Snell et al., 2017).

Prototype of class k is the mean support embedding, ``c_k = mean_{i: y_i = k} s_i``; query logits
are negative squared Euclidean distances divided by a temperature::

    logit_{q,k} = -||q - c_k||^2 / tau

With ``normalize=True`` (default) embeddings are L2-normalised first. For one shot on the unit
sphere ``-||q - c||^2 / tau = (2/tau) cos(q, c) - 2/tau``, i.e. a one-directional InfoNCE with
temperature ``tau / 2``. (The metacontrastive reference divides embeddings by sqrt(T), which is
this head with ``tau = T``.) ``metric="cosine"`` scores ``cos(q, c_k) / tau`` instead.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from episodic.errors import check
from episodic.heads.base import HEADS, Head, LogitScale, one_hot


def prototypes(support: Tensor, support_labels: Tensor, n_way: int) -> Tensor:
    """Class means ``[E, n_way, d]`` of ``support [E, Ns, d]``."""
    y = one_hot(support_labels, n_way, support.dtype)  # [E, Ns, K]
    return y.transpose(1, 2) @ support / y.sum(1).clamp_min(1).unsqueeze(-1)


@HEADS.register("protonet")
class ProtoNetHead(Head):
    """Prototypes as class means; logits = -squared distance / tau (or cosine / tau)."""

    def __init__(self, temperature: float = 0.1, normalize: bool = True, metric: str = "euclidean",
                 learn_scale: bool = False) -> None:
        super().__init__()
        check(temperature > 0, f"head.params.temperature={temperature} is not allowed; use a value > 0")
        check(metric in ("euclidean", "cosine"),
              f"head.params.metric={metric!r} is not allowed; use 'euclidean' or 'cosine'")
        self.normalize, self.metric = normalize, metric
        self.scale = LogitScale(1.0 / temperature, learn=learn_scale)

    def scores(self, support: Tensor, support_labels: Tensor, query: Tensor, n_way: int) -> Tensor:
        if self.normalize or self.metric == "cosine":
            support, query = F.normalize(support, dim=-1), F.normalize(query, dim=-1)
        c = prototypes(support, support_labels, n_way)
        if self.metric == "cosine":
            logits = query @ F.normalize(c, dim=-1).transpose(1, 2)
        else:
            # -||q - c||^2 = 2 q.c - ||q||^2 - ||c||^2, one batched matmul
            logits = 2 * query @ c.transpose(1, 2) - query.pow(2).sum(-1, keepdim=True) - c.pow(2).sum(-1).unsqueeze(1)
        return self.scale(logits)
