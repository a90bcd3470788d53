"""Few-shot evaluation: N-way K-shot episodes on held-out classes, scored with heads on frozen features.

Episodes are drawn from a seeded generator once per (ways, shots) and reused for every head and
every encoder, so head-to-head and trained-vs-random-init differences are paired. Accuracy is the
mean over episodes with a 95% confidence interval ``1.96 * std / sqrt(episodes)`` (MetaOptNet's
protocol: 5-way 1-shot and 5-shot, 15 queries per class, 1,000 test episodes).

Heads on frozen features (``EVAL_HEADS``): any registered head (``protonet``, ``r2d2`` = ridge, ``svm`` =
the Crammer-Singer QP head, ...), plus :class:`LogRegHead` (``logreg``): L2-regularised
multinomial logistic regression fitted on each episode's support set (the linear classifier of
Tian et al. 2020, "Rethinking few-shot image classification", on L2-normalised features).

Which images: with ``split: auto`` the dataset's ``fewshot_classes`` from its ``fewshot_split``
(``both`` unless the data config says ``test`` or ``train``; digits: 5-9 of the test split) when the
data config names them, else the test split (the meta-test classes of Omniglot, CIFAR-FS, FC100,
mini-ImageNet loaders).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor

from episodic.config import as_dict
from episodic.data.datasets import ArrayDataset
from episodic.errors import check
from episodic.heads.base import HEADS, Head
from episodic.registry import Registry

if TYPE_CHECKING:
    from episodic.eval.context import EvalContext


@dataclass
class FewShotResult:
    """Mean accuracy (%) over the episodes, the 95% confidence half-width, and the episode count."""

    mean: float
    ci95: float
    episodes: int

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "ci95": self.ci95}


def sample_episodes(
    labels: Tensor, n_way: int, k_shot: int, n_query: int, episodes: int, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Indices of support ``[T, n_way*k_shot]`` and query ``[T, n_way*n_query]`` rows, class-major."""
    check(n_way >= 2, f"ways={n_way} is not allowed; few-shot episodes need at least 2 classes")
    check(k_shot >= 1 and n_query >= 1, f"shots={k_shot}, queries={n_query}: both must be >= 1")
    check(episodes >= 2, f"episodes={episodes} is not allowed; a confidence interval needs at least 2")
    classes = labels.unique()
    check(
        len(classes) >= n_way,
        f"{n_way}-way episodes need {n_way} classes but the few-shot set has "
        f"{len(classes)}; use ways <= {len(classes)}",
    )
    by_class = [(labels == c).nonzero().squeeze(1) for c in classes]
    need = k_shot + n_query
    small = min(range(len(classes)), key=lambda i: len(by_class[i]))
    check(
        len(by_class[small]) >= need,
        f"{k_shot}-shot episodes with {n_query} queries need {need} images per class but class "
        f"{int(classes[small])} has only {len(by_class[small])}; lower shots or queries",
    )
    g = torch.Generator().manual_seed(seed)
    sup, qry = [], []
    for _ in range(episodes):
        chosen = torch.randperm(len(classes), generator=g)[:n_way]
        picks = [by_class[c][torch.randperm(len(by_class[c]), generator=g)[:need]] for c in chosen.tolist()]
        p = torch.stack(picks)  # [n_way, need]
        sup.append(p[:, :k_shot].reshape(-1))
        qry.append(p[:, k_shot:].reshape(-1))
    return torch.stack(sup), torch.stack(qry)


def mean_ci95(acc: Tensor) -> FewShotResult:
    """Mean and ``1.96 * std / sqrt(n)`` (unbiased std) of per-episode accuracies."""
    n = len(acc)
    ci = 1.96 * acc.double().std(unbiased=True).item() / n**0.5 if n > 1 else float("nan")
    return FewShotResult(acc.double().mean().item(), ci, n)


@torch.no_grad()
def episode_accuracies(
    features: Tensor, sup: Tensor, qry: Tensor, head: Head, n_way: int, k_shot: int, n_query: int, chunk: int = 100
) -> Tensor:
    """Per-episode query accuracy (%) ``[T]`` of ``head`` on the episodes ``sup``/``qry`` (row indices)."""
    ys = torch.arange(n_way).repeat_interleave(k_shot)
    yq = torch.arange(n_way).repeat_interleave(n_query)
    accs = []
    for i in range(0, len(sup), chunk):
        s, q = features[sup[i : i + chunk]], features[qry[i : i + chunk]]
        logits = head.scores(s, ys.expand(s.shape[0], -1), q, n_way)
        accs.append((logits.argmax(-1).cpu() == yq).double().mean(1))
    return torch.cat(accs) * 100


def fewshot_accuracy(
    features: Tensor,
    labels: Tensor,
    head: Head,
    n_way: int = 5,
    k_shot: int = 1,
    n_query: int = 15,
    episodes: int = 600,
    seed: int = 0,
    chunk: int = 100,
) -> FewShotResult:
    """Mean accuracy (%) and 95% CI of ``head`` over seeded N-way K-shot episodes on ``features``."""
    sup, qry = sample_episodes(labels, n_way, k_shot, n_query, episodes, seed)
    return mean_ci95(episode_accuracies(features, sup, qry, head, n_way, k_shot, n_query, chunk))


EVAL_HEADS: Registry[type[Head]] = Registry("evaluation head", None, extends=HEADS)


@EVAL_HEADS.register("logreg")
class LogRegHead(Head):
    """Multinomial logistic regression fitted on each episode's support set (L-BFGS, float64).

    Per episode, with (optionally L2-normalised) support rows ``s_i``, labels ``y_i``::

        W*, b* = argmin_{W [d, K], b [K]}  sum_i CE(s_i W + b, y_i) + ||W||^2 / (2 C)
        logits(q) = q W* + b*

    the objective of scikit-learn's ``LogisticRegression(C=C)`` (intercept not penalised). The
    episodes of a batch are independent, so one L-BFGS run on the sum of their objectives finds
    every episode's optimum. Evaluation only: no gradient flows back to the features.
    """

    def __init__(self, C: float = 1.0, normalize: bool = True, max_iter: int = 100, tol: float = 1e-7) -> None:
        super().__init__()
        check(C > 0, f"logreg C={C} is not allowed; use a value > 0")
        check(max_iter >= 1, f"logreg max_iter={max_iter} is not allowed; use an integer >= 1")
        self.C, self.normalize, self.max_iter, self.tol = float(C), normalize, int(max_iter), float(tol)

    def fit(self, support: Tensor, support_labels: Tensor, n_way: int) -> tuple[Tensor, Tensor]:
        """The fitted ``W [E, d, K]`` and ``b [E, 1, K]`` (float64)."""
        s = support.detach().double()
        if self.normalize:
            s = F.normalize(s, dim=-1)
        e, _, d = s.shape
        w = torch.zeros(e, d, n_way, dtype=torch.float64, device=s.device, requires_grad=True)
        b = torch.zeros(e, 1, n_way, dtype=torch.float64, device=s.device, requires_grad=True)
        opt = torch.optim.LBFGS(
            [w, b],
            lr=1,
            max_iter=self.max_iter,
            tolerance_grad=self.tol,
            tolerance_change=1e-12,
            history_size=20,
            line_search_fn="strong_wolfe",
        )
        y = support_labels.reshape(-1)

        def closure() -> Tensor:
            opt.zero_grad()
            logits = s @ w + b
            loss = F.cross_entropy(logits.reshape(-1, n_way), y, reduction="sum") + w.pow(2).sum() / (2 * self.C)
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return w.detach(), b.detach()

    def scores(self, support: Tensor, support_labels: Tensor, query: Tensor, n_way: int) -> Tensor:
        w, b = self.fit(support, support_labels, n_way)
        q = query.detach().double()
        if self.normalize:
            q = F.normalize(q, dim=-1)
        return (q @ w + b).to(query.dtype)


def build_eval_head(name: str, params: Any = None) -> Head:
    """An evaluation head (``EVAL_HEADS``: every training head, and ``logreg``) from a params mapping, in
    eval mode."""
    return EVAL_HEADS.build(name, **as_dict(params)).eval()


def fewshot_source(data: Any, data_cfg: DictConfig, split: str = "auto", classes: Any = None) -> ArrayDataset:
    """The labelled images few-shot episodes are drawn from (see the module docstring)."""
    from episodic.eval.features import get_split, labelled

    name = str(data_cfg.get("name", "data"))
    if split == "auto":
        fc = data_cfg.get("fewshot_classes")
        if fc is not None:
            ds = get_split(data, str(data_cfg.get("fewshot_split", "both")), name)
            classes = list(fc) if classes is None else classes
        else:
            ds = get_split(data, "test", name)
    else:
        ds = get_split(data, split, name)
    return labelled(ds).with_classes(None if classes is None else [int(c) for c in classes])


def run_fewshot(ctx: EvalContext, ev: DictConfig) -> dict[str, Any]:
    """``{head: {"<N>way<K>shot": {"trained": {mean, ci95}, "random_init": ...}}}`` on shared seeded episodes."""
    from episodic.eval.features import cached_features

    fs = fewshot_source(ctx.data, ctx.data_cfg, str(ev.split), ev.get("classes"))
    heads = {name: build_eval_head(name, (ev.get("head_params") or {}).get(name)) for name in ev.heads}
    check(len(heads) > 0, "eval.heads is empty; name at least one of " + ", ".join(EVAL_HEADS.names()))
    episodes = {
        shot: sample_episodes(fs.labels, int(ev.ways), int(shot), int(ev.queries), int(ev.episodes), int(ev.seed))
        for shot in ev.shots
    }
    out: dict[str, Any] = {name: {} for name in heads}
    for which, backbone in ctx.backbones(bool(ev.baseline)):
        feats = cached_features(backbone, fs.images, ctx.cache_dir, ctx.device, **ctx.norm)
        for shot, (sup, qry) in episodes.items():
            key = f"{ev.ways}way{shot}shot"
            for name, head in heads.items():
                acc = episode_accuracies(
                    feats, sup, qry, head, int(ev.ways), int(shot), int(ev.queries), int(ev.get("chunk", 100))
                )
                cell = out[name].setdefault(key, {"trained": None, "random_init": None})
                cell[which] = mean_ci95(acc).as_dict()
    return out
