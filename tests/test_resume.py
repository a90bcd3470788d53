"""Surviving failures: exact resume after SIGKILL, SIGTERM checkpoints, corrupt checkpoints, NaN guard.

Runs are tiny (16 images of 16x16 per step, a 2-block conv4). The killed and signalled runs are real
``python -m episodic.train`` subprocesses, started together by one module fixture (watcher threads
send the signals while this process trains the uninterrupted reference); resumed runs train in this
process. Everything uses one CPU thread so float results are bit-comparable across processes.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from episodic import checkpoint
from episodic.checkpoint import newest_valid, prune
from episodic.engine import Trainer
from episodic.errors import EpisodicError
from episodic.heads.base import HeadOutput
from helpers import ROOT, TINY, make_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = [
    *TINY,
    "head=r2d2",
    "batch_size=16",
    "backbone.params.width=8",
    "backbone.params.depth=2",
    "data.params.image_size=16",
    "data.augment.size=16",
    "train.log_every=1",
    "eval.knn_every=0",
    "eval.linear=false",
    "eval.baseline=false",
    "optim=adam",
]


TOTAL = 30  # the killed run is stopped right after its step-4 checkpoint, far from the end
KILL_STEPS = [f"train.steps={TOTAL}", "train.ckpt_every=2", "train.keep_last=3"]


def _start(run_dir: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out = open(run_dir.parent / f"{run_dir.name}.out", "w")  # noqa: SIM115 - the child process writes it
    cmd = [sys.executable, "-m", "episodic.train", *SMALL, *args, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, f"training exited ({proc.returncode}) before writing {path.name}"
        assert time.monotonic() - t0 < timeout, f"no {path.name} after {timeout} s"
        time.sleep(0.002)


def _losses(history: list[dict[str, Any]]) -> dict[int, float]:
    return {int(r["step"]): float(r["loss"]) for r in history}


def _signal_when(path: Path, proc: subprocess.Popen, signals: list[int], errors: list[BaseException]) -> None:
    try:
        _wait_for(path, proc)
        for sig in signals:
            proc.send_signal(sig)
    except BaseException as e:
        errors.append(e)


@pytest.fixture(scope="module")
def signalled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A run SIGKILLed after its step-4 checkpoint and one SIGTERMed after step 2, side by side."""
    tmp = tmp_path_factory.mktemp("signals")
    kill_run, term_run = tmp / "killed", tmp / "terminated"
    procs = [_start(kill_run, *KILL_STEPS), _start(term_run, "train.steps=1000", "train.ckpt_every=2")]
    errors: list[BaseException] = []
    # SIGSTOP first freezes the process at once, so it cannot finish before the SIGKILL lands
    kill_at = kill_run / "checkpoints" / "step_0000004.pt"
    term_at = term_run / "checkpoints" / "step_0000002.pt"
    watchers = [
        threading.Thread(target=_signal_when, args=(kill_at, procs[0], [signal.SIGSTOP, signal.SIGKILL], errors)),
        threading.Thread(target=_signal_when, args=(term_at, procs[1], [signal.SIGTERM], errors)),
    ]
    try:
        for w in watchers:
            w.start()
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        reference = Trainer(make_cfg(*SMALL, *KILL_STEPS), tmp / "reference")
        reference.fit()  # the uninterrupted run, trained while the subprocesses start
        torch.set_num_threads(n)
        for w in watchers:
            w.join()
        rcs = [p.wait(timeout=240) for p in procs]
        yield {
            "errors": errors,
            "kill_rc": rcs[0],
            "term_rc": rcs[1],
            "kill_run": kill_run,
            "term_run": term_run,
            "reference": reference.history,
            "term_out": (tmp / "terminated.out").read_text(),
        }
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_sigkill_mid_run_then_resume_auto_matches_uninterrupted(signalled: dict[str, Any]) -> None:
    assert not signalled["errors"], signalled["errors"]
    run = signalled["kill_run"]
    assert signalled["kill_rc"] == -signal.SIGKILL
    assert not (run / "checkpoints" / "last.pt").exists()  # it really died mid-run
    resumed = Trainer(make_cfg(*SMALL, *KILL_STEPS, "resume=auto"), run)
    start = resumed.step
    assert 4 <= start < TOTAL and resumed.last_checkpoint == run / "checkpoints" / f"step_{start:07d}.pt"
    resumed.fit()
    ref, res = _losses(signalled["reference"]), _losses(resumed.history)
    assert sorted(res) == list(range(1, TOTAL + 1))  # the killed run's history came back with the checkpoint
    assert abs(res[TOTAL] - ref[TOTAL]) <= 1e-6, (res[TOTAL], ref[TOTAL])
    assert max(abs(res[s] - ref[s]) for s in ref) <= 1e-6
    # the killed run may have left a half-written step_N.pt.tmp: never taken, and pruned at the next save
    assert not list((run / "checkpoints").glob("*.tmp"))


def test_sigterm_checkpoints_that_step_and_exits_cleanly(signalled: dict[str, Any]) -> None:
    assert not signalled["errors"], signalled["errors"]
    run, out = signalled["term_run"], signalled["term_out"]
    assert signalled["term_rc"] == 0 and "Traceback" not in out, out
    m = re.search(r"stopped by SIGTERM after step (\d+) of 1000; checkpoint (\S+);", out)
    assert m, out
    step = int(m.group(1))
    path = run / "checkpoints" / f"step_{step:07d}.pt"
    assert Path(m.group(2)) == path and 3 <= step < 1000
    state = checkpoint.load(path)
    assert state["step"] == step and state["data_order"]["step"] == step and len(state["rng"]) == 1
    assert not (run / "checkpoints" / "last.pt").exists() and not (run / "results.json").exists()


def test_corrupt_newest_checkpoint_is_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    steps = ["train.steps=4", "train.ckpt_every=1", "train.keep_last=2"]
    first = Trainer(make_cfg(*SMALL, *steps), tmp_path)
    first.fit()
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.pt", "step_0000003.pt", "step_0000004.pt"]
    for name in ("last.pt", "step_0000004.pt"):  # the two newest: truncated, as by a full disk
        data = (ckpts / name).read_bytes()
        (ckpts / name).write_bytes(data[: len(data) // 3])
    with caplog.at_level(logging.WARNING, logger="episodic.engine"):
        again = Trainer(make_cfg(*SMALL, *steps, "resume=auto"), tmp_path)
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert len(skipped) == 2 and "last.pt" in skipped[0] and "step_0000004.pt" in skipped[1]
    assert "corrupt or truncated" in skipped[0]
    assert again.step == 3 and again.last_checkpoint == ckpts / "step_0000003.pt"
    again.fit()
    assert abs(_losses(again.history)[4] - _losses(first.history)[4]) <= 1e-6
    # a checkpoint named explicitly must load: no silent fallback
    data = (ckpts / "step_0000003.pt").read_bytes()
    (tmp_path / "bad.pt").write_bytes(data[:100])
    with pytest.raises(EpisodicError, match="bad.pt' is corrupt or truncated"):
        Trainer(make_cfg(*SMALL, *steps, f"resume={tmp_path / 'bad.pt'}"), tmp_path / "other")


def _inject_nan(trainer: Trainer, at_call: int) -> None:
    """Make the head's loss NaN on its ``at_call``-th forward (1-based)."""
    head, real, calls = trainer.model.head, trainer.model.head.forward, [0]

    def forward(episode: Any) -> HeadOutput:
        calls[0] += 1
        out = real(episode)
        return HeadOutput(out.loss * float("nan"), out.logits) if calls[0] == at_call else out

    head.forward = forward  # type: ignore[method-assign]


def test_nan_loss_stops_naming_step_head_and_last_good_checkpoint(tmp_path: Path) -> None:
    trainer = Trainer(make_cfg(*SMALL, "train.steps=6", "train.ckpt_every=2"), tmp_path)
    _inject_nan(trainer, at_call=5)
    with pytest.raises(EpisodicError) as err:
        trainer.fit()
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("non-finite loss or gradient (loss nan) at step 5 (head=r2d2); last good checkpoint: ")
    assert str(tmp_path / "checkpoints" / "step_0000004.pt") in msg and "train.skip_nonfinite=true" in msg
    assert trainer.step == 5 and trainer.last_checkpoint == tmp_path / "checkpoints" / "step_0000004.pt"
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())  # the flagged update was not applied
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored after the error


def test_skip_nonfinite_skips_exactly_that_update(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    trainer = Trainer(make_cfg(*SMALL, "train.steps=4", "train.skip_nonfinite=true"), tmp_path)
    _inject_nan(trainer, at_call=3)
    params: list[torch.Tensor] = []
    real_step = trainer.train_step

    def step(images: torch.Tensor) -> Any:  # snapshot the parameters around every step
        params.append(torch.cat([p.detach().flatten().clone() for p in trainer.model.parameters()]))
        return real_step(images)

    trainer.train_step = step  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="episodic.guard"):
        trainer.fit()
    params.append(torch.cat([p.detach().flatten() for p in trainer.model.parameters()]))
    assert trainer.step == 4 and trainer.guard.skipped == 1
    assert torch.equal(params[2], params[3])  # step 3 changed nothing
    assert not torch.equal(params[1], params[2]) and not torch.equal(params[3], params[4])
    losses = _losses(trainer.history)
    assert torch.isnan(torch.tensor(losses[3])) and all(losses[s] == losses[s] for s in (1, 2, 4))
    warned = [r.getMessage() for r in caplog.records]
    assert any("non-finite loss or gradient at step 3 (head=r2d2): update skipped" in m for m in warned)
    assert [r["skipped"] for r in trainer.history] == [0, 0, 1, 0]
    assert all(torch.isfinite(b).all() for b in trainer.model.buffers() if b.is_floating_point())


def test_resume_refuses_another_data_order_and_missing_paths(tmp_path: Path) -> None:
    Trainer(make_cfg(*SMALL, "train.steps=1"), tmp_path).fit()
    with pytest.raises(EpisodicError, match="written with batch_size=16, this run has 32"):
        Trainer(make_cfg(*SMALL, "train.steps=1", "batch_size=32", "resume=auto"), tmp_path)
    with pytest.raises(EpisodicError, match="resume='/nonexistent/x.pt': no such file or directory"):
        Trainer(make_cfg(*SMALL, "resume=/nonexistent/x.pt"), tmp_path / "b")
    fresh = Trainer(make_cfg(*SMALL, "resume=auto"), tmp_path / "empty")  # nothing to resume: step 0
    assert fresh.step == 0 and fresh.last_checkpoint is None


def test_auto_takes_the_highest_step_last_pt_included(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    for step in (2, 4):
        checkpoint.save({"step": step, "model": {}}, folder / f"step_{step:07d}.pt")
    checkpoint.save({"step": 3, "model": {}}, folder / "last.pt")  # a finished run, then extended
    assert newest_valid(tmp_path)[0].name == "step_0000004.pt"  # type: ignore[index]
    checkpoint.save({"step": 4, "model": {}}, folder / "last.pt")
    assert newest_valid(tmp_path)[0].name == "last.pt"  # type: ignore[index]
    (folder / "step_0000002.pt.tmp").write_bytes(b"half")
    prune(folder, keep_last=1)
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "step_0000004.pt"]


def test_resume_takes_this_runs_optimiser_settings_and_schedule(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    Trainer(make_cfg(*SMALL, "train.steps=2", "optim.optimizer.lr=0.1"), tmp_path).fit()
    with caplog.at_level(logging.WARNING, logger="episodic.engine"):
        t = Trainer(
            make_cfg(
                *SMALL, "train.steps=6", "optim.optimizer.lr=0.01", "optim.optimizer.weight_decay=0", "resume=auto"
            ),
            tmp_path,
        )
    line = next(r.getMessage() for r in caplog.records if "resumed with this run's settings" in r.getMessage())
    assert "optim.optimizer.lr 0.1 -> 0.01" in line and "train.steps 2 -> 6" in line
    assert "optim.optimizer.weight_decay 1e-06 -> 0.0" in line
    from episodic.optim import warmup_cosine

    group = t.optimizer.param_groups[0]
    assert group["initial_lr"] == 0.01 and group["weight_decay"] == 0.0
    assert group["lr"] == pytest.approx(0.01 * warmup_cosine(2, 6, int(t.cfg.optim.schedule.warmup_steps)))
    t.fit()
    assert t.history[-1]["lr"] == pytest.approx(0.01 * warmup_cosine(6, 6, int(t.cfg.optim.schedule.warmup_steps)))
