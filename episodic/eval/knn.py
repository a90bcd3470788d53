"""Weighted k-nearest-neighbour classification on frozen features, and the kNN monitor of training.

The classifier of Wu et al. (2018, "instance discrimination"), the usual monitor of SSL runs:
features are L2-normalised; a test feature ``q`` takes its ``k`` most cosine-similar training
features ``x_j`` (labels ``y_j``) and each votes for its class with weight ``exp(cos(q, x_j) / T)``::

    score_c(q) = sum_{j in topk(q)} [y_j = c] * exp(cos(q, x_j) / T),     prediction = argmax_c score_c

(ties go to the lowest class index). Defaults ``k = 200``, ``T = 0.1``; ``k`` larger than the
training set means every training feature votes.

:class:`KNNMonitor` runs this during training every ``eval.knn_every`` epochs (``eval.knn_unit:
epochs``) or steps (``steps``), and at the last step: memory bank = the labelled train split,
queries = the test split, both through the backbone in eval mode without augmentation, on the main
process only. The accuracy goes to TensorBoard (``eval/knn_acc``), to the progress bar (``knn=``)
and to ``knn.jsonl`` in the run directory (one ``{"step", "knn_acc"}`` line per evaluation; a
resumed run first drops the lines after its checkpoint's step).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from episodic.data.datasets import ArrayDataset
from episodic.errors import check
from episodic.eval.features import extract_features, labelled
from episodic.monitor import Progress

if TYPE_CHECKING:
    from episodic.eval.context import EvalContext


@torch.no_grad()
def knn_scores(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    k: int = 200,
    temperature: float = 0.1,
    n_classes: int | None = None,
    chunk: int = 1024,
) -> Tensor:
    """Class votes ``[N_test, C]`` of the weighted kNN classifier (see the module docstring)."""
    check(k >= 1, f"knn k={k} is not allowed; use an integer >= 1")
    check(temperature > 0, f"knn temperature={temperature} is not allowed; use a value > 0")
    check(len(train_x) > 0, "the kNN memory bank is empty; the train split has no labelled images")
    n_classes = int(train_y.max()) + 1 if n_classes is None else n_classes
    dtype = torch.float64 if train_x.dtype == torch.float64 else torch.float32
    bank = F.normalize(train_x.to(dtype), dim=1)
    kk = min(k, len(bank))
    out = []
    for i in range(0, len(test_x), chunk):
        q = F.normalize(test_x[i : i + chunk].to(dtype), dim=1)
        sim, idx = (q @ bank.T).topk(kk, dim=1)
        w = (sim / temperature).exp()
        votes = torch.zeros(len(q), n_classes, dtype=w.dtype, device=w.device)
        out.append(votes.scatter_add_(1, train_y[idx], w))
    return torch.cat(out) if out else torch.zeros(0, n_classes, dtype=dtype)


def knn_accuracy(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, k: int = 200, temperature: float = 0.1
) -> float:
    """Top-1 accuracy (%) of the weighted kNN classifier."""
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    pred = knn_scores(train_x, train_y, test_x, k, temperature, n_classes).argmax(1)
    return float((pred == test_y).double().mean() * 100)


def knn_eval(
    backbone: nn.Module,
    train: ArrayDataset,
    test: ArrayDataset,
    k: int = 200,
    temperature: float = 0.1,
    device: str | torch.device = "cpu",
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> float:
    """kNN accuracy (%) of ``backbone`` features: labelled ``train`` images as the memory bank, ``test``
    images as the queries."""
    train, test = labelled(train), labelled(test)
    check(len(test) > 0, "the kNN test split has no labelled images")
    ftr = extract_features(backbone, train.images, device=device, mean=mean, std=std)
    fte = extract_features(backbone, test.images, device=device, mean=mean, std=std)
    return knn_accuracy(ftr, train.labels, fte, test.labels, k, temperature)


class KNNMonitor:
    """Periodic kNN accuracy of the model's backbone, a :class:`episodic.monitor.Monitor` (a no-op when
    ``every`` is 0 or on ranks > 0).

    Args:
        every, unit: evaluate every ``every`` epochs (``unit="epochs"``) or steps, and at the last step.
        k, temperature: the classifier's settings.
        steps_per_epoch: optimizer steps in one pass over the training images.
        path: the ``knn.jsonl`` file; lines after ``resumed_step`` (a killed run's) are dropped.
        main: whether this process logs (rank 0).
        mean, std: the data's normalisation.
    """

    def __init__(
        self,
        every: int,
        unit: str,
        k: int,
        temperature: float,
        steps_per_epoch: int,
        path: Path,
        resumed_step: int = 0,
        main: bool = True,
        mean: Any = None,
        std: Any = None,
    ) -> None:
        check(unit in ("epochs", "steps"), f"eval.knn_unit={unit!r} is not allowed; use epochs or steps")
        check(every >= 0, f"eval.knn_every={every} is not allowed; use 0 (off) or a positive integer")
        self.k, self.temperature, self.mean, self.std = k, temperature, mean, std
        self.interval = every * (max(1, steps_per_epoch) if unit == "epochs" else 1)
        self.enabled = every > 0 and main
        self.last: float | None = None
        self.path = path
        if self.enabled and self.path.is_file():  # a resumed run drops what was logged after its checkpoint
            keep = [r for r in map(json.loads, self.path.read_text().splitlines()) if r["step"] <= resumed_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
            self.last = keep[-1]["knn_acc"] if keep else None

    name = "knn"

    def state_dict(self) -> dict[str, Any]:
        return {}  # what it logged is in knn.jsonl

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def due(self, step: int, total: int) -> bool:
        return self.enabled and (step % self.interval == 0 or step == total)

    def after_step(self, progress: Progress) -> None:
        """Evaluate when due (logging it) and keep ``knn=`` on the progress bar."""
        if self.due(progress.step, progress.total):
            acc = knn_eval(
                progress.model.backbone,
                progress.data.train,
                progress.data.test,
                self.k,
                self.temperature,
                progress.device,
                self.mean,
                self.std,
            )
            self.last = acc
            progress.writer.add_scalar("eval/knn_acc", acc, progress.step)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": progress.step, "knn_acc": acc}) + "\n")
        bar = progress.bar
        postfix = getattr(bar, "postfix", None) or ""
        if self.last is not None and not getattr(bar, "disable", False) and "knn=" not in postfix:
            shown = f"{postfix}, " if postfix else ""
            bar.set_postfix_str(f"{shown}knn={self.last:.1f}", refresh=False)


def run_knn(ctx: EvalContext, ev: Any) -> dict[str, Any]:
    """kNN accuracy (%) of the trained (and random-init) backbone for each ``k`` in ``ev.k``."""
    from omegaconf import ListConfig

    from episodic.eval.features import cached_features

    ks = [int(k) for k in ev.k] if isinstance(ev.k, (list, tuple, ListConfig)) else [int(ev.k)]
    t = float(ev.temperature)
    train, test = labelled(ctx.split(str(ev.train_split))), labelled(ctx.split(str(ev.test_split)))
    check(len(test) > 0, f"split {ev.test_split!r} has no labelled images for the kNN queries")
    too_big = [k for k in ks if k > len(train)]
    check(
        not too_big,
        f"eval.k={too_big[0] if too_big else 0} is larger than the {len(train)} labelled images of split "
        f"{ev.train_split!r} (the memory bank); use k <= {len(train)}",
    )
    out: dict[str, Any] = {f"k{k}": {"trained": None, "random_init": None} for k in ks}
    for which, backbone in ctx.backbones(bool(ev.baseline)):
        ftr = cached_features(backbone, train.images, ctx.cache_dir, ctx.device, **ctx.norm)
        fte = cached_features(backbone, test.images, ctx.cache_dir, ctx.device, **ctx.norm)
        for k in ks:
            out[f"k{k}"][which] = knn_accuracy(ftr, train.labels, fte, test.labels, k, t)
    out["temperature"] = t
    return out
