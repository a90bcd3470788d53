"""Test helpers: compose the real Hydra config with small overrides."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from episodic.cli import CONFIG_DIR
from episodic.config import register

if TYPE_CHECKING:
    from episodic.heads.base import Head, HeadOutput
    from episodic.methods import Method
    from episodic.tasks.episode import Episode

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "backbone.params.width=16",
    "backbone.projector.hidden_dim=32",
    "backbone.projector.out_dim=16",
    "batch_size=32",
    "train.steps=3",
    "train.progress=false",
    "eval.fewshot.episodes=20",
    "device=cpu",
    "eval.plots=false",
]  # end-of-run pictures (t-SNE) take seconds; tests/test_eval.py covers them


def make_cfg(*overrides: str, config: str = "train") -> DictConfig:
    register()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose(config, overrides=list(overrides))


def run_cli(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )


def pair(method: Method, episode: Episode, head: Head) -> HeadOutput:
    """A pairing's part of the model's step in one process: embed, score with the head, update its state."""
    from episodic.tasks.scope import ScopePlan

    embedded = method.embed(episode, head.transform_embeddings)
    out = method.score(embedded, head)
    method.update(embedded[0], ScopePlan.one_process())
    return out
