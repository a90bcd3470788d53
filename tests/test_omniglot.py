"""Omniglot (npz arrays and the original folders, Vinyals and Lake splits, rotations) and the Omniglot
benchmark's budget, evaluation and report, on tiny files written here in both real formats."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from episodic.data.datasets import DATASETS, build_dataset, resize_uint8
from episodic.data.omniglot import read_split_list
from episodic.errors import EpisodicError
from episodic.optim import warmup_cosine
from helpers import ROOT, TINY, make_cfg

sys.path.insert(0, str(ROOT / "benchmarks"))
import ablate
import claims
import omniglot_fewshot as bench

DRAWINGS, SIDE = 20, 20
SETS = {
    "background": [
        "Alpha/character01",
        "Alpha/character02",
        "Alpha/character03",
        "Alpha/character04",
        "Beta/character01",
        "Beta/character02",
        "Beta/character03",
    ],
    "evaluation": [
        "Gamma/character01",
        "Gamma/character02",
        "Gamma/character03",
        "Gamma/character04",
        "Gamma/character05",
        "Delta/character01",
        "Delta/character02",
    ],
}
TRAIN = ["Alpha/character01", "Alpha/character02", "Alpha/character03", "Alpha/character04", "Gamma/character01"]
VAL = ["Beta/character01", "Beta/character02", "Beta/character03"]
TEST = ["Gamma/character02", "Gamma/character03", "Gamma/character04", "Gamma/character05", "Delta/character01"]


def _drawings(which: str) -> np.ndarray:
    """``[chars, DRAWINGS, SIDE, SIDE]`` uint8, different for every drawing (paper 255, some ink 0)."""
    rng = np.random.default_rng(0 if which == "background" else 1)
    return (rng.random((len(SETS[which]), DRAWINGS, SIDE, SIDE)) > 0.3).astype(np.uint8) * 255


@pytest.fixture(scope="module")
def omni_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both formats side by side: ``npz/`` (+ split lists) and ``folder/images_*/<alphabet>/<character>/``."""
    root = tmp_path_factory.mktemp("omniglot")
    (root / "npz" / "omniglot_vinyals").mkdir(parents=True)
    first_id = {"background": 1, "evaluation": 1 + len(SETS["background"])}
    for which, names in SETS.items():
        x = _drawings(which)
        np.savez(
            root / "npz" / f"omniglot_{which}.npz",
            images=x.reshape(-1, SIDE, SIDE, 1),
            labels=np.repeat(np.arange(len(names)), DRAWINGS),
            classes=np.array(names),
        )
        for c, name in enumerate(names):
            folder = root / "folder" / f"images_{which}" / name
            folder.mkdir(parents=True)
            for j in range(DRAWINGS):
                Image.fromarray(x[c, j]).save(folder / f"{first_id[which] + c:04d}_{j + 1:02d}.png")
    lists = root / "npz" / "omniglot_vinyals"
    (lists / "train.txt").write_text("\n".join(TRAIN) + "\n")
    (lists / "val.txt").write_text("\n".join(VAL) + "\n")
    # the source's form: every character 4 times with a rotation suffix
    (lists / "test.txt").write_text("".join(f"{n}/rot{r:03d}\n" for n in TEST for r in (0, 90, 180, 270)))
    return root


def _source(name: str) -> torch.Tensor:
    """The raw drawings ``[DRAWINGS, 1, SIDE, SIDE]`` of one character, as written to disk."""
    which = "background" if name in SETS["background"] else "evaluation"
    return torch.from_numpy(_drawings(which)[SETS[which].index(name)]).unsqueeze(1)


def test_vinyals_split_npz(omni_root: Path) -> None:
    s = build_dataset("omniglot", root=str(omni_root / "npz"), image_size=None)
    # train: 5 characters from both files, no rotations, labels 0..4; ink inverted to 255
    assert s.train.images.shape == (5 * DRAWINGS, 1, SIDE, SIDE) and s.train.images.dtype == torch.uint8
    assert s.train.labels.tolist() == [i for i in range(5) for _ in range(DRAWINGS)]
    assert torch.equal(s.train.images[4 * DRAWINGS :], 255 - _source("Gamma/character01"))
    assert torch.equal(s.train.images[:DRAWINGS], 255 - _source("Alpha/character01"))
    # test: 5 characters x 4 rotations = 20 classes after the train classes, character-major
    assert s.test.images.shape == (20 * DRAWINGS, 1, SIDE, SIDE)
    assert s.test.labels.tolist() == [5 + k for k in range(20) for _ in range(DRAWINGS)]
    assert s.train.classes == s.test.classes and len(s.test.classes) == 25
    assert s.test.classes[5:9] == [f"Gamma/character02/rot{r:03d}" for r in (0, 90, 180, 270)]
    src = 255 - _source("Delta/character01")  # 5th test character: classes 5 + 16 .. 5 + 19
    for r in range(4):
        got = s.test.images[s.test.labels == 5 + 16 + r]
        assert torch.equal(got, torch.rot90(src, r, dims=(2, 3)))
    # rot090 is counter-clockwise: the top row becomes the left column, read bottom to top
    assert torch.equal(s.test.images[(s.test.labels == 22).nonzero()[0, 0], 0, :, 0], src[0, 0, 0, :].flip(0))


def test_options_val_rotations_invert_resize(omni_root: Path) -> None:
    root = str(omni_root / "npz")
    v = build_dataset(
        "omniglot",
        root=root,
        image_size=None,
        eval_split="val",
        test_rotations=False,
        train_rotations=True,
        invert=False,
    )
    assert v.test.labels.tolist() == [20 + i for i in range(3) for _ in range(DRAWINGS)]  # 5 x 4 train classes first
    assert v.test.classes[20:] == VAL and torch.equal(v.test.images[:DRAWINGS], _source("Beta/character01"))
    assert v.train.images.shape[0] == 5 * 4 * DRAWINGS
    assert torch.equal(v.train.images[v.train.labels == 3], torch.rot90(_source("Alpha/character01"), 3, (2, 3)))
    small = build_dataset("omniglot", root=root, image_size=8)
    full = build_dataset("omniglot", root=root, image_size=None)
    assert small.test.images.shape[-2:] == (8, 8)
    assert torch.equal(small.train.images, resize_uint8(full.train.images, 8))
    # rotating after resizing is exact, so the resized rot090 class is rot90 of the resized rot000 class
    assert torch.equal(
        small.test.images[small.test.labels == 6], torch.rot90(small.test.images[small.test.labels == 5], 1, (2, 3))
    )
    # sharper training drawings: train at train_image_size, the evaluated split unchanged at image_size
    sharp = build_dataset("omniglot", root=root, image_size=8, train_image_size=16)
    assert torch.equal(sharp.train.images, resize_uint8(full.train.images, 16))
    assert torch.equal(sharp.test.images, small.test.images) and torch.equal(sharp.test.labels, small.test.labels)
    with pytest.raises(EpisodicError, match="train_image_size=2 is not allowed"):
        build_dataset("omniglot", root=root, train_image_size=2)


def test_folder_layout_matches_npz(omni_root: Path) -> None:
    a = build_dataset("omniglot", root=str(omni_root / "npz"), image_size=16)
    lists = str(omni_root / "npz" / "omniglot_vinyals")
    b = build_dataset("omniglot", root=str(omni_root / "folder"), splits_dir=lists, image_size=16)
    for x, y in ((a.train, b.train), (a.test, b.test)):
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels) and x.classes == y.classes


def test_lake_split(omni_root: Path) -> None:
    s = build_dataset("omniglot", root=str(omni_root / "folder"), split="lake", image_size=None, test_rotations=False)
    assert s.train.classes[:7] == SETS["background"] and s.test.classes[7:] == SETS["evaluation"]
    assert torch.equal(s.test.images[-DRAWINGS:], 255 - _source("Delta/character02"))


def test_split_list_forms(tmp_path: Path) -> None:
    p = tmp_path / "l.txt"
    p.write_text("A/character01/rot000\nA/character01/rot090\n\nB/character02\nA/character01/rot180\n")
    assert read_split_list(p) == ["A/character01", "B/character02"]


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(root="/nonexistent"), "no Omniglot found in '/nonexistent'"),
        (dict(split="random"), "data.params.split='random' is not allowed; use one of vinyals, lake"),
        (dict(eval_split="train"), "data.params.eval_split='train' is not allowed; use test or val"),
        (dict(split="lake", eval_split="val"), "data.params.eval_split=val needs split=vinyals"),
        (dict(format="zip"), "data.params.format='zip' is not allowed; use one of auto, npz, folder"),
        (dict(splits_dir="/nonexistent"), "Omniglot split list not found at '/nonexistent/train.txt'"),
        (dict(image_size=2), "data.params.image_size=2 is not allowed"),
    ],
)
def test_bad_input(omni_root: Path, params: dict, message: str) -> None:
    kw = {"root": str(omni_root / "npz"), **params}
    with pytest.raises(EpisodicError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_dataset("omniglot", **kw)


def test_unknown_character_and_overlap(omni_root: Path, tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("Alpha/character01\nAlpha/character99\n")
    (tmp_path / "test.txt").write_text("Alpha/character01\n")
    with pytest.raises(EpisodicError, match=r"in both train.txt and test.txt"):
        build_dataset("omniglot", root=str(omni_root / "npz"), splits_dir=str(tmp_path))
    (tmp_path / "test.txt").write_text("Gamma/character02\n")
    msg = r"1 characters of train.txt are not in the Omniglot files, e.g. \['Alpha/character99'\]"
    with pytest.raises(EpisodicError, match=msg):
        build_dataset("omniglot", root=str(omni_root / "npz"), splits_dir=str(tmp_path))


def test_config_and_registry() -> None:
    assert "omniglot" in DATASETS.names()
    cfg = make_cfg("data=omniglot")
    assert cfg.data.channels == 1 and cfg.data.augment.size == cfg.data.params.image_size == 28
    assert cfg.data.augment.jitter_p == 0 and cfg.data.params.test_rotations and not cfg.data.params.train_rotations


# ------------------------------------------------------------------------------------- the benchmark
def test_budget_schedule() -> None:
    steps = bench.Budget(steps=50, seconds=None, warmup=5, final_ratio=0.1)
    assert [steps.lr_factor(s) for s in range(51)] == pytest.approx([warmup_cosine(s, 50, 5, 0.1) for s in range(51)])
    assert not steps.done(49) and steps.done(50)
    timed = bench.Budget(steps=None, seconds=10.0, warmup=2, final_ratio=0.0)
    timed.elapsed = 2.5
    assert timed.lr_factor(1) == pytest.approx(2 / 3)  # warm-up counts steps
    assert timed.lr_factor(7) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert timed.progress(1000) == pytest.approx(0.25) and not timed.done(1000)
    both = bench.Budget(steps=100, seconds=10.0, warmup=0, final_ratio=0.0)
    both.elapsed = 9.0
    assert both.progress(20) == pytest.approx(0.9)  # the time budget binds first
    both.elapsed = 10.0
    assert both.done(20) and both.lr_factor(20) == pytest.approx(0.0)
    cpu = bench.Budget(steps=None, seconds=100.0, warmup=0, final_ratio=0.0, cpu_seconds=10.0)
    cpu.elapsed, cpu.cpu = 20.0, 5.0
    assert cpu.progress(3) == pytest.approx(0.5) and cpu.lr_factor(3) == pytest.approx(0.5)
    with pytest.raises(EpisodicError, match="give a budget"):
        bench.Budget(None, None, 0, 0.0)


def test_benchmark_end_to_end(omni_root: Path, tmp_path: Path) -> None:
    tiny = [o for o in TINY if not o.startswith(("train.steps", "eval."))]
    args = bench.parse_args(
        [
            "--steps",
            "2",
            "--episodes",
            "20",
            "--out",
            str(tmp_path / "run"),
            "--random-init-cache",
            str(tmp_path / "cache"),
            "--curve",
            "2",
            "--curve-episodes",
            "10",
            f"data.params.root={omni_root / 'npz'}",
            "data.params.image_size=16",
            "data.augment.size=16",
            "head=r2d2",
            *tiny,
        ]
    )
    res = bench.run(args)
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["steps"] == 2 and saved["budget"] == {"steps": 2, "seconds": None, "cpu_seconds": None}
    assert saved["train_seconds"] > 0 and saved["train_cpu_seconds"] > 0
    assert saved["eval"]["classes"] == 20 and saved["eval"]["episodes"] == 20
    for k in ("5way1shot", "5way5shot", "20way1shot", "20way5shot"):
        for part in ("fewshot", "random_init"):
            r = saved[part][k]
            assert 0 <= r["mean"] <= 100 and r["ci95"] >= 0
    assert saved["random_init"]["20way1shot"]["mean"] == res["random_init"]["20way1shot"]["mean"]
    assert [c["step"] for c in saved["curve"]] == [1, 2]  # half-way point, then the final evaluation
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    row = (tmp_path / "run" / "row.md").read_text()
    assert row.startswith("| run | `data.params.root=") and row.count("±") == 4
    # the evaluation is the protocol's: the same seeded episodes give the same numbers for the same backbone
    assert len(list((tmp_path / "cache").glob("random_init_*.json"))) == 1


# ------------------------------------------------------------------------------------- the ablation report
def _fake_result(out: Path, cell: ablate.Cell, seed: int, acc5: float, fraction: float = 1.0, steps: int = 100) -> None:
    d = ablate.run_dir(out, cell, seed, fraction)
    d.mkdir(parents=True)
    accs = {k: {"mean": acc5 + i, "ci95": 0.5} for i, k in enumerate(ablate.SETTINGS)}
    d.joinpath("result.json").write_text(
        json.dumps(
            {
                "steps": steps,
                "train_seconds": 10.0,
                "fewshot": accs,
                "config": {"backbone": {"name": "conv4"}},
                "eval": {"split": "test", "classes": 1692},
                "random_init": {k: {"mean": 50.0 + seed, "ci95": 1.0} for k in ablate.SETTINGS},
            }
        )
    )


def test_statistics() -> None:
    assert ablate.t_half_width([1.0, 2.0, 3.0]) == pytest.approx(4.302652729911275 / math.sqrt(3))
    assert math.isnan(ablate.t_half_width([1.0]))
    assert ablate.compare({0: 3.0, 1: 4.0, 2: 5.0}, {0: 1.0, 1: 2.0, 2: 3.1}, 1.0, "helps")[0] == "held"
    hurts = ablate.compare({0: 1.0, 1: 2.0, 2: 3.0}, {0: 3.0, 1: 4.5, 2: 5.0}, 1.0, "helps")
    assert hurts[0] == "did not hold (hurts)"
    assert ablate.compare({0: 1.0, 1: 3.0}, {0: 2.0, 1: 2.0}, 1.0, "helps")[0] == "inconclusive"
    assert ablate.compare({0: 80.0, 1: 81.0}, {0: 80.5, 1: 80.0}, 1.0, "similar")[0] == "held"
    assert ablate.compare({0: 84.0, 1: 85.0}, {0: 80.5, 1: 80.0}, 1.0, "similar")[0] == "did not hold (better)"
    assert ablate.compare({0: 76.0, 1: 75.0}, {0: 80.5, 1: 80.0}, 1.0, "similar")[0] == "did not hold (worse)"
    assert ablate.compare({0: 80.0}, {0: 70.0}, 1.0, "helps")[0] == "not enough seeds"


def test_report_from_results(tmp_path: Path) -> None:
    out = tmp_path / "grid"
    c, r = ablate.Cell("contrastive", False, "none"), ablate.Cell("r2d2", False, "none")
    cr = ablate.Cell("contrastive", True, "none")
    for s, (a, b, rot) in enumerate([(85.0, 85.5, 87.0), (86.0, 86.2, 88.5), (84.0, 84.1, 86.0)]):
        _fake_result(out, c, s, a)
        _fake_result(out, r, s, b)
        _fake_result(out, cr, s, rot)
        _fake_result(out, c, s, a - 5, fraction=0.5, steps=50)
    args = ablate.parse_args(
        [
            "--steps",
            "100",
            "--seeds",
            "0",
            "1",
            "2",
            "--heads",
            "contrastive",
            "r2d2",
            "--variants",
            "none",
            "--budgets",
            "0.5",
            "--out",
            str(out),
            "--doc",
            str(tmp_path / "docs" / "results.md"),
            "--report-only",
            "--",
            "n_query=2",
        ]
    )
    skipped = {ablate.Cell("r2d2", True, "none"): "refused: a reason"}
    cells = [c, r, cr, ablate.Cell("r2d2", True, "none")]
    text = ablate.report(
        args, cells, skipped, out, ["--steps", "100", "--report-only", "--max-runs", "3", "--jobs", "2"]
    )
    assert "python benchmarks/ablate.py --steps 100\n" in text  # --report-only, --max-runs, --jobs are not in it
    assert "test on the 1692 classes of the Vinyals test split (conv4 backbone)" in text
    hw = ablate.t_half_width([85.0, 86.0, 84.0])
    assert f"| contrastive | 3 | 100 | 10 | 85.0 ± {hw:.1f} | 86.0 ± {hw:.1f} |" in text
    assert "| random init (same seeds) | 3 | 0 | 0 | 51.0 ± " in text
    assert "| R2D2/ProtoNet ~ contrastive | r2d2 vs contrastive | held | +0.3" in text
    assert "| task rotation helps | contrastive + rotation vs contrastive | held | +2.2" in text
    assert "- r2d2 + rotation: skipped, refused: a reason" in text
    assert (tmp_path / "docs" / "results_budget.png").stat().st_size > 1000
    assert (tmp_path / "docs" / "results.md").read_text() == text


def test_plot_from_in_run_curves(tmp_path: Path) -> None:
    """Without --budgets the plot uses the base runs' own curves: mean over seeds at each point."""
    out = tmp_path / "grid"
    cell = ablate.Cell("protonet", False, "none")
    for s, accs in enumerate([(70.0, 80.0), (72.0, 84.0)]):
        _fake_result(out, cell, s, accs[1])
        p = ablate.run_dir(out, cell, s, 1.0) / "result.json"
        r = json.loads(p.read_text())
        r["curve"] = [
            {"step": 50, "seconds": 5.0, "5way1shot": {"mean": accs[0]}},
            {"step": 100, "seconds": 10.0, "5way1shot": {"mean": accs[1]}},
        ]
        p.write_text(json.dumps(r))
    xs, ys, es = ablate.curve_points(ablate.load(out, cell, [0, 1], 1.0), "training steps")
    assert xs == [50, 100] and ys == [71.0, 82.0]
    assert es[1] == pytest.approx(ablate.t_half_width([80.0, 84.0]))
    assert ablate.plot(tmp_path / "p.png", out, ["protonet"], [0, 1], [1.0], "training steps")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_linalg_solve_benchmark_ways_agree_with_float64(tmp_path: Path) -> None:
    """benchmarks/linalg_solve.py on the CPU: every way of doing the ridge's two solves gives the float64
    answer to float32 accuracy, and a row per way and size is written."""
    import linalg_solve

    out = tmp_path / "solve.json"
    linalg_solve.main(["--sizes", "8", "24", "--rhs", "5", "--iters", "2", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [(r["size"], r["way"]) for r in rows] == [(m, w) for m in (8, 24) for w in linalg_solve.WAYS]
    assert all(r["rel_error"] < 1e-5 and r["ms"] > 0 for r in rows)


def test_step_overhead_benchmark_runs_and_reports_ratios(tmp_path: Path) -> None:
    """benchmarks/step_overhead.py on a tiny encoder: a bare step and each head's step, both clocks."""
    import step_overhead

    out = tmp_path / "rows.json"
    step_overhead.main(
        [
            "--backbones",
            "conv4",
            "--heads",
            "protonet",
            "r2d2",
            "--batch",
            "8",
            "--size",
            "16",
            "--channels",
            "1",
            "--rounds",
            "2",
            "--warmup",
            "1",
            "--clock",
            "cpu",
            "--threads",
            "1",
            "--json",
            str(out),
            "backbone.params.width=8",
            "backbone.projector.hidden_dim=16",
        ]
    )
    rows = json.loads(out.read_text())
    assert [(r["backbone"], r["head"], r["clock"]) for r in rows] == [
        ("conv4", "protonet", "cpu"),
        ("conv4", "r2d2", "cpu"),
    ]
    for r in rows:
        assert r["bare_ms"] > 0 and r["step_ms"] > 0 and r["ratio"] == pytest.approx(r["step_ms"] / r["bare_ms"])
        assert r["chain"] == 1


def test_svm_solver_cost_benchmark_reports_each_step_and_profiles_some(tmp_path: Path) -> None:
    """benchmarks/svm_solver_cost.py on a tiny encoder: the solver's figures per window, profiled steps whose
    operators the iterations account for, one host read each."""
    import svm_solver_cost

    out = tmp_path / "rows.json"
    svm_solver_cost.main(
        ["--steps", "4", "--window", "2", "--profile-every", "2", "--batch", "16", "--threads", "1"]
        + ["--json", str(out), "backbone.params.width=8", "backbone.projector.hidden_dim=16"]
    )
    (res,) = json.loads(out.read_text())
    assert res["backbone"] == "conv4" and [w["steps"] for w in res["windows"]] == ["1-2", "3-4"]
    assert [p["step"] for p in res["profiles"]] == [2, 4]
    for p, w in zip(res["profiles"], res["windows"]):
        assert p["syncs"] == 1 and p["solver_ran"] >= p["solver_iters"] > 0
        assert p["augment_ops"] > 0  # digits come as uint8 images: the step augments them
        base = p["bare_ops"] + p["augment_ops"]  # what a step without the head runs; then each iteration's
        assert base + 9 * p["solver_ran"] < p["ops"] <= base + 11 * p["solver_ran"] + 15 * p["solver_cg_iters"] + 500
        assert w["solver_ran_max"] >= w["solver_ran_median"] >= w["solver_iters_median"]
        assert w["solver_ran_max"] >= p["solver_ran"]  # the profiled step is the window's last


def test_step_overhead_chain_times_steps_back_to_back() -> None:
    """``--chain N``: each round calls every step N times in a row and records the time per call."""
    import step_overhead

    calls: list[str] = []
    clock = iter(range(0, 1000, 6)).__next__  # 6 "seconds" from each reading of the clock to the next
    steps = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = step_overhead.interleaved(steps, warmup=1, rounds=2, clock=clock, sync=False, chain=3)
    assert calls == ["a", "b"] + ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3
    assert times == {"a": [2.0, 2.0], "b": [2.0, 2.0]}  # 6 seconds over 3 calls


def test_claims_report_pairs_each_arm_with_its_baseline(tmp_path: Path) -> None:
    """Paired verdicts from per-seed results, the curves, the runs still missing, and the hand-written
    findings kept across regenerations."""
    out, doc = tmp_path / "claims", tmp_path / "docs" / "results.md"
    per_seed = {
        "contrastive": [85.0, 86.0, 84.0],
        "r2d2": [85.2, 86.1, 84.6],
        "contrastive + query mixing": [90.0, 91.5, 89.0],
    }
    for arm, accs in per_seed.items():
        for s, a in enumerate(accs):
            d = claims.run_dir(out, arm, s)
            d.mkdir(parents=True)
            fewshot = {k: {"mean": a + i, "ci95": 0.5} for i, k in enumerate(ablate.SETTINGS)}
            curve = [{"step": 50, "5way1shot": {"mean": a - 3}}, {"step": 100, "5way1shot": fewshot["5way1shot"]}]
            result = {"steps": 100, "train_seconds": 10.0, "fewshot": fewshot, "curve": curve, "machine": "cpu"}
            result["random_init"] = {k: {"mean": 50.0, "ci95": 1.0} for k in ablate.SETTINGS}
            d.joinpath("result.json").write_text(json.dumps(result))
    doc.parent.mkdir()
    doc.write_text("old\n<!-- findings -->\nquery mixing: explained here\n<!-- /findings -->\nold tail\n")
    args = claims.parse_args(["--steps", "100", "--out", str(out), "--doc", str(doc), "--report-only"])
    text = claims.report(args, list(claims.ARMS), {"svm": "refused: a reason"}, out)
    assert "python benchmarks/claims.py --steps 100 --seeds 0 1 2 --episodes 2000 --curve 4 --out " in text
    assert "| MetaContrastive: meta-learning heads on par with contrastive | r2d2 vs contrastive | held | +0.3" in text
    d = [5.0, 5.5, 5.0]
    h = ablate.t_half_width(d)
    assert f"| contrastive + query mixing vs contrastive | held | +5.2 [{5.1667 - h:+.1f}, {5.1667 + h:+.1f}]" in text
    assert "protonet vs contrastive" not in text  # no runs, no row
    assert "- svm: skipped, refused: a reason" in text and "- protonet: 0 of 3 seeds so far" in text
    assert "<!-- findings -->\nquery mixing: explained here\n<!-- /findings -->" in text and "old tail" not in text
    assert (tmp_path / "docs" / "results_curves.png").stat().st_size > 1000
    assert doc.read_text() == text


def test_seeds_report_means_intervals_and_verdicts(tmp_path: Path) -> None:
    """benchmarks/seeds_report.py: per-seed rows, the mean with its Student-t interval, a verdict per setting
    against a reference (apart or overlapping intervals), the distance to a goal, and the curves figure."""
    import seeds_report

    runs = []
    for seed, acc in enumerate((90.0, 91.0, 92.0)):
        run = tmp_path / f"s{seed}"
        run.mkdir()
        fewshot = {s: {"mean": acc + i, "ci95": 0.3} for i, s in enumerate(seeds_report.SETTINGS)}
        curve = [{"step": k * 10, "seconds": k * 60.0, "5way1shot": {"mean": acc - 3 + k}} for k in range(4)]
        result = {"config": {"seed": seed}, "steps": 100 + seed, "train_seconds": 1800.2, "fewshot": fewshot}
        (run / "result.json").write_text(
            json.dumps({**result, "curve": curve, "machine": "cpu, 2 cores", "command": "python x"})
        )
        runs.append(str(run))
    fig = tmp_path / "curves.png"
    args = seeds_report.parse_args(
        [*runs, "--against", "85", "91", "95", "93", "--against-half", "1", "0.5", "0.5", "0.5"]
        + ["--against-name", "ref", "--goal", "96", "99", "90", "97", "--figure", str(fig)]
    )
    text = seeds_report.report([seeds_report.load(Path(r)) for r in runs], args)
    # means 91 / 92 / 93 / 94, each with the t interval of (-1, 0, +1): 4.303 / sqrt(3) = 2.48
    means = "**91.0 ± 2.5** | **92.0 ± 2.5** | **93.0 ± 2.5** | **94.0 ± 2.5**"
    assert f"| mean of 3 (95% t interval) | | | {means} |" in text
    assert "| against ref | | | +6.0 (above) | +1.0 (overlaps) | -2.0 (overlaps) | +1.0 (overlaps) |" in text
    assert "| to goal | | | -5.0 | -7.0 | +3.0 | -3.0 |" in text
    assert "| 1 | 101 | 1800 | 91.0 ± 0.3 |" in text and "cpu, 2 cores" in text
    seeds_report.plot([seeds_report.load(Path(r)) for r in runs], args)
    assert fig.stat().st_size > 10_000
    assert seeds_report.verdict(80.0, 1.0, 85.0, 1.0) == "below"
