"""Command-line plumbing shared by the entry points: argument checks before Hydra, one-line errors.

Hydra reports an unknown config-group option or key with a traceback-like block and exit code 1;
:func:`validate_overrides` composes the config first and turns such problems into one
``error: ...`` line with exit code 2, naming the bad value and what is allowed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, NoReturn, TypeVar

from episodic.errors import EpisodicError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
T = TypeVar("T")


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run_or_fail(fn: Callable[[], T]) -> T:
    """Run ``fn``; an :class:`EpisodicError` becomes ``error: ...`` on stderr and exit code 2."""
    try:
        return fn()
    except EpisodicError as e:
        fail(str(e))


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def validate_overrides(config_name: str, argv: list[str]) -> None:
    """Check group choices (``head=foo``) and, for a single run, compose the whole config."""
    overrides = [a for a in argv if not a.startswith("-")]
    sweep = any(a in ("-m", "--multirun") for a in argv)
    for arg in overrides:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or "." in key or not (CONFIG_DIR / key).is_dir():
            continue
        listed = "[" in value  # several options at once: variant=[a,b] (sweeps: variant=[a],[a,b])
        for v in value.replace("[", ",").replace("]", ",").split(",") if listed or sweep else [value]:
            v = v.strip()
            if v and v != "null" and not (CONFIG_DIR / key / f"{v}.yaml").exists():
                fail(f"unknown {key} {v!r}; allowed: {', '.join(group_options(key))}")
    if sweep:
        return
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    plain = [a for a in overrides if not a.startswith("hydra.") and not a.startswith("hydra/")]
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            compose(config_name, overrides=plain)
    except (HydraException, OmegaConfBaseException) as e:
        fail(str(e).strip().splitlines()[0])
