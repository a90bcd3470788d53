"""The fault catalogue: every fault of the robustness issue through the real entry points (forked from
this process, so each starts in milliseconds), each ending in one ``error:`` line with exit code 2, or in
the documented recovery.

Groups: diverging runs (the non-finite guard), stop signals, exports that could clobber inputs,
checkpoint housekeeping, I/O failures, data that lies, and lines that used to mislead.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from episodic import checkpoint
from helpers import ROOT, TINY, Ran, run_forked

pytestmark = pytest.mark.slow

QUIET = [
    "train.progress=false",
    "eval.knn_every=0",
    "eval.plots=false",
    "eval.fewshot.episodes=10",
    "eval.linear=false",
    "eval.baseline=false",
]
SMALL = [*TINY, *QUIET, "batch_size=16"]
CONV = ["backbone.params.depth=2"]  # unless a test names another backbone
DIGITS = ["data.params.image_size=16", "data.augment.size=16"]  # unless a test names other data


def train(run: Path, *args: str, **kw: Any) -> Ran:
    def names(group: str) -> bool:
        return any(a.startswith(group + "=") for a in args)

    extra = ([] if names("backbone") else CONV) + ([] if names("data") else DIGITS)
    return run_forked("episodic.train", *SMALL, *extra, *args, f"hydra.run.dir={run}", **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step run with numbered checkpoints (conv4 width 16, depth 2)."""
    run = tmp_path_factory.mktemp("faults") / "run"
    r = train(run, "train.steps=4", "train.ckpt_every=2", "train.keep_last=0")
    assert r.code == 0, r.err[-2000:]
    return run


# ------------------------------------------------------------------------------ the non-finite guard
@pytest.mark.parametrize("head", ["r2d2", "contrastive", "protonet", "svm"])
def test_divergence_stops_naming_a_finite_checkpoint_and_resuming_lower_uses_the_lower_lr(
    tmp_path: Path, head: str
) -> None:
    run = tmp_path / head
    r = train(
        run, f"head={head}", "optim.optimizer.lr=1e10", "train.steps=40", "train.ckpt_every=1", "train.log_every=1"
    )
    line = r.one_error()
    assert re.search(rf"non-finite .* step \d+ \(head={head}\); last good checkpoint: ", line), line
    named = line.split("last good checkpoint: ")[1].split(";")[0]
    if named == "none written yet":
        return
    state = checkpoint.load(named)  # loads, and every tensor in it is finite
    assert checkpoint.nonfinite({"model": state["model"], "optimizer": state["optimizer"]}) == []
    # the advice works: resuming it with a lower lr trains with the lower lr (it may still have to go back
    # further if the named state had already drifted far: finiteness is what the guard can promise)
    again = train(
        run,
        f"head={head}",
        "optim.optimizer.lr=0.01",
        "train.steps=40",
        "train.ckpt_every=0",
        f"resume={named}",
        "train.log_every=1",
    )
    assert "resumed with this run's settings, not the checkpoint's: optim.optimizer.lr 10000000000.0 -> 0.01" in (
        again.err + again.out
    ), again.err[-2000:]


def test_consecutive_skips_beyond_max_skips_stop_the_run(tmp_path: Path) -> None:
    r = train(
        tmp_path / "skip",
        "head=contrastive",
        "optim.optimizer.lr=1e10",
        "train.steps=30",
        "train.skip_nonfinite=true",
        "train.max_skips=3",
    )
    line = r.one_error()
    assert re.search(r"4 non-finite steps in a row up to step \d+ \(head=contrastive; train.max_skips=3\)", line), line


def test_a_huge_logit_scale_is_refused_not_reported_as_divergence(tmp_path: Path) -> None:
    assert "head.params.scale=-1.0 is not allowed" in train(tmp_path / "s", "head.params.scale=-1").one_error()


# ------------------------------------------------------------------------------ stop signals with workers
def test_sigterm_to_the_process_group_with_a_loader_worker_stops_cleanly_and_resumes_exactly(tmp_path: Path) -> None:
    args = [
        *SMALL,
        *CONV,
        *DIGITS,
        "loader.augment=worker",
        "loader.workers=1",
        "train.ckpt_every=0",
        "train.log_every=1",
        "optim.schedule.schedule=constant",
    ]  # so that a shorter run has the same learning rates
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "term"
    proc = subprocess.Popen(
        [sys.executable, "-m", "episodic.train", *args, "train.steps=100000", f"hydra.run.dir={run}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and sum(f.stat().st_size for f in run.glob("tb/*")) < 2000:
        time.sleep(0.05)  # until a few steps have been logged
    os.killpg(proc.pid, signal.SIGTERM)  # the trainer and its loader worker, as SLURM does
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err, err[-2000:]
    m = re.search(r"stopped by SIGTERM after step (\d+) of 100000; checkpoint (\S+);", out)
    assert m, out + err
    step = int(m.group(1))
    assert checkpoint.load(m.group(2))["step"] == step
    # resume=auto continues exactly: the same last loss as an uninterrupted run of the same length
    total = step + 3
    resumed = run_forked("episodic.train", *args, f"train.steps={total}", "resume=auto", f"hydra.run.dir={run}")
    straight = run_forked("episodic.train", *args, f"train.steps={total}", f"hydra.run.dir={tmp_path / 'straight'}")
    assert resumed.code == 0 and straight.code == 0, resumed.err[-1000:] + straight.err[-1000:]
    a = checkpoint.load(run / "checkpoints" / "last.pt")["history"][-1]["loss"]
    b = checkpoint.load(tmp_path / "straight" / "checkpoints" / "last.pt")["history"][-1]["loss"]
    assert a == b


def test_sigterm_to_the_launcher_group_with_two_processes_and_loader_workers_is_a_clean_stop(tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "episodic.launch",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "episodic.train",
        *SMALL,
        *CONV,
        *DIGITS,
        "loader.augment=worker",
        "loader.workers=1",
        "train.ckpt_every=0",
        "train.log_every=1",
        "train.steps=100000",
        f"hydra.run.dir={run}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and sum(f.stat().st_size for f in run.glob("tb/*")) < 2000:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # the agent, both trainers and their loader workers
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    m = re.search(r"stopped by SIGTERM after step (\d+) of 100000; checkpoint (\S+);", out)
    assert m and f"stopped by SIGTERM: stop checkpoint {m.group(2)}" in out, out + err[-3000:]
    state = checkpoint.load(m.group(2))
    assert state["step"] == int(m.group(1)) >= 1 and state["world_size"] == 2


# ------------------------------------------------------------------------------ exports never clobber inputs
EXPORT_REFUSALS = [
    (["out={ckpt}"], "is the input itself"),
    (["out={other}", "overwrite=true"], "is a training checkpoint; export never replaces one"),
    (["out={exists}"], "exists; choose another file, or overwrite=true"),
    (["out={folder}"], "is a folder; give a file path"),
]


@pytest.mark.parametrize("args, message", EXPORT_REFUSALS, ids=[a[0] for a, _ in EXPORT_REFUSALS])
def test_export_never_clobbers_an_input(trained: Path, tmp_path: Path, args: list[str], message: str) -> None:
    ckpt = trained / "checkpoints" / "last.pt"
    names = {
        "ckpt": ckpt,
        "other": trained / "checkpoints" / "step_0000002.pt",
        "exists": tmp_path / "e.pt",
        "folder": tmp_path,
    }
    (tmp_path / "e.pt").write_bytes(b"x")
    before = {p: p.read_bytes() for p in (trained / "checkpoints").iterdir()}
    assert (
        message in run_forked("episodic.export", f"checkpoint={ckpt}", *(a.format(**names) for a in args)).one_error()
    )
    assert {p: p.read_bytes() for p in (trained / "checkpoints").iterdir()} == before
    assert (tmp_path / "e.pt").read_bytes() == b"x" and not list(tmp_path.glob("*.tmp"))


def test_export_overwrites_an_existing_file_only_when_asked(trained: Path, tmp_path: Path) -> None:
    (tmp_path / "e.pt").write_bytes(b"x")
    ran = run_forked(
        "episodic.export",
        f"checkpoint={trained / 'checkpoints' / 'last.pt'}",
        f"out={tmp_path / 'e.pt'}",
        "overwrite=true",
    )
    assert ran.code == 0 and torch.load(tmp_path / "e.pt", weights_only=True), ran.err[-2000:]


# ------------------------------------------------------------------------------ checkpoint housekeeping
def test_resume_auto_skips_a_truncated_newest_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert train(run, "train.steps=4", "train.ckpt_every=1", "train.keep_last=2").code == 0
    ckpts = run / "checkpoints"
    for name in ("last.pt", "step_0000004.pt"):  # a kill while the newest were written, on a file system
        data = (ckpts / name).read_bytes()  # that does not make renames atomic
        (ckpts / name).write_bytes(data[: len(data) // 3])
    r = train(run, "train.steps=6", "train.ckpt_every=1", "train.keep_last=2", "resume=auto")
    assert r.code == 0, r.err[-2000:]
    assert re.search(r"resumed from \S+step_0000003.pt at step 3", r.out + r.err), r.err[-2000:]
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.pt", "step_0000005.pt", "step_0000006.pt"]
    assert checkpoint.load(ckpts / "last.pt")["step"] == 6


def test_pruning_leaves_a_damaged_checkpoint_and_keeps_the_newest_intact_ones(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        torch.save({"step": step}, tmp_path / f"step_{step:07d}.pt")
    (tmp_path / "step_0000004.pt").write_bytes((tmp_path / "step_0000003.pt").read_bytes()[:50])
    (tmp_path / "step_0000005.pt.tmp").write_bytes(b"half")
    checkpoint.prune(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000002.pt", "step_0000003.pt", "step_0000004.pt"]


def test_an_explicit_resume_that_finds_nothing_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert "no valid checkpoint in that folder" in train(tmp_path / "r", f"resume={tmp_path / 'empty'}").one_error()


RESUME_REFUSALS = [
    (["train.steps=3"], "is at step 4 but train.steps=3; set train.steps >= 4"),
    (["backbone=resnet_tiny"], "was trained with backbone.name=conv4 but this run has backbone.name=resnet_tiny"),
    (
        ["backbone.params.width=8"],
        "was trained with backbone.params={'width': 16, 'depth': 2} but this run has "
        "backbone.params={'width': 8, 'depth': 2}",
    ),
    (["backbone.projector.out_dim=8"], "but this run has backbone.projector={'hidden_dim': 32, 'out_dim': 8,"),
    (["head=contrastive"], "was trained with head.name=r2d2 but this run has head.name=contrastive"),
    (["method=moco"], "was trained with method.name=simclr but this run has method.name=moco"),
]


@pytest.mark.parametrize("args, message", RESUME_REFUSALS, ids=[a[0] for a, _ in RESUME_REFUSALS])
def test_resuming_another_structure_or_fewer_steps_is_refused(
    trained: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    steps = [] if any(a.startswith("train.steps") for a in args) else ["train.steps=8"]
    line = train(tmp_path / "run", *steps, *args, f"resume={trained}").one_error()
    assert message in line and ("resume=null" in line or "set train.steps" in line), line


# ------------------------------------------------------------------------------ I/O faults
def test_run_folders_that_cannot_be_written_are_one_line_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    assert "'" + str(tmp_path / "afile") + "' is a file, not a folder" in train(tmp_path / "afile" / "run").one_error()
    blocked = "/sys/episodic-test" if os.geteuid() == 0 else "/proc/episodic-test"
    assert "cannot be written" in train(Path(blocked) / "run").one_error()
    run = tmp_path / "ckfile"
    run.mkdir()
    (run / "checkpoints").write_text("x")
    assert "checkpoints folder=" in train(run).one_error()


def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_newest_checkpoint_stays(tmp_path: Path) -> None:
    run = tmp_path / "full"
    assert train(run, "train.steps=2", "train.ckpt_every=1").code == 0
    os.symlink("/dev/full", run / "checkpoints" / "step_0000003.pt.tmp")  # the write of step 3 hits a full disk
    line = train(run, "train.steps=4", "train.ckpt_every=1", "resume=auto").one_error()
    assert "cannot write checkpoint" in line and "no space left on device (ENOSPC)" in line
    assert checkpoint.load(run / "checkpoints" / "step_0000002.pt")["step"] == 2
    assert not (run / "checkpoints" / "step_0000003.pt").exists()
    assert not (run / "checkpoints" / "step_0000003.pt.tmp").exists()


def test_a_file_size_limit_at_a_checkpoint_is_one_line(tmp_path: Path) -> None:
    def limit() -> None:  # smaller than a checkpoint, larger than the logs
        resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, resource.RLIM_INFINITY))

    line = train(tmp_path / "big", "train.steps=2", "train.ckpt_every=1", before=limit).one_error()
    assert "file too large (EFBIG)" in line
    assert not list((tmp_path / "big" / "checkpoints").iterdir())


def test_unwritable_eval_results_and_export_out_are_one_line_before_any_work(trained: Path) -> None:
    ckpt = trained / "checkpoints" / "last.pt"
    blocked = "/sys/episodic-test/r.json" if os.geteuid() == 0 else "/proc/episodic-test/r.json"
    line = run_forked("episodic.eval", "eval=knn", f"checkpoint={ckpt}", f"results={blocked}").one_error()
    assert f"results={blocked} cannot be written" in line
    line = run_forked("episodic.export", f"checkpoint={ckpt}", f"out={blocked}").one_error()
    assert f"out={blocked} cannot be written" in line


# ------------------------------------------------------------------------------ data that lies
def npz(folder: Path, name: str, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> str:
    np.savez(folder / name, images=images, labels=labels, classes=np.array(classes))
    return name


def npz_args(folder: Path, train_file: str, test_file: str = "test.npz") -> list[str]:
    return [
        "data=cifar10_npz",
        f"data.params.root={folder}",
        f"data.params.train={train_file}",
        f"data.params.test={test_file}",
        "data.channels=3",
    ]


@pytest.fixture
def rgb(tmp_path: Path) -> Path:
    g = np.random.default_rng(0)
    npz(tmp_path, "train.npz", g.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8), np.arange(64) % 4, list("abcd"))
    npz(tmp_path, "test.npz", g.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8), np.arange(16) % 4, list("abcd"))
    return tmp_path


def test_a_truncated_npz_is_one_line(rgb: Path) -> None:
    data = (rgb / "train.npz").read_bytes()
    (rgb / "cut.npz").write_bytes(data[: len(data) // 2])
    assert "cannot read npz file" in train(rgb / "run", *npz_args(rgb, "cut.npz")).one_error()


def test_images_and_labels_of_different_lengths_are_one_line(rgb: Path) -> None:
    npz(rgb, "short.npz", np.zeros((8, 16, 16, 3), np.uint8), np.arange(5), list("abcd"))
    assert "8 images but 5 labels" in train(rgb / "run", *npz_args(rgb, "short.npz")).one_error()


def test_labels_outside_the_class_list_are_one_line(rgb: Path) -> None:
    npz(rgb, "labels.npz", np.zeros((8, 16, 16, 3), np.uint8), np.arange(8), list("abcd"))
    assert "label 4 is outside the 4 classes" in train(rgb / "run", *npz_args(rgb, "labels.npz")).one_error()


def test_images_too_small_for_the_backbone_are_one_line_before_training(rgb: Path) -> None:
    npz(rgb, "tiny.npz", np.zeros((64, 4, 4, 3), np.uint8), np.arange(64) % 4, list("abcd"))
    npz(rgb, "tinytest.npz", np.zeros((8, 4, 4, 3), np.uint8), np.arange(8) % 4, list("abcd"))
    line = train(rgb / "run", *npz_args(rgb, "tiny.npz", "tinytest.npz"), "backbone.params.depth=4").one_error()
    assert "cannot embed the 3x4x4 train images" in line


def test_a_channel_count_that_does_not_match_the_images_is_one_line(rgb: Path) -> None:
    line = train(rgb / "run", *npz_args(rgb, "train.npz"), "data.channels=1").one_error()
    assert "holds 3-channel images but data.channels=1; set data.channels=3" in line


def test_an_image_folder_with_a_corrupt_image_or_no_class_folders_is_one_line(tmp_path: Path) -> None:
    from PIL import Image

    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "imgs" / split / c / f"{i}.png")
    bad = tmp_path / "imgs" / "train" / "a" / "0.png"
    bad.write_bytes(b"not a png")
    args = ["data=imagefolder", f"data.params.root={tmp_path / 'imgs'}", "data.params.image_size=16"]
    assert f"cannot decode image '{bad}'" in train(tmp_path / "r1", *args).one_error()
    (tmp_path / "flat" / "train").mkdir(parents=True)
    (tmp_path / "flat" / "test").mkdir(parents=True)
    args = ["data=imagefolder", f"data.params.root={tmp_path / 'flat'}", "data.params.image_size=16"]
    assert "holds no images in class folders" in train(tmp_path / "r2", *args).one_error()


def test_an_offline_download_is_one_line_saying_where_the_files_go(tmp_path: Path) -> None:
    env = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}  # nothing listens there
    args = ["data=cifar10", f"data.params.root={tmp_path / 'nowhere'}", "data.params.download=true"]
    line = train(tmp_path / "run", *args, env=env).one_error()
    assert "data.params.download=true could not fetch CIFAR10 into" in line and "data.params.root" in line


def test_a_missing_data_folder_names_the_real_key(tmp_path: Path) -> None:
    line = train(tmp_path / "run", "data=cifar10", f"data.params.root={tmp_path / 'none'}").one_error()
    assert "set data.params.root to the folder that holds it" in line


# ------------------------------------------------------------------------------ lines that used to mislead
MISLEADING = [
    (["batch_size=-4"], "batch_size=-4 is not allowed"),
    (["train.keep_last=-1"], "train.keep_last=-1 is not allowed"),
    (["+train.stpes=5"], "unknown key train.stpes (did you mean train.steps?)"),
    (["device=tpu"], "device='tpu' is not allowed"),
    (["batch_size=1"], "batch_size=1 is not allowed"),
    (["optim.optimizer.lr=nan"], "optim.optimizer.lr=nan is not allowed"),
    (["eval.fewshot.ways=20"], "eval.fewshot (end of run): 20-way episodes need 20 classes but the few-shot set has 5"),
    (["eval.fewshot.shots=[100]"], "100-shot episodes with 15 queries need 115 images per class"),
]


@pytest.mark.parametrize("args, message", MISLEADING, ids=[a[0] for a, _ in MISLEADING])
def test_config_faults_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    assert message in train(tmp_path / "run", *args).one_error()
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("events.*"))  # before any training


EVAL_LINES = [
    (["eval=knn", "checkpoint={empty}"], "is a folder with no valid checkpoint"),
    (["eval=semi", "checkpoint={ckpt}", "eval.fractions=[1.5]"], "eval.fractions=[1.5] is not allowed"),
    (["eval=knn", "checkpoint={ckpt}", "eval.k=[100000]"], "eval.k=100000 is larger than the"),
]


@pytest.mark.parametrize("args, message", EVAL_LINES, ids=[a[-1] for a, _ in EVAL_LINES])
def test_eval_lines_that_used_to_mislead(trained: Path, tmp_path: Path, args: list[str], message: str) -> None:
    names = {"ckpt": trained / "checkpoints" / "last.pt", "empty": tmp_path}
    assert message in run_forked("episodic.eval", *(a.format(**names) for a in args)).one_error()


@pytest.mark.parametrize(
    "args",
    [["eval=knn", "eval.k=[5]"], ["eval=linear", "eval.optimizer=sgd", "eval.steps=20"]],
    ids=["run-folder", "sgd-probe"],
)
def test_eval_of_a_run_folder_and_the_documented_sgd_probe_run(trained: Path, args: list[str]) -> None:
    ran = run_forked("episodic.eval", f"checkpoint={trained}", *args, "eval.baseline=false")
    assert ran.code == 0, ran.err[-2000:]
