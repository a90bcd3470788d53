"""Score histograms for any head and variant: the FT paper's visualisation, in TensorBoard.

Every ``train.hist_every`` steps the trainer passes the last step's query logits (``[E, Nq, n_way]``,
from :class:`~episodic.heads.base.HeadOutput`) and the queries' labels. A query's *positive* score
is its logit for its own class, its *negative* scores the logits for every other class (for a
mixed query, its first label counts). Logged:

* ``scores/pos`` and ``scores/neg``: histograms (negatives thinned to about 4096 values so the cost
  stays flat); TensorBoard's offset view shows their evolution like the FT notebook's waterfall;
* ``scores/pos_mean``, ``scores/pos_var``, ``scores/neg_mean`` (mean over queries of the per-query
  mean), ``scores/neg_var`` (mean over queries of the per-query variance; the FT definition) and
  ``scores/gap`` = pos_mean - neg_mean;
* every entry of ``HeadOutput.extras``: 0-d tensors as scalars (e.g. ``dcl/clamped``), others as
  histograms (e.g. ``scores/ft_pos`` / ``scores/ft_neg``: the feature-transformed training scores).

The FT code records the scores after the transform only; here the raw scores are the main
histograms and the transformed ones come with the ``ft`` suffix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from episodic.heads.base import thin


@torch.no_grad()
def score_stats(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, dict[str, float]]:
    """Positive scores ``[Q]``, negative scores ``[Q, n_way - 1]`` and their moments."""
    z = logits.detach().float().reshape(-1, logits.shape[-1])
    y = labels.reshape(-1)
    pos = z.gather(1, y.unsqueeze(1)).squeeze(1)
    mask = torch.ones_like(z, dtype=torch.bool).scatter_(1, y.unsqueeze(1), False)
    neg = z[mask].view(z.shape[0], z.shape[1] - 1)
    moments = {
        "scores/pos_mean": pos.mean().item(),
        "scores/pos_var": pos.var(unbiased=False).item(),
        "scores/neg_mean": neg.mean(1).mean().item() if neg.numel() else float("nan"),
        "scores/neg_var": neg.var(1, unbiased=False).mean().item() if neg.numel() else float("nan"),
    }
    moments["scores/gap"] = moments["scores/pos_mean"] - moments["scores/neg_mean"]
    return pos, neg, moments


def log_scores(writer: Any, logits: Tensor, labels: Tensor, extras: Mapping[str, Tensor], step: int) -> None:
    """Write the histograms and moments above to a TensorBoard ``writer``."""
    pos, neg, moments = score_stats(logits, labels)
    writer.add_histogram("scores/pos", pos.cpu(), step)
    if neg.numel():
        writer.add_histogram("scores/neg", thin(neg).cpu(), step)
    for k, v in moments.items():
        writer.add_scalar(k, v, step)
    for k, t in extras.items():
        t = t.detach().float()
        if t.dim() == 0:
            writer.add_scalar(k, t.item(), step)
        elif t.numel():
            writer.add_histogram(k, thin(t).cpu(), step)
