"""The online linear probe (episodic/eval/online.py): it learns, it leaves training exactly as it was, it is
named online in results.json and the printed table, and a resumed run continues it from the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from episodic.eval.online import OnlineProbe
from episodic.monitor import Progress
from helpers import TINY, make_cfg

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = ["train.steps=40", "train.log_every=10", "train.ckpt_every=20", "eval.knn_every=0", "batch_size=64"]


class _Bar:
    disable, postfix = True, ""


class _Writer:
    def __init__(self) -> None:
        self.scalars: dict[str, list[float]] = {}

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.setdefault(tag, []).append(value)


def run_probe(trainer: object, probe: OnlineProbe, steps: range) -> _Writer:
    """The probe's monitor calls for ``steps`` on the trainer's current model (no training)."""
    writer = _Writer()
    for step in steps:
        probe.after_step(
            Progress(step, steps[-1], trainer.model, trainer.data, trainer.device, writer, _Bar())  # type: ignore[attr-defined]
        )
    return writer


def make_probe(trainer: object, lr: float = 0.1) -> OnlineProbe:
    data = trainer.data  # type: ignore[attr-defined]
    return OnlineProbe(data.train, data.test, 64, lr, 0, 10)


def test_probe_learns_on_frozen_features(tmp_path: Path) -> None:
    """On a random-init conv4's 16 features of digits (10 classes), 200 probe steps reach six times chance
    (70%; a logistic regression fitted to convergence on the same standardised features: 83%)."""
    from episodic.engine import Trainer

    trainer = Trainer(make_cfg(*TINY, *STEPS), tmp_path)
    probe = make_probe(trainer)
    writer = run_probe(trainer, probe, range(1, 201))
    assert probe.test_acc is not None and probe.test_acc > 60.0  # chance: 10%
    curve = writer.scalars["online/probe_train_acc"]
    assert curve[-1] > curve[0] + 10  # it learned over the run, not at the start
    assert writer.scalars["online/probe_test_acc"] == [probe.test_acc]


def test_probe_changes_nothing_in_training(tmp_path: Path) -> None:
    """The same 40 steps with and without the probe: identical losses and identical weights, bit for bit."""
    from episodic.train import train

    states = {}
    for flag in ("true", "false"):
        run = tmp_path / flag
        train(make_cfg(*TINY, *STEPS, f"eval.online_probe={flag}", "eval.fewshot.episodes=4"), run)
        states[flag] = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    on, off = states["true"], states["false"]
    assert [r["loss"] for r in on["history"]] == [r["loss"] for r in off["history"]]
    for key, value in off["model"].items():
        assert torch.equal(on["model"][key], value), key
    assert {"1.weight", "1.bias", "0.running_mean"} <= set(on["monitors"]["online_probe"]["linear"])
    results = json.loads((tmp_path / "true" / "results.json").read_text())
    assert results["online_probe"]["protocol"].startswith("online")
    assert 10.0 < results["online_probe"]["test_acc"] <= 100.0
    assert "online_probe" not in json.loads((tmp_path / "false" / "results.json").read_text())


def test_resumed_probe_continues_exactly(tmp_path: Path) -> None:
    """Steps 21-40 after a resume from step 20's state give the weights of steps 1-40 in one go."""
    from episodic.engine import Trainer

    trainer = Trainer(make_cfg(*TINY, *STEPS), tmp_path)
    whole = make_probe(trainer)
    run_probe(trainer, whole, range(1, 41))
    first = make_probe(trainer)
    run_probe(trainer, first, range(1, 21))
    second = make_probe(trainer)
    second.load_state_dict(first.state_dict())
    run_probe(trainer, second, range(21, 41))
    for key, value in whole.state_dict()["linear"].items():
        assert torch.equal(second.state_dict()["linear"][key], value), key


def test_unlabelled_data_has_no_probe(tmp_path: Path) -> None:
    from episodic.data.datasets import ArrayDataset

    images = torch.zeros(8, 1, 8, 8, dtype=torch.uint8)
    unlabelled, test = (
        ArrayDataset(images, torch.full((8,), -1), []),
        ArrayDataset(images, torch.zeros(8).long(), ["0"]),
    )
    probe = OnlineProbe(unlabelled, test, 4, 0.1, 0, 1)
    assert not probe.enabled


def test_new_test_classes_have_no_probe() -> None:
    """Few-shot splits (Omniglot's test characters are not training characters): a probe of the training
    classes would score 0% there, so it is off; a test split of training classes keeps it."""
    from episodic.data.datasets import ArrayDataset

    images = torch.zeros(6, 1, 8, 8, dtype=torch.uint8)
    names = ["a", "b", "c"]
    train = ArrayDataset(images, torch.tensor([0, 0, 1, 1, 0, 1]), names)
    new = ArrayDataset(images, torch.tensor([2, 2, 2, 2, 2, 2]), names)
    known = ArrayDataset(images, torch.tensor([1, 0, 1, 0, 1, 0]), names)
    assert not OnlineProbe(train, new, 4, 0.1, 0, 1).enabled
    assert OnlineProbe(train, known, 4, 0.1, 0, 1).enabled
    assert not OnlineProbe(train, ArrayDataset(images, known.labels, ["x", "y", "z"]), 4, 0.1, 0, 1).enabled
