"""Checkpoints: written atomically, read back with a clear error, found and pruned in a run folder.

A half-written file never carries a checkpoint's name: :func:`save` writes ``name.tmp`` and renames
it over ``name`` only once it is complete. :func:`load` refuses a corrupt or foreign file with one
line. A run's ``checkpoints/`` holds ``step_N.pt`` files and ``last.pt``; :func:`newest_valid`
finds the newest one that loads, :func:`prune` keeps the newest few. :func:`rng_state` is every
random stream of a process, which a checkpoint carries so that a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from episodic.errors import EpisodicError
from episodic.files import io_error

log = logging.getLogger(__name__)

FORMAT = "episodic-checkpoint-v1"
_NAME = re.compile(r"step_(\d+)\.pt")


def nonfinite(state: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in ``state`` (nested dicts and lists) that hold inf or nan."""
    if isinstance(state, torch.Tensor):
        return [prefix] if state.is_floating_point() and not bool(torch.isfinite(state).all()) else []
    if isinstance(state, dict):
        return [n for k, v in state.items() for n in nonfinite(v, f"{prefix}{k}.")]
    if isinstance(state, (list, tuple)):
        return [n for i, v in enumerate(state) for n in nonfinite(v, f"{prefix}{i}.")]
    return []


def save(state: dict[str, Any], path: str | Path) -> Path:
    """Atomically write ``state`` (plus a format tag) to ``path``, refusing one with a non-finite tensor.

    A failed write (disk full, file too large, no permission, a file where a folder should be) is one
    line naming the path and the cause; the temporary file is removed and whatever ``path`` held before
    stays as it was.
    """
    path = Path(path)
    bad = nonfinite({k: state[k] for k in ("model", "optimizer") if k in state})
    if bad:
        names = ", ".join(n.rstrip(".") for n in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise EpisodicError(f"not writing checkpoint '{path}': non-finite values in {names}")
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise EpisodicError(f"cannot write checkpoint '{path}': {io_error(e)}") from None
    return path


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save`; a missing, corrupt or foreign file is an EpisodicError."""
    path = Path(path)
    if not path.is_file():
        raise EpisodicError(f"checkpoint '{path}' does not exist; give the path of a .pt file a run wrote")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise EpisodicError(
            f"checkpoint '{path}' is corrupt or truncated ({type(e).__name__}); use another checkpoint of the run"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise EpisodicError(f"'{path}' is not an episodic checkpoint (expected format {FORMAT})")
    return state


def state_mismatch(expected: dict[str, Any], saved: dict[str, Any]) -> str | None:
    """Why ``saved`` (a model state dict) does not load into a model whose state dict is ``expected``:
    the first missing, unexpected or differently shaped entry; ``None`` when it fits."""
    missing = [k for k in expected if k not in saved]
    if missing:
        return f"it lacks {missing[0]}" + (f" and {len(missing) - 1} more entries" if len(missing) > 1 else "")
    extra = [k for k in saved if k not in expected]
    if extra:
        return f"it has {extra[0]}, which this model does not" + (
            f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        )
    for k, v in expected.items():
        if isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(saved[k].shape):
            return f"{k} is {tuple(saved[k].shape)} there and {tuple(v.shape)} here"
    return None


# ------------------------------------------------------------------------ a run's checkpoints folder
def step_of(path: Path) -> int | None:
    """``N`` of a ``step_N.pt`` file name (``None`` for any other name)."""
    m = _NAME.fullmatch(path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(folder: Path) -> list[Path]:
    """``step_N.pt`` files and ``last.pt`` in ``folder``, newest (highest step, ``last.pt`` first) first."""
    if not folder.is_dir():
        return []
    found = [(n, p) for p in folder.iterdir() if (n := step_of(p)) is not None]
    found.sort(key=lambda t: t[0], reverse=True)
    last = [folder / "last.pt"] if (folder / "last.pt").is_file() else []
    return last + [p for _, p in found]


def load_valid(path: Path) -> dict[str, Any] | None:
    """A checkpoint's state, or None (with a warning) when it is corrupt or holds no training state."""
    try:
        state = load(path)
    except EpisodicError as e:
        log.warning("skipping checkpoint %s: %s", path, e)
        return None
    if "model" in state and "step" in state:
        return state
    log.warning("skipping checkpoint %s: it holds no training state", path)
    return None


def newest_valid(run_or_folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint of a run directory (or of a checkpoints folder) with the highest step that loads,
    and its state; corrupt ones are skipped with a warning. ``last.pt`` counts at the step it holds (a
    finished run that was extended with more ``train.steps`` writes newer numbered checkpoints)."""
    folder = run_or_folder / "checkpoints" if (run_or_folder / "checkpoints").is_dir() else run_or_folder
    last: tuple[Path, dict[str, Any]] | None = None
    if (folder / "last.pt").is_file():
        state = load_valid(folder / "last.pt")
        last = (folder / "last.pt", state) if state is not None else None
    for path in list_checkpoints(folder):
        step = step_of(path)
        if step is None:
            continue
        if last is not None and int(last[1]["step"]) >= step:
            return last
        state = load_valid(path)
        if state is not None:
            return path, state
    return last


def intact(path: Path) -> bool:
    """Whether ``path`` is a whole checkpoint file: ``torch.save`` writes a zip archive, and a truncated
    one has no central directory (a cheap test: nothing is unpickled)."""
    return zipfile.is_zipfile(path)


def prune(folder: Path, keep_last: int | None) -> None:
    """Keep the ``keep_last`` newest intact ``step_N.pt`` (0 or null: all) and delete older intact ones;
    a damaged file is neither counted nor deleted (it is left for inspection, with a warning), so the
    newest valid checkpoint always stays. Stale ``.tmp`` files of a killed run are removed (only rank 0
    writes, and not while this runs)."""
    for tmp in folder.glob("*.tmp"):
        tmp.unlink(missing_ok=True)
    if not keep_last:
        return
    kept = 0
    for p in [p for p in list_checkpoints(folder) if p.name != "last.pt"]:
        if not intact(p):
            log.warning("checkpoint %s is damaged; not counted or deleted by train.keep_last", p)
        elif kept < int(keep_last):
            kept += 1
        else:
            p.unlink(missing_ok=True)


# ------------------------------------------------------------------------ random streams
def rng_state(generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    """Every random stream of this process: torch (CPU, CUDA), NumPy, Python and the trainer's generator."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "generator": generator.get_state(),
    }


def set_rng_state(state: dict[str, Any], generator: torch.Generator, device: torch.device) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    generator.set_state(state["generator"])
