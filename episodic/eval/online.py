"""The online linear probe: a linear classifier trained alongside self-supervised training.

Not the offline linear evaluation (``eval=linear``, or the end-of-run ``linear probe`` row, which trains a
fresh classifier on frozen features after training). The online probe is what solo-learn, lightly and
stable-pretraining log during training, and its figures are always named *online*: after every optimizer
step it takes a batch of labelled training images (their own random order), embeds them with the current
backbone in eval mode without gradients (detached features, no augmentation, BatchNorm statistics
untouched), and takes one SGD step of a linear layer on the cross-entropy::

    logits = W BN(f(x)) + b,   loss = CE(logits, y),   (W, b) <- (W, b) - lr * grad

``BN`` standardises each feature (batch statistics while the probe trains, running ones at test time; no
affine parameters, as MAE's linear probe): backbone features differ in scale by orders of magnitude
between architectures and during training, and a fixed learning rate then fits none of them.

The encoder, its gradients, the training loss and every random stream of the training step are unchanged
(``tests/test_online_probe.py``). The features move as the encoder trains, so the probe lags the
encoder: its accuracy is a cheap running signal, not the encoder's linear-probe accuracy.

Logged: the probe's accuracy on its own training batches since the last log (TensorBoard
``online/probe_train_acc``, the progress bar ``online=``) and, at the last step, its test-split accuracy
(``online/probe_test_acc`` and ``results.json`` ``online_probe``). Its weights are part of the training
checkpoint and each step's batch is a function of (seed, step), so a resumed run continues it exactly.
Cost: one no-grad backbone forward of ``batch_size`` images per step. On the main process only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from episodic.data.datasets import ArrayDataset
from episodic.errors import check
from episodic.eval.features import extract_features
from episodic.monitor import Progress


def same_classes(train: ArrayDataset, test: ArrayDataset) -> bool:
    """Whether every test label is a class of the training split (a probe of the training classes can
    score the test split); not so for few-shot splits, whose test classes are new (Omniglot's)."""
    if train.classes != test.classes or not len(train):
        return False
    known = torch.zeros(len(train.classes) + 1, dtype=torch.bool)
    known[train.labels.clamp(min=-1)] = True  # -1 (unlabelled) lands on the extra last slot
    return bool(known[test.labels[test.labels >= 0]].all())


class OnlineProbe:
    """A :class:`episodic.monitor.Monitor` training a linear probe on detached backbone features.

    Args:
        train, test: labelled splits (uint8 images); an empty or unlabelled train split, or a test split
            with classes the train split does not have (few-shot splits), disables it.
        batch_size: labelled images per step.
        lr: the probe's SGD learning rate.
        seed: its batches' random order (independent of training's).
        log_every: steps between two ``online/probe_train_acc`` points (``train.log_every``).
        main: whether this process runs it (rank 0).
        mean, std: the data's normalisation.
    """

    name = "online_probe"

    def __init__(
        self,
        train: ArrayDataset,
        test: ArrayDataset,
        batch_size: int,
        lr: float,
        seed: int,
        log_every: int,
        main: bool = True,
        mean: Any = None,
        std: Any = None,
    ) -> None:
        check(lr > 0, f"eval.online_probe_lr={lr} is not allowed; use a value > 0")
        labelled = len(train) > 0 and train.labels is not None and bool((train.labels >= 0).all())
        self.enabled = main and labelled and same_classes(train, test)
        self.train, self.test = train, test
        self.batch_size, self.lr, self.seed, self.log_every = min(batch_size, max(1, len(train))), lr, seed, log_every
        self.mean, self.std = mean, std
        self.n_classes = int(train.labels.max()) + 1 if labelled else 0
        self.linear: nn.Sequential | None = None  # built at the first step, from the features' width
        self.pending: dict[str, Tensor] | None = None  # weights of a resumed run, before the first step
        self.hits: Tensor | None = None  # correct predictions on the probe's batches since the last log
        self.seen = 0
        self.train_acc: float | None = None
        self.test_acc: float | None = None

    def batch(self, step: int) -> Tensor:
        """Indices of step ``step``'s labelled images: a function of (seed, step) only."""
        g = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(step))
        return torch.randint(len(self.train), (self.batch_size,), generator=g)

    def features(self, backbone: nn.Module, images: Tensor, device: torch.device) -> Tensor:
        return extract_features(backbone, images, len(images), device, self.mean, self.std, on_device=True)

    def after_step(self, progress: Progress) -> None:
        if not self.enabled:
            return
        idx = self.batch(progress.step)
        x = self.features(progress.model.backbone, self.train.images[idx], progress.device)
        y = self.train.labels[idx].to(progress.device)
        if self.linear is None:
            layer = nn.Linear(x.shape[1], self.n_classes)
            nn.init.zeros_(layer.weight)  # zeros, not a draw: training's global random stream is not touched
            nn.init.zeros_(layer.bias)
            self.linear = nn.Sequential(nn.BatchNorm1d(x.shape[1], affine=False), layer).to(progress.device)
            if self.pending is not None:
                self.linear.load_state_dict(self.pending)
            self.hits = torch.zeros((), device=progress.device)
        self.linear.train()
        logits = self.linear(x)
        params: list[Tensor] = list(self.linear.parameters())
        grads = torch.autograd.grad(F.cross_entropy(logits, y), params)
        with torch.no_grad():
            torch._foreach_add_(params, grads, alpha=-self.lr)
            self.hits += (logits.argmax(1) == y).sum()
        self.seen += len(y)
        if progress.step % self.log_every == 0 or progress.step == progress.total:
            self.train_acc = 100.0 * float(self.hits) / self.seen
            self.hits.zero_()
            self.seen = 0
            progress.writer.add_scalar("online/probe_train_acc", self.train_acc, progress.step)
            bar = progress.bar
            postfix = getattr(bar, "postfix", None) or ""
            if not getattr(bar, "disable", False) and "online=" not in postfix:
                bar.set_postfix_str(
                    f"{postfix}, online={self.train_acc:.1f}" if postfix else f"online={self.train_acc:.1f}"
                )
        if progress.step == progress.total and len(self.test):
            self.test_acc = self.accuracy(progress.model.backbone, progress.device)
            progress.writer.add_scalar("online/probe_test_acc", self.test_acc, progress.step)

    @torch.no_grad()
    def accuracy(self, backbone: nn.Module, device: torch.device, chunk: int = 1024) -> float:
        """Accuracy (%) of the probe on the test split."""
        assert self.linear is not None
        self.linear.eval()
        correct = 0
        for i in range(0, len(self.test), chunk):
            x = self.features(backbone, self.test.images[i : i + chunk], device)
            correct += int((self.linear(x).argmax(1).cpu() == self.test.labels[i : i + chunk]).sum())
        return 100.0 * correct / len(self.test)

    def result(self) -> dict[str, Any]:
        """What ``results.json`` keeps under ``online_probe``."""
        return {
            "protocol": "online: trained alongside training on detached features, one SGD step per step",
            "train_acc": self.train_acc,
            "test_acc": self.test_acc,
        }

    def state_dict(self) -> dict[str, Any]:
        source = self.linear.state_dict() if self.linear is not None else self.pending
        return {"linear": {k: v.detach().cpu() for k, v in source.items()}} if source is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "linear" in state:
            self.pending = state["linear"]
            if self.linear is not None:
                self.linear.load_state_dict(self.pending)
