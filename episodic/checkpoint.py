"""Checkpoints: written atomically (temp file + fsync + rename), read back with a clear error.

A half-written file never carries a checkpoint's name: ``save`` writes ``name.tmp`` and renames
it over ``name`` only once it is complete. ``load`` refuses a corrupt or foreign file with one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from episodic.errors import EpisodicError

FORMAT = "episodic-checkpoint-v1"


def save(state: dict[str, Any], path: str | Path) -> Path:
    """Atomically write ``state`` (plus a format tag) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save`; a missing, corrupt or foreign file is an EpisodicError."""
    path = Path(path)
    if not path.is_file():
        raise EpisodicError(f"checkpoint '{path}' does not exist; give the path of a .pt file a run wrote")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise EpisodicError(f"checkpoint '{path}' is corrupt or truncated ({type(e).__name__}); "
                            f"use another checkpoint of the run") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise EpisodicError(f"'{path}' is not an episodic checkpoint (expected format {FORMAT})")
    return state
