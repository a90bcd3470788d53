"""Evaluation suite: kNN (exact toy values, training monitor), linear probe, semi-supervised fine-tuning,
few-shot heads and intervals, end-of-run pictures, one-line errors of ``python -m episodic.eval``.

One short digits run (module fixture, conv4 on 16x16 images, 20 steps) is evaluated by every
protocol; its kNN monitor runs every 5 steps and it draws the end-of-run pictures.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from episodic.cli import run_or_fail, validate_overrides
from episodic.data.datasets import build_dataset
from episodic.eval.__main__ import evaluate
from episodic.eval.features import extract_features, load_encoders
from episodic.eval.fewshot import LogRegHead, fewshot_accuracy, fewshot_source, sample_episodes
from episodic.eval.knn import knn_accuracy, knn_eval, knn_scores
from episodic.eval.linear import pad_crop_flip, sgd_probe
from episodic.eval.plots import episode_scores, plot_accuracy_curve
from episodic.eval.semi import balanced_subset, pct_name
from episodic.heads.base import HEADS
from episodic.train import train
from helpers import TINY, make_cfg, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

# lam 5 (the reference's penalty): after these 20 tiny steps its encoder probes at ~64% on 1 or 2 threads,
# where the default lam 0.2 gives ~38-41%, depending on the thread count
RUN = [
    "head.params.lam=5",
    "train.steps=20",
    "batch_size=64",
    "data.params.image_size=16",
    "data.augment.size=16",
    "eval.linear=false",
    "eval.baseline=false",
    "eval.knn_every=5",
    "eval.knn_unit=steps",
    "eval.plots=true",
    "eval.plot_points=120",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A briefly trained digits encoder: its run directory (checkpoint, history, knn.jsonl, plots)."""
    run_dir = tmp_path_factory.mktemp("digits_run")
    torch.manual_seed(0)
    train(make_cfg("head=r2d2", *TINY, *RUN), run_dir)
    return run_dir


def ev(run: Path, protocol: str, *overrides: str) -> dict:
    cfg = make_cfg(
        f"eval={protocol}", f"checkpoint={run / 'checkpoints' / 'last.pt'}", "device=cpu", *overrides, config="evaluate"
    )
    return evaluate(cfg)


def fails_with(capsys: pytest.CaptureFixture, fn, prefix: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as e:
        run_or_fail(fn)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(prefix), err


# ----------------------------------------------------------------------------------------------- kNN
def test_knn_votes_are_exact_on_toy_data() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 1])
    q = torch.tensor([[2.0, 0.0]], dtype=torch.float64)  # not unit norm: the classifier normalises
    # cosines to q: 1.0, 0.8, 0.0, -1.0, 0.6 -> top 3 = rows 0, 1, 4
    votes = knn_scores(bank, y, q, k=3, temperature=0.5)
    ref = torch.tensor([[math.exp(1 / 0.5) + math.exp(0.8 / 0.5), math.exp(0.6 / 0.5)]], dtype=torch.float64)
    torch.testing.assert_close(votes, ref, rtol=1e-12, atol=0)
    # weighting decides: one close class-0 neighbour vs two farther class-1 neighbours
    bank2 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    q2 = torch.tensor([[1.0, 0.05]])
    assert knn_scores(bank2, torch.tensor([0, 1, 1]), q2, k=3, temperature=0.1).argmax() == 0  # e^10 > 2 e^~0
    assert knn_scores(bank2, torch.tensor([0, 1, 1]), q2, k=3, temperature=100.0).argmax() == 1  # ~majority
    # k larger than the bank: every row votes; accuracy of 3 queries, 2 right
    qs = torch.tensor([[1.0, 0.1], [0.1, 1.0], [-1.0, 0.2]])
    acc = knn_accuracy(bank2, torch.tensor([0, 1, 1]), qs, torch.tensor([0, 1, 0]), k=200)
    assert acc == pytest.approx(200 / 3)


def test_knn_monitor_logs_the_protocols_value(run: Path) -> None:
    lines = [json.loads(x) for x in (run / "knn.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [5, 10, 15, 20]
    res = ev(run, "knn", "eval.k=[200]", "eval.baseline=false")
    assert res["k200"]["trained"] == pytest.approx(lines[-1]["knn_acc"], abs=1e-9)
    enc = load_encoders(run / "checkpoints" / "last.pt")
    data = build_dataset("digits", image_size=16)
    direct = knn_eval(enc.trained, data.train, data.test, k=20)
    assert direct == pytest.approx(ev(run, "knn", "eval.k=20")["k20"]["trained"])
    tb = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert [e.step for e in tb.Scalars("eval/knn_acc")] == [5, 10, 15, 20]
    assert {"plots/accuracy", "plots/scores", "plots/embedding_tsne"} <= set(tb.Tags()["images"])


def test_knn_monitor_schedule_progress_bar_and_resume(tmp_path: Path) -> None:
    import io
    from types import SimpleNamespace

    from tqdm import tqdm

    from episodic.data.datasets import ArrayDataset, Splits
    from episodic.eval.knn import KNNMonitor
    from episodic.models.backbones import Conv4
    from episodic.monitor import Progress

    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (12, 1, 8, 8), generator=g, dtype=torch.uint8)
    train_set = ArrayDataset(imgs[:8], torch.arange(8) % 2, ["a", "b"])
    data = Splits(train_set, ArrayDataset(imgs[8:], torch.arange(4) % 2, ["a", "b"]))
    backbone = Conv4(in_channels=1, width=4, depth=2).eval()
    old = [{"step": s, "knn_acc": float(s)} for s in (4, 8, 12)]
    (tmp_path / "knn.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    # every 2 epochs of 5 // 2 = 2 steps; resumed at step 8: the line of step 12 goes
    mon = KNNMonitor(2, "epochs", 3, 0.5, 5 // 2, tmp_path / "knn.jsonl", resumed_step=8)
    assert mon.interval == 4 and mon.last == 8.0  # 2 epochs of 5 // 2 = 2 steps
    assert [json.loads(x)["step"] for x in (tmp_path / "knn.jsonl").read_text().splitlines()] == [4, 8]
    assert [s for s in range(1, 11) if mon.due(s, 10)] == [4, 8, 10]
    logged: list = []
    writer = SimpleNamespace(add_scalar=lambda *a: logged.append(a))
    bar = tqdm(total=10, file=io.StringIO())
    bar.set_postfix(loss="1.000")
    mon.after_step(
        Progress(
            10,
            10,
            SimpleNamespace(backbone=backbone),
            data,
            torch.device("cpu"),  # type: ignore[arg-type]
            writer,
            bar,
        )
    )
    acc = knn_eval(backbone, data.train, data.test, k=3, temperature=0.5)
    assert logged == [("eval/knn_acc", acc, 10)] and bar.postfix == f"loss=1.000, knn={acc:.1f}"
    assert json.loads((tmp_path / "knn.jsonl").read_text().splitlines()[-1]) == {"step": 10, "knn_acc": acc}
    bar.close()


# ----------------------------------------------------------------------------------------------- linear
def test_linear_probe_of_trained_encoder_beats_random_init(run: Path) -> None:
    res = ev(run, "linear")
    assert res["settings"]["optimizer"] == "lbfgs" and res["settings"]["recipe"] == "default"
    assert res["trained"] > res["random_init"] + 3.0, res
    saved = json.loads((run / "results.json").read_text())
    assert "fewshot" in saved  # the end-of-run keys stay
    rec = [r for r in saved["evaluations"] if r["protocol"] == "linear"][-1]
    assert rec["results"]["trained"] == res["trained"] and rec["step"] == 20 and rec["backbone"] == "conv4"


def test_pad_crop_flip_is_an_exact_shifted_window() -> None:
    x = torch.arange(2 * 1 * 5 * 6, dtype=torch.float32).view(2, 1, 5, 6)
    g = torch.Generator().manual_seed(3)
    out = pad_crop_flip(x, pad=2, flip_p=0.5, generator=g)
    g = torch.Generator().manual_seed(3)
    oy, ox = torch.randint(0, 5, (2,), generator=g), torch.randint(0, 5, (2,), generator=g)
    flip = torch.rand(2, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for b in range(2):
        ref = padded[b, :, oy[b] : oy[b] + 5, ox[b] : ox[b] + 6]
        torch.testing.assert_close(out[b], ref.flip(-1) if flip[b] else ref, rtol=0, atol=0)


def test_sgd_probe_separates_separable_classes_and_runs_the_paper_recipe(run: Path) -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0]])
    y = torch.arange(3).repeat(40)
    x = centers[y] + 0.3 * torch.randn(len(y), 3, generator=g)
    head = sgd_probe(lambda idx: x[idx], y, 3, 3, steps=60, batch_size=32, lr=0.1)
    assert (head(x).argmax(1) == y).all()
    res = ev(
        run,
        "linear",
        "eval.optimizer=sgd",
        "eval.aug=crop_flip",
        "eval.steps=80",
        "eval.batch_size=128",
        "eval.lr=0.5",
        "eval.momentum=0.9",
        "eval.weight_decay=0",
        "eval.baseline=false",
    )
    assert res["settings"]["aug"] == "crop_flip" and res["random_init"] is None
    assert res["trained"] > 40.0  # 10 classes: chance is 10%


# ----------------------------------------------------------------------------------------------- semi
def test_balanced_subsets_are_seeded_and_saved(run: Path) -> None:
    labels = torch.arange(10).repeat_interleave(torch.tensor([30, 25, 40, 35, 30, 28, 33, 31, 26, 29]))
    a, b = balanced_subset(labels, 0.1, seed=1), balanced_subset(labels, 0.1, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, balanced_subset(labels, 0.1, seed=2))
    assert torch.bincount(labels[a]).tolist() == [3] * 10  # round(0.1 * 307 / 10) = 3 per class
    assert pct_name(0.01) == "1pct" and pct_name(0.005) == "0.5pct"
    res = ev(run, "semi", "eval.fractions=[0.1]", "eval.lr=0.1", "eval.steps=20")
    row = res["10pct"]
    assert row["labels"] == 130 and row["per_class"] == 13 and row["steps"] == 20  # digits train: 1,257 images
    train_labels = build_dataset("digits", image_size=16).train.labels
    saved = [int(i) for i in (run / row["indices_file"]).read_text().split()]
    assert saved == balanced_subset(train_labels, 0.1, seed=0).tolist()
    assert row["trained"] > 25.0  # 10 classes: chance is 10%


# ----------------------------------------------------------------------------------------------- few-shot
def test_logreg_head_matches_scikit_learn() -> None:
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(0)
    s = torch.randn(1, 15, 8, generator=g, dtype=torch.float64)
    ys = torch.arange(5).repeat_interleave(3).unsqueeze(0)
    q = torch.randn(1, 20, 8, generator=g, dtype=torch.float64)
    head = LogRegHead(C=2.0, normalize=True, max_iter=500, tol=1e-12)
    probs = head.scores(s, ys, q, 5).softmax(-1)[0]
    sn, qn = torch.nn.functional.normalize(s[0], dim=-1), torch.nn.functional.normalize(q[0], dim=-1)
    ref = LogisticRegression(C=2.0, tol=1e-12, max_iter=10_000).fit(sn.numpy(), ys[0].numpy())
    np.testing.assert_allclose(probs.numpy(), ref.predict_proba(qn.numpy()), atol=1e-5)


def test_fewshot_heads_share_episodes_and_intervals_shrink(run: Path) -> None:
    small = ev(run, "fewshot", "eval.shots=[1]", "eval.episodes=50", "eval.baseline=false")
    large = ev(run, "fewshot", "eval.shots=[1]", "eval.episodes=250", "eval.baseline=false")
    assert set(large) == {"protonet", "r2d2", "svm", "logreg"}
    for head in large:
        a, b = small[head]["5way1shot"]["trained"], large[head]["5way1shot"]["trained"]
        assert b["ci95"] < 0.65 * a["ci95"], (head, a, b)  # ~ sqrt(50 / 250) = 0.45
        assert 20.0 < b["mean"] <= 100.0
    # the protocol's episodes are exactly sample_episodes(seed): recompute ProtoNet's mean independently
    enc = load_encoders(run / "checkpoints" / "last.pt")
    data_cfg = OmegaConf.create({"name": "digits", "fewshot_classes": [5, 6, 7, 8, 9], "fewshot_split": "test"})
    fs = fewshot_source(build_dataset("digits", image_size=16), data_cfg)
    assert sorted(fs.labels.unique().tolist()) == [5, 6, 7, 8, 9]
    proto = HEADS.build("protonet", temperature=1.0, normalize=True, metric="euclidean")
    r = fewshot_accuracy(extract_features(enc.trained, fs.images), fs.labels, proto, 5, 1, 15, 250, seed=0)
    assert r.mean == pytest.approx(large["protonet"]["5way1shot"]["trained"]["mean"], abs=1e-9)
    sup, qry = sample_episodes(fs.labels, 5, 1, 15, 3, seed=0)
    assert torch.equal(sup, sample_episodes(fs.labels, 5, 1, 15, 3, seed=0)[0]) and qry.shape == (3, 75)


# ----------------------------------------------------------------------------------------------- pictures
def test_end_of_run_pictures_exist(run: Path) -> None:
    for name in ["accuracy", "scores", "embedding_tsne"]:
        data = (run / "plots" / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_scores_split_into_positives_and_negatives() -> None:
    logits = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]])
    pos, neg = episode_scores(logits, torch.tensor([[2, 0]]))
    assert pos.tolist() == [3.0, 4.0] and neg.tolist() == [1.0, 2.0, 5.0, 6.0]
    history = [{"step": 10, "acc": 0.25}, {"step": 20, "acc": 0.5}]
    fig = plot_accuracy_curve(history, [{"step": 20, "knn_acc": 70.0}])
    lines = fig.axes[0].lines
    assert list(lines[0].get_ydata()) == [25.0, 50.0] and list(lines[1].get_ydata()) == [70.0]


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_one_line_exit_2(run: Path, capsys: pytest.CaptureFixture) -> None:
    ck = f"checkpoint={run / 'checkpoints' / 'last.pt'}"

    def cfg(*o: str):  # type: ignore[no-untyped-def]
        return make_cfg(*o, "device=cpu", config="evaluate")

    fails_with(
        capsys,
        lambda: evaluate(cfg("eval=fewshot", ck, "eval.ways=6")),
        "error: 6-way episodes need 6 classes but the few-shot set has 5; use ways <= 5",
    )
    fails_with(
        capsys,
        lambda: evaluate(cfg("eval=fewshot", ck, "eval.shots=[400]")),
        "error: 400-shot episodes with 15 queries need 415 images per class but class ",
    )
    fails_with(
        capsys,
        lambda: evaluate(cfg("eval=linear", ck, "eval.test_split=val")),
        "error: data 'digits' has no split 'val'; allowed: train, test, both",
    )
    fails_with(capsys, lambda: evaluate(cfg("eval=knn")), "error: checkpoint=PATH is required")
    fails_with(capsys, lambda: evaluate(cfg("eval=knn", f"checkpoint={run / 'nope.pt'}")), "error: checkpoint=")
    fails_with(
        capsys,
        lambda: evaluate(cfg("eval=semi", ck, "eval.fractions=[0.1,0.2]", "eval.lr=[0.1]")),
        "error: eval.lr has 1 entries for 2 fractions",
    )
    fails_with(capsys, lambda: evaluate(cfg("eval=knn", ck, "data=cifar10")), "error: data 'cifar10' has 3-channel")
    with pytest.raises(SystemExit) as e:
        validate_overrides("evaluate", ["eval=lineer", ck])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: unknown eval 'lineer'; allowed: ")
    p = run_cli("episodic.eval", "eval=linear", ck, "backbone=resnet18")
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "holds a conv4(" in lines[0] and "not resnet18" in lines[0]
