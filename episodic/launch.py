"""``python -m episodic.launch [torchrun options] -m episodic.train ... hydra.run.dir=DIR``: torchrun, with
a stop signal being a clean stop.

SLURM (a time limit, ``scancel``) and Ctrl-C send SIGTERM or SIGINT to every process of the job: the
training processes finish their step, write a stop checkpoint and exit 0 (:mod:`episodic.engine`), but
torchrun's agent reports the signal as its own failure (a traceback, a non-zero exit), which a requeue
script cannot tell from a crash. This launcher runs the same agent (``torch.distributed.run``, every
option as torchrun's) and, after a stop signal, exits 0 with one line when the run folder
(``hydra.run.dir``) holds a checkpoint written after the signal, else 1 with one line saying so.

It also sets ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (unless set): with the c10d rendezvous, torchrun
shares one store across rendezvous rounds, so after a worker fails and the agents restart their
workers (``--max-restarts``), the new workers can read the old workers' addresses from it and fail to
connect (pytorch/pytorch#135712); a store per round avoids that. ``benchmarks/node_failure.py`` runs
the two-node restart this is for.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from episodic.checkpoint import list_checkpoints


def stop_checkpoint(argv: list[str], since: float) -> Path | None:
    """The newest checkpoint of the run folder named by ``hydra.run.dir=`` in ``argv``, if written after ``since``."""
    run_dir = next((a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")), None)
    if run_dir is None:
        return None
    found = [p for p in list_checkpoints(Path(run_dir) / "checkpoints") if p.stat().st_mtime >= since]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def main() -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    argv = sys.argv[1:]
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")  # see the module docstring
    started = time.time()
    try:
        torchrun(argv)
    except SignalException as e:
        name = getattr(e.sigval, "name", str(e.sigval))
        path = stop_checkpoint(argv, started)
        if path is None:
            print(
                f"error: {name}: the workers stopped without a new checkpoint in hydra.run.dir; "
                "resume=auto continues from the newest one",
                file=sys.stderr,
            )
            raise SystemExit(1) from None
        print(f"stopped by {name}: stop checkpoint {path}; continue with the same command and resume=auto")
        raise SystemExit(0) from None


if __name__ == "__main__":
    main()
