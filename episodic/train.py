"""``python -m episodic.train [overrides]``: train an encoder episodically, then evaluate it.

Examples::

    python -m episodic.train head=r2d2 n_supp=1 n_query=1
    python -m episodic.train -m head=contrastive,protonet,r2d2 seed=0,1,2
    torchrun --standalone --nproc_per_node=4 -m episodic.train hydra.run.dir=runs/r2d2_4gpu
    python -m episodic.train resume=auto hydra.run.dir=runs/r2d2_4gpu   # continue a stopped run

The run directory (``runs/<date>/<time>_<head>`` by default) receives the resolved config,
TensorBoard logs (``tb/``), ``history.jsonl``, checkpoints and ``results.json``. Under several
processes rank 0 owns it: its path is broadcast, the other ranks write no Hydra files or logs, and
only rank 0 runs the end-of-run evaluation (docs/distributed.md).
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from episodic.cli import CONFIG_DIR, run_or_fail, validate_overrides
from episodic.config import register
from episodic.files import writable_dir


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train per ``cfg``, evaluate trained vs random-init encoders, return the results dict."""
    from episodic import distributed
    from episodic.config import validate
    from episodic.device import resolve_device
    from episodic.engine import Trainer, check_config
    from episodic.eval.knn import KNNMonitor
    from episodic.eval.online import OnlineProbe
    from episodic.eval.quick import check_quick_eval, format_table, quick_eval
    from episodic.model import build_model

    validate(cfg)  # again here: a sweep's jobs are composed by Hydra, not by validate_overrides
    check_config(cfg)
    info = distributed.init_from_env(resolve_device(cfg.device))
    try:
        run_dir = Path(distributed.broadcast_object(str(run_dir)))  # rank 0's directory on every rank
        trainer = Trainer(cfg, run_dir)
        check_quick_eval(trainer.data, cfg)
        ev, aug = cfg.eval, cfg.data.augment
        knn = KNNMonitor(
            int(ev.knn_every),
            str(ev.knn_unit),
            int(ev.knn_k),
            float(ev.knn_t),
            len(trainer.train_set) // int(cfg.batch_size),
            run_dir / "knn.jsonl",
            trainer.step,
            info.is_main,
            aug.mean,
            aug.std,
        )
        monitors: list[Any] = [knn]
        if ev.online_probe:
            probe = OnlineProbe(
                trainer.data.train,
                trainer.data.test,
                int(cfg.batch_size),
                float(ev.online_probe_lr),
                int(cfg.seed),
                int(cfg.train.log_every),
                info.is_main,
                aug.mean,
                aug.std,
            )
            monitors.append(probe)
        trainer.fit(monitors)
        if trainer.stop_requested is not None:
            if info.is_main:
                print(
                    f"stopped by {trainer.stop_requested} after step {trainer.step} of {trainer.steps}; "
                    f"checkpoint {trainer.last_checkpoint}; continue with: resume=auto "
                    f"hydra.run.dir={run_dir}"
                )
            return {"stopped": trainer.stop_requested, "step": trainer.step, "checkpoint": str(trainer.last_checkpoint)}
        if not info.is_main:
            return {}
        baseline = build_model(cfg).backbone.to(trainer.device)
        online = {"online_probe": probe.result()} if ev.online_probe and probe.enabled else {}
        res = quick_eval(trainer.model.backbone, baseline, trainer.data, cfg, trainer.device, Path(run_dir), online)
        print(format_table(res, f"{cfg.head.name} on {cfg.data.name}, {trainer.steps} steps -> {run_dir}"))
        if cfg.eval.plots:
            from episodic.eval.plots import save_run_plots  # accuracy curve, score histograms, embedding map

            save_run_plots(trainer, run_dir)
        return res
    finally:
        distributed.cleanup()


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    run_or_fail(lambda: train(cfg, HydraConfig.get().runtime.output_dir))


def rank_overrides(argv: list[str]) -> list[str]:
    """Hydra overrides for ranks > 0 of a torchrun job: no ``.hydra/`` files and no log file, and,
    unless ``hydra.run.dir`` is given, a throwaway run directory (removed at exit): rank 0's
    directory is the run's, and :func:`train` broadcasts its path."""
    if int(os.environ.get("RANK", "0") or 0) == 0:
        return []
    extra = ["hydra.output_subdir=null", "hydra/job_logging=disabled"]
    if not any(a.startswith("hydra.run.dir=") for a in argv):
        tmp = tempfile.mkdtemp(prefix="episodic-rank")
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        extra.append(f"hydra.run.dir={tmp}")
    return extra


def _check(cfg: DictConfig) -> None:
    from episodic.engine import check_config

    check_config(cfg)


def main() -> None:
    register()
    validate_overrides("train", sys.argv[1:], _check)
    if not any(a.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for a in sys.argv[1:]):
        run_or_fail(lambda: writable_dir("runs", "hydra.run.dir (default runs/ here)"))
    sys.argv += rank_overrides(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
