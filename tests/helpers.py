"""Test helpers: compose the real Hydra config with small overrides."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from episodic.cli import CONFIG_DIR
from episodic.config import register

if TYPE_CHECKING:
    from episodic.heads.base import Head, HeadOutput
    from episodic.methods import Method
    from episodic.tasks.episode import Episode

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "backbone.params.width=16",
    "backbone.projector.hidden_dim=32",
    "backbone.projector.out_dim=16",
    "batch_size=32",
    "train.steps=3",
    "train.progress=false",
    "eval.fewshot.episodes=20",
    "device=cpu",
    "eval.plots=false",
]  # end-of-run pictures (t-SNE) take seconds; tests/test_eval.py covers them


def make_cfg(*overrides: str, config: str = "train") -> DictConfig:
    register()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose(config, overrides=list(overrides))


def run_cli(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )


def pair(method: Method, episode: Episode, head: Head) -> HeadOutput:
    """A pairing's part of the model's step in one process: embed, score with the head, update its state."""
    from episodic.tasks.scope import ScopePlan

    embedded = method.embed(episode, head.transform_embeddings)
    out = method.score(embedded, head)
    method.update(embedded[0], ScopePlan.one_process())
    return out


@dataclasses.dataclass
class Ran:
    """What a command left: exit code, standard output and standard error."""

    code: int
    out: str
    err: str

    def one_error(self) -> str:
        """The single ``error:`` line of a run that ended with exit code 2 (asserted), no traceback."""
        lines = self.err.strip().splitlines()
        assert self.code == 2 and "Traceback" not in self.err, (self.code, self.err[-2000:])
        errors = [line for line in lines if line.startswith("error: ")]
        assert len(errors) == 1 and lines[-1] == errors[0], self.err[-2000:]
        return errors[0]


def run_forked(
    module: str,
    *args: str,
    cwd: Path = ROOT,
    env: dict[str, str] | None = None,
    before: Any = None,
    timeout: float = 300,
) -> Ran:
    """``python -m module args`` in a forked child of this process (the imports are already done, so it
    starts in milliseconds): its ``main()``, with fresh standard streams, one intra-op thread and
    ``before()`` run first (a resource limit, say)."""
    import importlib
    import os
    import select
    import traceback

    import torch

    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            for fd in (out_r, out_w, err_r, err_w):
                os.close(fd)
            sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)  # noqa: SIM115
            os.chdir(cwd)
            os.environ.update(env or {})
            torch.set_num_threads(1)
            if before is not None:
                before()
            sys.argv = [module, *args]
            main = importlib.import_module(module + (".__main__" if module == "episodic.eval" else "")).main
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(out_w)
    os.close(err_w)
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
    open_fds = [out_r, err_r]
    import time

    deadline = time.monotonic() + timeout
    while open_fds:
        ready, _, _ = select.select(open_fds, [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            os.kill(pid, 9)
            raise TimeoutError(f"{module} {' '.join(args)} ran past {timeout} s")
        for fd in ready:
            data = os.read(fd, 65536)
            if data:
                chunks[fd].append(data)
            else:
                open_fds.remove(fd)
                os.close(fd)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return Ran(code, b"".join(chunks[out_r]).decode(errors="replace"), b"".join(chunks[err_r]).decode(errors="replace"))
