"""What a training step costs a GPU: host reads per step (zero for the closed-form heads, one for the SVM
head), and ``train.compile=true`` computing the eager step's losses.

Host reads are counted by :func:`episodic.profiling.profile_step` on one steady-state step (after the
warm-up steps that fill the label caches), through the real trainer: device augmentation, the model's
forward, backward, the guarded optimizer step, the schedule, the EMA. On the CPU nothing waits, but every
op counted here would stall a GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from episodic.profiling import bare_step_fn, profile_step
from golden import CASES, COMMON, MOCO
from helpers import make_cfg

CLOSED_FORM = [name for name in CASES if not name.startswith("svm")]
# the pseudo-labelling samplers (no recorded losses: tests/test_psco.py checks their values)
PSEUDO = {
    "contrastive+psco": ["head=contrastive", "head.params.symmetric=false", *MOCO, "sampler=psco"],
    "protonet+neighbors+query_mix": ["head=protonet", *MOCO, "sampler=neighbors", "task.augment=[query_mix]"],
}
STEPS = {**{name: CASES[name] for name in CLOSED_FORM}, **PSEUDO}
# not a log step (train.log_every reads the guard's rows), no checkpoint or histogram in the window
QUIET = [*COMMON, "train.steps=20", "train.log_every=10"]


def steady_step(overrides: list[str], run_dir: Path, warm: int = 2) -> tuple[object, object]:
    """A trainer after ``warm`` steps, and the profile of its next step on the next batch."""
    from episodic.engine import Trainer

    trainer = Trainer(make_cfg(*QUIET, *overrides), run_dir)
    batches = trainer.train_set.images[: 16 * (warm + 1)].split(16)
    for images in batches[:warm]:
        trainer.train_step(images)
        trainer.step += 1
    return trainer, profile_step(lambda: trainer.train_step(batches[warm]))


@pytest.mark.parametrize("case", list(STEPS))
def test_closed_form_step_never_reads_the_host(tmp_path: Path, case: str) -> None:
    """Every pairing, variant, task augmentation, sampler and scope of the contrastive, ProtoNet and R2D2
    heads."""
    _, prof = steady_step(STEPS[case], tmp_path)
    assert prof.n_ops > 50  # the counter saw the step
    assert dict(prof.syncs) == {}, case


@pytest.mark.parametrize("case", ["svm", "svm+debiased", "svm+rotate"])
def test_svm_step_reads_the_host_once(tmp_path: Path, case: str) -> None:
    """The fast QP solver reads its stopping test once per solve; the solve's iterations are reported."""
    trainer, prof = steady_step(CASES[case], tmp_path)
    solver = trainer.model.head.solver  # type: ignore[attr-defined]
    assert prof.n_syncs == 1, dict(prof.syncs)
    assert 0 < solver.last_iters <= solver.budget


@pytest.mark.parametrize(("head", "bound"), [("contrastive", 1.3), ("protonet", 1.3), ("r2d2", 1.3)])
def test_step_launches_few_operators_beyond_the_bare_step(tmp_path: Path, head: str, bound: float) -> None:
    """conv4 (the backbone with the fewest operators, so the strictest ratio), one-shot views, steady state:
    the trainer's operators per step against the bare step's (1.62 / 1.81 / 1.88x before the L2
    normalisation's own backward, the unit-sphere ProtoNet kernel, the guard's in-place flag and the
    fused ridge; R2D2 read 1.53x before the last)."""
    from episodic.engine import Trainer

    cfg = make_cfg(*QUIET, f"head={head}", "backbone=conv4", "channels_last=false")
    trainer = Trainer(cfg, tmp_path)
    views = torch.rand(2, 16, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        trainer.train_step(views)
    bare = bare_step_fn(trainer, views)
    bare()
    ops, bare_ops = profile_step(lambda: trainer.train_step(views)).n_ops, profile_step(bare).n_ops
    assert ops <= bound * bare_ops, (ops, bare_ops)


@pytest.mark.slow
@pytest.mark.parametrize("head", ["contrastive", "protonet", "r2d2", "svm"])
def test_compiled_step_computes_the_eager_losses(tmp_path: Path, head: str) -> None:
    """``train.compile=true`` from the same start on the same views: the first loss within 1e-5 of eager in
    float32, and every loss of four steps in float64 (a wrong graph would be off by far more).

    Several float32 steps are no test: the summation order of fused kernels differs in the last bits and
    training amplifies it (1e-4 by the fourth step, as two eager layouts do; tests/test_train.py)."""
    from torch._dynamo.utils import counters

    from episodic.data.augment import multi_view
    from episodic.engine import Trainer

    torch._dynamo.reset()
    counters.clear()
    losses: dict[tuple[str, torch.dtype], list[float]] = {}
    for dtype, steps in ((torch.float32, 1), (torch.float64, 4)):
        for flag in ("false", "true"):
            cfg = make_cfg(*COMMON, f"head={head}", f"train.compile={flag}", "channels_last=false")
            trainer = Trainer(cfg, tmp_path / f"{flag}{dtype}")
            trainer.model.to(dtype)
            gen = torch.Generator().manual_seed(0)
            batches = trainer.train_set.images[: 16 * steps].split(16)
            views = [multi_view(trainer.augment, images, 2, gen).to(dtype) for images in batches]
            start = [p.detach().clone() for p in trainer.model.parameters()]
            losses[flag, dtype] = [float(trainer.train_step(v).loss) for v in views]
            moved = max(float((p.detach() - q).abs().max()) for p, q in zip(trainer.model.parameters(), start))
            assert moved > 1e-4  # the steps trained: the comparison covers updates
    assert counters["inductor"]  # the compiled runs really ran inductor's graphs
    for dtype in (torch.float32, torch.float64):
        assert losses["true", dtype] == pytest.approx(losses["false", dtype], abs=1e-5, rel=0), dtype


def test_cpu_training_keeps_freed_memory() -> None:
    """After ``keep_freed_memory()`` a freed 32 MB buffer is reused, not mapped and page-faulted again:
    ten allocate-fill-free cycles fault a tenth of the pages they did before (about 8,000 a cycle)."""
    import subprocess
    import sys

    script = """
import resource, torch
from episodic.device import keep_freed_memory
def faults():
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.ones(8 * 2**20)  # 32 MB, freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
before = faults()
assert keep_freed_memory()
faults()  # the first cycle maps the heap once
print(before, faults())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    before, after = map(int, out.stdout.split())
    assert before > 40_000  # each cycle faults the buffer's 8,192 pages (the test sees the problem)
    assert after < before / 10
