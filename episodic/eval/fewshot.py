"""Few-shot evaluation: N-way K-shot episodes on held-out classes, scored with a head on frozen features.

Episodes are drawn from a seeded generator, so every head and every checkpoint sees the same
episodes. Accuracy is reported as the mean over episodes with a 95% confidence interval
``1.96 * std / sqrt(episodes)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from episodic.errors import check
from episodic.heads.base import Head


@dataclass
class FewShotResult:
    mean: float
    ci95: float
    episodes: int

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "ci95": self.ci95}


def sample_episodes(labels: Tensor, n_way: int, k_shot: int, n_query: int, episodes: int,
                    seed: int = 0) -> tuple[Tensor, Tensor]:
    """Indices of support ``[T, n_way*k_shot]`` and query ``[T, n_way*n_query]`` rows, class-major."""
    classes = labels.unique()
    check(len(classes) >= n_way, f"n_way={n_way} is larger than the {len(classes)} classes available")
    by_class = [(labels == c).nonzero().squeeze(1) for c in classes]
    need = k_shot + n_query
    small = min(len(ix) for ix in by_class)
    check(small >= need, f"k_shot + n_query = {need} is larger than the smallest class ({small} images)")
    g = torch.Generator().manual_seed(seed)
    sup, qry = [], []
    for _ in range(episodes):
        chosen = torch.randperm(len(classes), generator=g)[:n_way]
        picks = [by_class[c][torch.randperm(len(by_class[c]), generator=g)[:need]] for c in chosen.tolist()]
        p = torch.stack(picks)  # [n_way, need]
        sup.append(p[:, :k_shot].reshape(-1))
        qry.append(p[:, k_shot:].reshape(-1))
    return torch.stack(sup), torch.stack(qry)


@torch.no_grad()
def fewshot_accuracy(features: Tensor, labels: Tensor, head: Head, n_way: int = 5, k_shot: int = 1,
                     n_query: int = 15, episodes: int = 600, seed: int = 0, chunk: int = 100) -> FewShotResult:
    """Mean accuracy (%) and 95% CI of ``head`` over seeded N-way K-shot episodes on ``features``."""
    sup, qry = sample_episodes(labels, n_way, k_shot, n_query, episodes, seed)
    ys = torch.arange(n_way).repeat_interleave(k_shot)
    yq = torch.arange(n_way).repeat_interleave(n_query)
    accs = []
    for i in range(0, episodes, chunk):
        s, q = features[sup[i : i + chunk]], features[qry[i : i + chunk]]
        e = s.shape[0]
        logits = head.scores(s, ys.expand(e, -1), q, n_way)
        accs.append((logits.argmax(-1) == yq).float().mean(1))
    acc = torch.cat(accs) * 100
    ci = 1.96 * acc.std(unbiased=True).item() / episodes**0.5 if episodes > 1 else float("nan")
    return FewShotResult(acc.mean().item(), ci, episodes)
