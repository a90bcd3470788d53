"""Every recipe in miniature (``+scale=cpu_smoke``): does it learn? Trained vs random-init encoder.

    python benchmarks/smoke_recipes.py --out runs/smoke            # every recipe, seed 0
    python benchmarks/smoke_recipes.py --recipes snclr t_moco_v2 --seeds 0 1 2

Each recipe runs as ``python -m episodic.train +experiment=NAME +scale=cpu_smoke`` (Conv-4 width 16 on the
embedded digits, batch 32, 600 steps, memories capped at 1,024 entries) and its end-of-run quick evaluation
compares the trained encoder with its random-init twin: the linear probe and 5-way 1/5-shot episodes
(200) on digits 5-9 of the test split. A recipe *learns* when its 5-way 1-shot accuracy is above the
random-init twin's with non-overlapping 95% intervals. Resumable: a run with a ``results.json`` is
read, not repeated. Prints a Markdown table; ``--json`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def recipes() -> list[str]:
    return sorted(p.stem for p in (ROOT / "episodic" / "configs" / "experiment").glob("*.yaml"))


def run(name: str, seed: int, out: Path, threads: int) -> dict[str, Any]:
    run_dir = out / f"{name}_seed{seed}"
    results = run_dir / "results.json"
    if not results.is_file():
        cmd = [
            sys.executable,
            "-m",
            "episodic.train",
            f"+experiment={name}",
            "+scale=cpu_smoke",
            f"seed={seed}",
            f"hydra.run.dir={run_dir}",
        ]
        env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env})
        if done.returncode != 0:
            raise SystemExit(f"{name} seed {seed} failed:\n{done.stderr[-2000:]}")
    res = json.loads(results.read_text())
    row: dict[str, Any] = {"recipe": name, "seed": seed}
    for key in ("5way1shot", "5way5shot"):
        trained, base = res["fewshot"][key]["trained"], res["fewshot"][key]["random_init"]
        row[key] = {"trained": trained["mean"], "ci": trained["ci95"]}
        row[key].update(random=base["mean"], random_ci=base["ci95"])
    if res.get("linear"):
        row["linear"] = {"trained": res["linear"]["trained"], "random": res["linear"]["random_init"]}
    one = row["5way1shot"]
    row["learns"] = one["trained"] - one["ci"] > one["random"] + one["random_ci"]
    return row


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=None, help="default: every recipe")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "smoke")
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of each run (0: torch's default)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args(argv)
    names = args.recipes or recipes()
    unknown = sorted(set(names) - set(recipes()))
    if unknown:
        raise SystemExit(f"error: no such recipe: {', '.join(unknown)}; use {', '.join(recipes())}")
    rows = []
    print("| recipe | seed | 5w1s trained | 5w1s random init | 5w5s trained | 5w5s random init | linear | learns |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name in names:
        for seed in args.seeds:
            r = run(name, seed, args.out, args.threads)
            rows.append(r)
            one, five = r["5way1shot"], r["5way5shot"]
            lin = r.get("linear")
            linear = f"{lin['trained']:.1f} / {lin['random']:.1f}" if lin else "-"
            print(
                f"| `{name}` | {seed} | {one['trained']:.1f} ± {one['ci']:.1f} | {one['random']:.1f} ± "
                f"{one['random_ci']:.1f} | {five['trained']:.1f} ± {five['ci']:.1f} | {five['random']:.1f} ± "
                f"{five['random_ci']:.1f} | {linear} | "
                f"{'yes' if r['learns'] else '**no**'} |",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
