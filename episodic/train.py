"""``python -m episodic.train [overrides]``: train an encoder episodically, then evaluate it.

Examples::

    python -m episodic.train head=r2d2 n_supp=1 n_query=1
    python -m episodic.train -m head=contrastive,protonet,r2d2 seed=0,1,2

The run directory (``runs/<date>/<time>_<head>`` by default) receives the resolved config,
TensorBoard logs (``tb/``), ``history.jsonl``, checkpoints and ``results.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from episodic.cli import CONFIG_DIR, run_or_fail, validate_overrides


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train per ``cfg``, evaluate trained vs random-init encoders, return the results dict."""
    from episodic.engine import Trainer, build_model
    from episodic.eval.quick import format_table, quick_eval

    trainer = Trainer(cfg, run_dir)
    trainer.fit()
    baseline = build_model(cfg).method.encoder.backbone.to(trainer.device)
    res = quick_eval(trainer.model.method.encoder.backbone, baseline, trainer.data, cfg, trainer.device,
                     Path(run_dir))
    print(format_table(res, f"{cfg.head.name} on {cfg.data.name}, {trainer.steps} steps -> {run_dir}"))
    return res


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    run_or_fail(lambda: train(cfg, HydraConfig.get().runtime.output_dir))


def main() -> None:
    validate_overrides("train", sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
