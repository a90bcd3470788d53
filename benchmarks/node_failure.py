"""A node that dies: the multi-node recipe of docs/distributed.md, run on one machine.

    python benchmarks/node_failure.py                      # conv4 on digits, 40 steps, kill after step 15
    python benchmarks/node_failure.py --steps 60 --kill-after 25 -- head=contrastive

Two agents (``python -m episodic.launch``, which is torchrun: ``--nnodes=2 --nproc_per_node=1``, c10d
rendezvous on 127.0.0.1, ``--max-restarts=1``, ``resume=auto``) train one run together, twice:

1. uninterrupted, to ``--steps``;
2. interrupted: when the checkpoint of step ``--kill-after`` appears, one agent's worker (``--node``) is
   frozen (SIGSTOP, so it cannot run on) and killed (SIGKILL), as a node's power cut would. Its agent
   sees the failure and starts a new rendezvous round; the other agent restarts its worker too; both
   workers continue from the newest valid checkpoint (``resume=auto``) to ``--steps``.

Both agents must exit 0, and the interrupted run's logged loss of every step must equal the
uninterrupted one's (the difference is printed; ``--tolerance`` is the pass line). Training is on the
CPU with gloo and one thread per worker.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RUN = [
    "device=cpu",
    "backbone.params.width=16",
    "backbone.projector.hidden_dim=32",
    "backbone.projector.out_dim=16",
    "batch_size=32",
    "train.log_every=1",
    "train.progress=false",
    "eval.knn_every=0",
    "eval.linear=false",
    "eval.baseline=false",
    "eval.plots=false",
    "eval.fewshot.episodes=20",
    "resume=auto",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def agents(
    run: Path, steps: int, ckpt_every: int, extra: list[str], port: int, launcher: str
) -> list[subprocess.Popen]:
    """Start the two torchrun agents of one run (their output goes to ``run/agent<i>.log``)."""
    run.mkdir(parents=True, exist_ok=True)
    procs = []
    for node in range(2):
        cmd = [
            sys.executable, "-m", launcher,
            "--nnodes=2", "--nproc_per_node=1", "--max-restarts=1",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={run.name}",
            "-m", "episodic.train", *RUN, f"train.steps={steps}", f"train.ckpt_every={ckpt_every}", *extra,
            f"hydra.run.dir={run}",
        ]  # fmt: skip
        log = (run / f"agent{node}.log").open("w")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def workers_of(agent: subprocess.Popen) -> list[int]:
    """The training processes the agent started (its children running episodic.train)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == agent.pid and b"episodic.train" in cmdline:
            found.append(int(pid))
    return found


def wait(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes


def losses(run: Path) -> dict[int, float]:
    import torch

    path = run / "checkpoints" / "last.pt"
    if not path.exists():  # the run did not finish
        return {}
    state = torch.load(path, map_location="cpu", weights_only=False)
    return {int(r["step"]): float(r["loss"]) for r in state["history"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--ckpt-every", type=int, default=5)
    ap.add_argument("--kill-after", type=int, default=15, help="kill when this step's checkpoint appears")
    ap.add_argument("--out", type=Path, default=Path("runs/node_failure"), help="the two run folders go here")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--tolerance", type=float, default=1e-6)
    ap.add_argument("--node", type=int, choices=[0, 1], default=1, help="whose worker is killed")
    ap.add_argument(
        "--launcher",
        default="episodic.launch",
        choices=["episodic.launch", "torch.distributed.run"],
        help="the agents: episodic.launch, or plain torchrun (whose restart fails, pytorch/pytorch#135712)",
    )
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides (after --)")
    a = ap.parse_args()
    if a.kill_after % a.ckpt_every or not 0 < a.kill_after < a.steps:
        sys.exit(f"error: --kill-after={a.kill_after} must be a multiple of --ckpt-every below --steps")
    for sub in ("straight", "killed"):
        if (a.out / sub).exists():
            sys.exit(f"error: {a.out / sub} exists; give another --out")

    t0 = time.monotonic()
    straight = agents(a.out / "straight", a.steps, a.ckpt_every, a.overrides, free_port(), a.launcher)
    codes_straight = wait(straight, a.timeout)
    t_straight = time.monotonic() - t0

    t0 = time.monotonic()
    run = a.out / "killed"
    killed = agents(run, a.steps, a.ckpt_every, a.overrides, free_port(), a.launcher)
    marker = run / "checkpoints" / f"step_{a.kill_after:07d}.pt"
    victim: list[int] = []
    while not marker.exists():
        if any(p.poll() is not None for p in killed) or time.monotonic() - t0 > a.timeout:
            sys.exit(f"error: the run ended before {marker} appeared; see {run}/agent*.log")
        time.sleep(0.005)
    victim = workers_of(killed[a.node])
    for pid in victim:
        os.kill(pid, signal.SIGSTOP)  # frozen at once: it cannot finish the run before the kill lands
        os.kill(pid, signal.SIGKILL)
    codes_killed = wait(killed, a.timeout)
    t_killed = time.monotonic() - t0

    ref, got = losses(a.out / "straight"), losses(run)
    logs = "".join((run / f"agent{i}.log").read_text() for i in range(2))
    resumed = sorted({int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", logs)})
    diff = max((abs(ref[s] - got[s]) for s in ref if s in got), default=float("nan"))
    result: dict[str, Any] = {
        "steps": a.steps,
        "killed_worker_of_agent": a.node,
        "killed_worker_pids": victim,
        "killed_after_checkpoint_of_step": a.kill_after,
        "resumed_at_steps": resumed,
        "agent_exit_codes": {"straight": codes_straight, "killed": codes_killed},
        "logged_steps": {"straight": len(ref), "killed": len(got)},
        "final_loss": {"straight": ref.get(a.steps), "killed": got.get(a.steps)},
        "max_abs_loss_diff_over_steps": diff,
        "seconds": {"straight": round(t_straight, 1), "killed": round(t_killed, 1)},
    }
    print(json.dumps(result, indent=1))
    ok = (
        codes_straight == [0, 0]
        and codes_killed == [0, 0]
        and sorted(got) == sorted(ref)
        and bool(victim)
        and bool(resumed)
        and diff <= a.tolerance
    )
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
