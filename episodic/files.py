"""Outputs never clobber inputs, and a path that cannot be written is one line before any work starts."""

from __future__ import annotations

import errno
import tempfile
from pathlib import Path

from episodic.errors import EpisodicError


def io_error(e: OSError) -> str:
    """``[Errno 28] No space left on device`` -> ``no space left on device (ENOSPC)``."""
    code = errno.errorcode.get(e.errno or 0, "")
    why = (e.strerror or str(e)).lower()
    return f"{why} ({code})" if code else why


def _problem(folder: Path) -> str | None:
    """Why ``folder`` cannot receive files (created if missing; a file is made in it and removed)."""
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return f"'{blocker}' is a file, not a folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        return io_error(e)
    return None


def writable_dir(path: str | Path, key: str) -> Path:
    """``path`` is a folder this process can write into (created if missing); else one line naming
    ``key=path`` and the cause (a file in the way, no permission, a read-only or full file system)."""
    path = Path(path).expanduser()
    problem = _problem(path)
    if problem is not None:
        raise EpisodicError(f"{key}={path} cannot be written: {problem}; choose another path")
    return path


def writable_file(path: str | Path, key: str, overwrite: bool = False, inputs: tuple[Path, ...] = ()) -> Path:
    """``path`` can be written as a file: not a folder, not one of ``inputs``, not an existing file unless
    ``overwrite``, in a folder this process can write into."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise EpisodicError(f"{key}={path} is a folder; give a file path, e.g. {key}={path / 'encoder.pt'}")
    for src in inputs:
        if path.exists() and src.exists() and path.resolve() == src.resolve():
            raise EpisodicError(f"{key}={path} is the input itself; choose another file")
    if path.exists() and not overwrite:
        raise EpisodicError(f"{key}={path} exists; choose another file, or overwrite=true to replace it")
    problem = _problem(path.parent)
    if problem is not None:
        raise EpisodicError(f"{key}={path} cannot be written: {problem}; choose another path")
    return path
