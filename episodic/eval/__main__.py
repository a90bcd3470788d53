"""``python -m episodic.eval eval=linear|semi|fewshot|knn checkpoint=PATH [data=...] [overrides]``.

Evaluates a checkpoint's frozen (or, for ``semi``, fine-tuned) encoder with one protocol, next to
the random-init encoder of the same architecture and seed; appends the result to the run's
``results.json`` (see :mod:`episodic.eval.report`) and prints a table. Examples::

    python -m episodic.eval eval=linear  checkpoint=runs/.../checkpoints/last.pt
    python -m episodic.eval eval=fewshot checkpoint=runs/.../checkpoints/last.pt eval.episodes=2000
    python -m episodic.eval eval=semi    checkpoint=runs/.../checkpoints/last.pt eval.fractions=[0.1]
    python -m episodic.eval eval=knn     checkpoint=runs/.../checkpoints/last.pt data=cifar10 eval.k=[20,200]

Protocol settings are the schemas in :mod:`episodic.config`; the root config is ``episodic/configs/evaluate.yaml``.
Bad input (no checkpoint, a checkpoint of another backbone, a missing split, N or K larger than
the classes allow) ends with one ``error: ...`` line and exit code 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from episodic.cli import CONFIG_DIR, fail, run_or_fail, validate_overrides
from episodic.errors import check


def _protocols() -> dict[str, Callable[[Any, Any], dict[str, Any]]]:
    from episodic.eval.fewshot import run_fewshot
    from episodic.eval.knn import run_knn
    from episodic.eval.linear import run_linear
    from episodic.eval.semi import run_semi

    return {"linear": run_linear, "semi": run_semi, "fewshot": run_fewshot, "knn": run_knn}


def evaluate(cfg: DictConfig, data_choice: str | None = None) -> dict[str, Any]:
    """Run the protocol ``cfg.eval.protocol``, append it to ``results.json``, print the table; the results."""
    from episodic.eval.context import build_context
    from episodic.eval.report import append_result, format_rows, result_rows

    protocols = _protocols()
    name = cfg.eval.get("protocol")
    check(
        name in protocols,
        f"eval={name or 'quick'} is not a protocol of python -m episodic.eval "
        f"(quick is the end-of-run evaluation of training); use eval={'|'.join(protocols)}",
    )
    ctx = build_context(cfg, data_choice)
    res = protocols[name](ctx, cfg.eval)
    append_result(
        ctx.results_path,
        {
            "protocol": name,
            "checkpoint": str(ctx.encoders.path),
            "step": ctx.encoders.step,
            "backbone": ctx.encoders.backbone_name,
            "data": ctx.data_key,
            "settings": OmegaConf.to_container(cfg.eval, resolve=True),
            "results": res,
        },
    )
    title = (
        f"{name} evaluation of {ctx.encoders.backbone_name} at step {ctx.encoders.step} on {ctx.data_key} "
        f"-> {ctx.results_path}"
    )
    print(format_rows(result_rows(name, res), title))
    return res


@hydra.main(config_path=str(CONFIG_DIR), config_name="evaluate", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    choice = HydraConfig.get().runtime.choices.get("data")
    run_or_fail(lambda: evaluate(cfg, choice if choice not in (None, "null") else None))


def main() -> None:
    if not any(a.startswith("eval=") for a in sys.argv[1:]) and "--help" not in sys.argv and "-h" not in sys.argv:
        fail(f"eval= is required; allowed: {', '.join(_protocols())} (e.g. eval=linear checkpoint=PATH)")
    from episodic.eval.context import results_path

    validate_overrides("evaluate", sys.argv[1:], results_path)
    _hydra_main()


if __name__ == "__main__":
    main()
