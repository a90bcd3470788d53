"""End-of-run pictures, saved as PNG under ``<run dir>/plots/`` and to TensorBoard (``plots/*``).

* ``accuracy.png``: accuracy versus step: the training episodes' query accuracy (``history.jsonl``)
  and, when the kNN monitor ran, its test accuracy (``knn.jsonl``).
* ``scores.png``: histograms of the head's query scores on fresh training episodes, split into the
  *positive* score (the logit of the query's own class: another view of the same image) and the
  *negative* scores (its logits for every other class), for the trained and the random-init model.
  Training pulls the two apart; their overlap is what the loss still has to fix.
* ``embedding_tsne.png`` (and ``embedding_umap.png`` when ``umap-learn`` is installed): a 2-D map of
  the test images' backbone features, coloured by label, trained next to random init.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from episodic.eval.features import extract_features, labelled
from episodic.model import EpisodicModel, build_model


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (``[]`` when it does not exist)."""
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.is_file() else []


def plot_accuracy_curve(
    history: list[dict[str, Any]], knn: list[dict[str, Any]] | None = None, title: str = ""
) -> Figure:
    """Training-episode accuracy (and kNN accuracy, if any) in % against the step."""
    fig = Figure(figsize=(6, 3.6), dpi=120)
    ax = fig.add_subplot()
    if history:
        ax.plot(
            [r["step"] for r in history],
            [100 * r["acc"] for r in history],
            "." if len(history) < 2 else "-",
            label="training episodes (query acc)",
        )
    if knn:
        ax.plot([r["step"] for r in knn], [r["knn_acc"] for r in knn], "o-", label="kNN (test split)")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title or "accuracy versus step")
    fig.tight_layout()
    return fig


def episode_scores(logits: Tensor, query_labels: Tensor) -> tuple[Tensor, Tensor]:
    """Positive scores ``logits[e, q, y_eq]`` and negative scores (every other class), both flat."""
    lg = logits.detach().float().cpu()
    pos_mask = torch.nn.functional.one_hot(query_labels.cpu(), lg.shape[-1]).bool()
    return lg[pos_mask], lg[~pos_mask]


@torch.no_grad()
def collect_scores(
    model: EpisodicModel,
    images: Tensor,
    augment: Any,
    batch_size: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[Tensor, Tensor]:
    """Positive and negative head scores of ``model`` on training-style episodes of ``batch_size`` images.

    ``model`` must be a one-process model (:func:`~episodic.model.build_model` without a scope: no
    collective calls from the main process alone); it runs in eval mode (BatchNorm uses its running
    statistics), task augmentations drawn from a generator seeded by ``seed``. Its train/eval mode is
    restored afterwards.
    """
    from episodic.data.augment import multi_view

    was_training = model.training
    model.eval()
    g_cpu = torch.Generator().manual_seed(seed)
    g_aug = torch.Generator().manual_seed(seed + 1)  # augmentation draws happen on the CPU
    idx = torch.randperm(len(images), generator=g_cpu)[:batch_size]
    views = multi_view(augment, images[idx].to(device), model.sampler.n_views, g_aug)
    out = model(views, torch.Generator().manual_seed(seed + 2))
    model.train(was_training)
    return episode_scores(out.logits, out.query_labels)


def plot_score_histograms(scores: dict[str, tuple[Tensor, Tensor]], title: str = "") -> Figure:
    """One panel per model: density histograms of positive and negative scores."""
    fig = Figure(figsize=(4.2 * len(scores), 3.4), dpi=120)
    axes = fig.subplots(1, len(scores), squeeze=False)[0]
    for ax, (name, (pos, neg)) in zip(axes, scores.items()):
        lo = float(min(pos.min(), neg.min()))
        hi = float(max(pos.max(), neg.max()))
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 60)
        ax.hist(neg.numpy(), bins=bins, density=True, alpha=0.6, color="tab:red", label=f"negatives ({len(neg)})")
        ax.hist(pos.numpy(), bins=bins, density=True, alpha=0.6, color="tab:blue", label=f"positives ({len(pos)})")
        ax.set_title(name)
        ax.set_xlabel("query score (logit)")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("density")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def embed_2d(features: Tensor, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """``[N, d]`` -> ``[N, 2]`` with scikit-learn's t-SNE (PCA init) or UMAP."""
    x = features.double().numpy()
    if method == "umap":
        import umap  # optional dependency

        return umap.UMAP(n_components=2, random_state=seed).fit_transform(x)
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def plot_embedding(maps: dict[str, tuple[np.ndarray, np.ndarray]], class_names: list[str], title: str = "") -> Figure:
    """Scatter plots of 2-D maps ``{panel: (xy [N, 2], labels [N])}``, one colour per class."""
    fig = Figure(figsize=(4.2 * len(maps) + 1.2, 4.2), dpi=120, layout="constrained")
    axes = fig.subplots(1, len(maps), squeeze=False)[0]
    cmap = "tab10" if len(class_names) <= 10 else "tab20"
    for ax, (name, (xy, y)) in zip(axes, maps.items()):
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=y, cmap=cmap, s=6, vmin=-0.5, vmax=len(class_names) - 0.5)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    if len(class_names) <= 20:
        cb = fig.colorbar(sc, ax=list(axes), ticks=range(len(class_names)), shrink=0.9)
        cb.ax.set_yticklabels(class_names)
    if title:
        fig.suptitle(title)
    return fig


def umap_available() -> bool:
    try:
        import umap  # noqa: F401
    except ImportError:
        return False
    return True


def save_run_plots(trainer: Any, run_dir: str | Path | None = None) -> dict[str, Path]:
    """Draw the three pictures of a finished :class:`~episodic.engine.Trainer` run; ``{name: png path}``."""
    from torch.utils.tensorboard import SummaryWriter

    cfg = trainer.cfg
    run_dir = Path(run_dir or trainer.run_dir)
    out_dir = run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(cfg).to(trainer.device)  # the trained weights in a one-process model
    model.load_state_dict(trainer.model.state_dict())
    baseline = build_model(cfg).to(trainer.device)
    label = f"{cfg.head.name} on {cfg.data.name}, {trainer.step} steps"
    figs: dict[str, Figure] = {
        "accuracy": plot_accuracy_curve(
            read_jsonl(run_dir / "history.jsonl"), read_jsonl(run_dir / "knn.jsonl"), f"accuracy versus step ({label})"
        )
    }
    models = (("trained", model), ("random init", baseline))
    scores = {
        name: collect_scores(
            m, trainer.train_set.images, trainer.augment, int(cfg.batch_size), int(cfg.seed), trainer.device
        )
        for name, m in models
    }
    figs["scores"] = plot_score_histograms(scores, f"{cfg.head.name} head scores on training episodes")
    test = labelled(trainer.data.test)
    k = min(int(cfg.eval.get("plot_points", 1000)), len(test))
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(int(cfg.seed)))[:k].sort().values
    aug = cfg.data.augment
    backbones = (("trained", model.backbone), ("random init", baseline.backbone))
    feats = {
        name: extract_features(b, test.images[pick], device=trainer.device, mean=aug.get("mean"), std=aug.get("std"))
        for name, b in backbones
    }
    y = test.labels[pick].numpy()
    for method in ["tsne"] + (["umap"] if umap_available() else []):
        maps = {name: (embed_2d(f, method, int(cfg.seed)), y) for name, f in feats.items()}
        what = "t-SNE" if method == "tsne" else "UMAP"
        figs[f"embedding_{method}"] = plot_embedding(maps, list(test.classes), f"{what} of backbone features ({label})")
    writer = SummaryWriter(str(run_dir / "tb"))
    paths = {}
    for name, fig in figs.items():
        paths[name] = out_dir / f"{name}.png"
        fig.savefig(paths[name])
        writer.add_figure(f"plots/{name}", fig, global_step=trainer.step)
    writer.close()
    return paths
