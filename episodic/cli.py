"""Command-line plumbing shared by the entry points: the configs, checks before Hydra, one-line errors.

Every entry point (``episodic.train``, ``episodic.eval``, ``episodic.export``) first calls
:func:`validate_overrides`: it composes the config the way Hydra will, runs the schema checks of
:func:`episodic.config.validate` and the entry point's own checks, and turns any problem into one
``error: ...`` line on stderr with exit code 2, before Hydra starts (which would print a block and
exit 1) and before any data is read or any model trained.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

from omegaconf import DictConfig

from episodic.errors import EpisodicError
from episodic.files import io_error, writable_dir

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
T = TypeVar("T")


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run_or_fail(fn: Callable[[], T]) -> T:
    """Run ``fn``; an :class:`EpisodicError`, or a failed read or write of a file (disk full, file too
    large, no permission, a file where a folder should be), becomes ``error: ...`` on stderr, exit code 2."""
    try:
        return fn()
    except EpisodicError as e:
        fail(str(e))
    except OSError as e:
        if e.filename is None:  # not about a file (a network error, say): the traceback is the better report
            raise
        fail(f"cannot read or write '{e.filename}': {io_error(e)}")


def group_options(group: str) -> list[str]:
    """The options of a config group: YAML files and generated schemas (``head=r2d2``)."""
    from hydra.core.config_store import ConfigStore

    from episodic.config import register

    register()
    stored = ConfigStore.instance().repo.get(group, {})
    names = {p.stem for p in (CONFIG_DIR / group).glob("*.yaml")}
    names |= {k.removesuffix(".yaml") for k, v in stored.items() if not isinstance(v, dict)}
    return sorted(names)


def _groups() -> set[str]:
    from hydra.core.config_store import ConfigStore

    from episodic.config import register

    register()
    stored = {k for k, v in ConfigStore.instance().repo.items() if isinstance(v, dict) and k != "schema"}
    return stored | {p.name for p in CONFIG_DIR.iterdir() if p.is_dir()}


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """The config Hydra composes for ``overrides`` (Hydra's own keys left out); errors as one line."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from episodic.config import describe, register

    register()
    plain = [a for a in overrides if not a.startswith("hydra.") and not a.startswith("hydra/")]
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name, overrides=plain)
    except (HydraException, OmegaConfBaseException) as e:
        raise EpisodicError(describe(e)) from None


def validate_overrides(config_name: str, argv: list[str], check: Callable[[DictConfig], object] | None = None) -> None:
    """Check group choices (``head=foo``) and, for a single run, compose the whole config and validate it
    (:func:`episodic.config.validate`, then ``check``); exit 2 with one line on the first problem."""
    overrides = [a for a in argv if not a.startswith("-")]
    sweep = any(a in ("-m", "--multirun") for a in argv)
    groups = _groups()
    for arg in overrides:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or "." in key or key not in groups:
            continue
        listed = "[" in value  # several options at once: variant=[a,b] (sweeps: variant=[a],[a,b])
        options = group_options(key)
        for v in value.replace("[", ",").replace("]", ",").split(",") if listed or sweep else [value]:
            v = v.strip()
            if v and v != "null" and v not in options:
                fail(f"unknown {key} {v!r}; allowed: {', '.join(options)}")
    run_dir = next((a.split("=", 1)[1] for a in argv if a.startswith(("hydra.run.dir=", "hydra.sweep.dir="))), None)
    if run_dir is not None and "${" not in run_dir:
        run_or_fail(lambda: writable_dir(run_dir, "hydra.run.dir"))
    if sweep:
        return

    def run() -> None:
        from episodic.config import validate

        cfg = compose_config(config_name, overrides)
        validate(cfg)
        if check is not None:
            check(cfg)

    run_or_fail(run)
