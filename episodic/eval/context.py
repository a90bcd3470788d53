"""What a protocol of ``python -m episodic.eval`` works on: encoders, data, device, run directory.

:func:`build_context` reads the checkpoint (trained backbone + its random-init twin), picks the
dataset (``data=...`` on the command line, else the checkpoint's own data config), checks that the
images fit the backbone (channel count) and decides where results and the feature cache go
(``<run dir>/results.json`` and ``<run dir>/eval_cache/``; the run directory is the folder above
``checkpoints/``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from episodic.config import as_dict
from episodic.data.datasets import ArrayDataset, Splits, build_dataset
from episodic.errors import EpisodicError, check
from episodic.eval.features import Encoders, checkpoint_path, get_split, load_encoders
from episodic.files import writable_file


@dataclass
class EvalContext:
    """Everything a protocol needs; ``backbones(baseline)`` lists ``(name, module)`` to evaluate."""

    encoders: Encoders
    data: Splits
    data_cfg: DictConfig
    data_key: str
    device: torch.device
    results_path: Path
    cache_dir: Path | None

    @property
    def run_dir(self) -> Path:
        return self.results_path.parent

    @property
    def norm(self) -> dict[str, Any]:
        aug = self.data_cfg.get("augment") or {}
        return {"mean": aug.get("mean"), "std": aug.get("std")}

    def split(self, name: str) -> ArrayDataset:
        return get_split(self.data, name, str(self.data_cfg.name))

    def backbones(self, baseline: bool = True) -> list[tuple[str, nn.Module]]:
        out = [("trained", self.encoders.trained)]
        return out + [("random_init", self.encoders.random_init)] if baseline else out


def results_path(cfg: DictConfig) -> Path:
    """Where the results go (``results=``, else the checkpoint's run folder), checked writable before any
    work; never the checkpoint itself."""
    check(
        not OmegaConf.is_missing(cfg, "checkpoint") and bool(cfg.checkpoint),
        "checkpoint=PATH is required: the .pt file of a run (e.g. runs/<date>/<time>_r2d2/checkpoints/last.pt)",
    )
    ckpt = checkpoint_path(str(cfg.checkpoint))
    if not ckpt.is_file():
        raise EpisodicError(f"checkpoint={ckpt} does not exist; give a .pt file a run wrote, or its run folder")
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    target = Path(str(cfg.results)) if cfg.get("results") else run_dir / "results.json"
    return writable_file(target, "results", overwrite=True, inputs=(ckpt,))


def build_context(cfg: DictConfig, data_choice: str | None = None) -> EvalContext:
    """Load checkpoint and data per the ``evaluate`` config (see the module docstring)."""
    from episodic.device import resolve_device

    results = results_path(cfg)
    device = resolve_device(str(cfg.get("device", "auto")))
    enc = load_encoders(cfg.checkpoint, device, cfg.get("backbone"))
    own = enc.config.data
    data_cfg = cfg.data if cfg.get("data") is not None else own
    check(
        int(data_cfg.channels) == int(own.channels),
        f"data {data_cfg.name!r} has {data_cfg.channels}-channel images but checkpoint '{cfg.checkpoint}' "
        f"was trained on {own.channels}-channel images ({own.name}); pick data with {own.channels} channels",
    )
    params = as_dict(data_cfg.get("params"))
    data = build_dataset(str(data_cfg.name), **params)
    cache = results.parent / "eval_cache" if cfg.eval.get("cache", True) else None
    key = data_choice if data_choice else str(data_cfg.name)
    return EvalContext(enc, data, data_cfg, key, device, results, cache)
