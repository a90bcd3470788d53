"""Adding a head, an episode sampler or a task augmentation is one file and nothing else: its config
(``head=<name>`` with its parameters and defaults, ``task.<name>.*``) is generated from its constructor.
Each test copies the package, writes only that file into the copy, and trains two steps through the real
config and trainer, in one process and in two gloo processes (torchrun), with every variant the new
head's declared capabilities allow."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, TINY

pytestmark = pytest.mark.slow

# the test's driver (not part of an extension): trains each override list for two steps, one process
# or every torchrun rank, and writes the logged losses
DRIVER = """
import json, sys
from pathlib import Path
from episodic import distributed
from episodic.cli import CONFIG_DIR, compose_config
from episodic.engine import Trainer
import torch

torch.set_num_threads(1)
out, runs = Path(sys.argv[1]), json.loads(sys.argv[2])
info = distributed.init_from_env(torch.device("cpu"))
losses = {}
for i, overrides in enumerate(runs):
    cfg = compose_config("train", overrides)
    trainer = Trainer(cfg, out / str(i))
    trainer.fit()
    losses[i] = [r["loss"] for r in trainer.history]
if info.is_main:
    (out / "result.json").write_text(json.dumps({"config_dir": str(CONFIG_DIR), "losses": losses}))
distributed.cleanup()
"""

HEAD = '''"""``nearest``: each query scored against every support example by cosine / tau; a test's new head."""

import torch
from torch import Tensor

from episodic.heads.base import (HEADS, Geometry, HeadOutput, KernelHead, LogitScale, Pairs, expand_memory,
                                 full_precision, one_hot, pad_columns, query_targets)
from episodic.tasks.episode import Episode


@HEADS.register("nearest")
class NearestHead(KernelHead):
    def __init__(self, temperature: float = 0.5) -> None:
        super().__init__()
        self.scale = LogitScale(1 / temperature)

    def base_kernel(self, geo: Geometry) -> Tensor:
        return self.scale(geo.dot)

    def energy(self, geo: Geometry) -> Tensor:
        return self.scale(geo.sq_dist()) / 2

    def max_energy(self) -> float:
        return 2.0 * self.scale.value

    def scores(self, support: Tensor, support_labels: Tensor, query: Tensor, n_way: int) -> Tensor:
        sim = self.kernel(Geometry.of(self.l2(query), self.l2(support)))
        return (sim.exp() @ one_hot(support_labels, n_way, sim.dtype)).log()

    def forward(self, episode: Episode, memory: Tensor | None = None) -> HeadOutput:
        s, q = self.l2(full_precision(episode.support)), self.l2(full_precision(episode.query))
        soft = query_targets(episode, q.dtype)
        cand = one_hot(episode.support_labels, episode.n_way, q.dtype)
        targets = (soft / cand.sum(1, keepdim=True)) @ cand.transpose(1, 2)  # mass spread over the class's rows
        mem = self.l2(expand_memory(memory, s)) if memory is not None else None
        k = 0 if mem is None else mem.shape[1]
        cols = s if mem is None else torch.cat([s, mem], 1)
        pairs = Pairs(anchors=q, cands=cols, targets=pad_columns(targets, k), valid=None, anchor_soft=soft,
                      support=s, support_labels=episode.support_labels, n_way=episode.n_way)
        loss, extras, _, _ = self.pair_loss(pairs)
        return HeadOutput(loss=loss, logits=self.scores(s, episode.support_labels, q, episode.n_way), extras=extras)
'''

SAMPLER = '''"""``groups``: every ``group`` consecutive images form one class (a test's new sampler)."""

import torch
from torch import Tensor, nn

from episodic.tasks.episode import Episode
from episodic.tasks.samplers.base import SAMPLERS, Sampler


@SAMPLERS.register("groups")
class GroupSampler(Sampler):
    def __init__(self, n_supp: int = 1, n_query: int = 1, n_way: int | None = None, group: int = 2) -> None:
        super().__init__(n_supp, n_query, n_way)
        self.group = group

    def forward(self, views: Tensor, method: nn.Module | None = None, scope: object = None) -> Episode:
        v, b = views.shape[:2]
        labels = torch.arange(b, device=views.device) // self.group
        ns = self.n_supp
        return Episode(support=views[:ns].flatten(0, 1).unsqueeze(0), query=views[ns:].flatten(0, 1).unsqueeze(0),
                       support_labels=labels.repeat(ns).unsqueeze(0), query_labels=labels.repeat(v - ns).unsqueeze(0),
                       n_way=b // self.group, n_supp=ns * self.group, n_query=(v - ns) * self.group)
'''

AUGMENT = '''"""``mirror``: every view of a chosen image flipped left-right: a new class (a test's augmentation)."""

from torch import Tensor

from episodic.tasks.augment import TASK_AUGMENTS, Draw, NewClassTransform


@TASK_AUGMENTS.register("mirror")
class Mirror(NewClassTransform):
    def sample(self, n: int, draw: Draw) -> dict[str, Tensor]:
        return {}

    def transform(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        return x.flip(-1)
'''


def copy_package(dst: Path) -> Path:
    """The package (its configs included), as a checkout has it, under ``dst``."""
    shutil.copytree(ROOT / "episodic", dst / "episodic", ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def train_both_ways(src: Path, runs: list[list[str]], tmp: Path) -> None:
    """Train every override list in one process, then under torchrun with two gloo processes."""
    (tmp / "driver.py").write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    common = [*TINY, "train.steps=2", "train.log_every=1", "eval.knn_every=0", "train.ckpt_every=0"]
    runs = [[*common, *r] for r in runs]
    for nproc in (1, 2):
        out = tmp / f"out{nproc}"
        launch = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        p = subprocess.run(
            [sys.executable, *launch, str(tmp / "driver.py"), str(out), json.dumps(runs)],
            cwd=src,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert p.returncode == 0, p.stderr[-3000:]
        res = json.loads((out / "result.json").read_text())
        assert res["config_dir"].startswith(str(src))  # the copy's package and configs, nothing else
        for i in range(len(runs)):
            losses = res["losses"][str(i)]
            assert len(losses) == 2 and all(math.isfinite(x) for x in losses), (runs[i], losses)


def test_a_new_head_is_one_file(tmp_path: Path) -> None:
    src = copy_package(tmp_path / "src")
    (src / "episodic" / "heads" / "nearest.py").write_text(HEAD)
    # the variants its declared capabilities allow (a kernel head: all of them), in the head's own process
    check = (
        "from episodic.heads.base import HEADS\nfrom episodic.heads.variants import VARIANTS\n"
        "h = HEADS.get('nearest')\nprint(' '.join(n for n in VARIANTS.names() "
        "if h.scoring in VARIANTS.get(n).applies_to))"
    )
    p = subprocess.run(
        [sys.executable, "-c", check],
        cwd=src,
        env={**os.environ, "PYTHONPATH": str(src)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    variants = p.stdout.split()
    assert variants == ["debiased", "feature_transform", "soft_neighbors", "t_kernel"], p.stderr
    extra = {"soft_neighbors": ["variant.soft_neighbors.bank_size=64"]}
    runs = [["head=nearest"]] + [["head=nearest", f"variant={v}", *extra.get(v, [])] for v in variants]
    train_both_ways(src, runs + [["head=nearest", "method=moco", "method.params.queue_size=64"]], tmp_path)


def test_a_new_sampler_is_one_file(tmp_path: Path) -> None:
    src = copy_package(tmp_path / "src")
    (src / "episodic" / "tasks" / "samplers" / "groups.py").write_text(SAMPLER)
    train_both_ways(
        src, [["sampler=groups", "head=protonet"], ["sampler=groups", "head=r2d2", "sampler.params.group=4"]], tmp_path
    )


def test_a_new_task_augmentation_is_one_file(tmp_path: Path) -> None:
    src = copy_package(tmp_path / "src")
    (src / "episodic" / "tasks" / "mirror.py").write_text(AUGMENT)
    train_both_ways(
        src,
        [
            ["task.augment=[mirror]", "task.mirror.p=0.5"],
            ["head=contrastive", "task.augment=[mirror,rotate]", "task.mirror.p=1.0"],
        ],
        tmp_path,
    )
