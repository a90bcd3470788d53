"""One configuration over several seeds of ``benchmarks/omniglot_fewshot.py``, against a bar: a markdown report.

    python benchmarks/seeds_report.py runs/omniglot/psco_30min_s0 runs/omniglot/psco_30min_s1 \\
        runs/omniglot/psco_30min_s2 --against 92.0 97.7 81.3 93.3 --against-half 0.9 0.4 1.3 0.8 \\
        --against-name omniglot_unsup --goal 96.4 99.1 89.6 97.1 --goal-name PsCo --figure docs/psco_30min.png

Reads each run's ``result.json`` and prints: one row per seed (steps, train seconds, the four settings with
their episode intervals), the mean over seeds with its 95% Student-t interval, the reference's mean and
interval (``--against``, ``--against-half``) with a verdict per setting (``above`` when the two intervals do
not overlap and the mean is higher, ``below`` likewise, else ``overlaps``), the distance to a goal
(``--goal``), and the machine each run trained on. ``--figure`` plots 5-way 1-shot against training seconds,
one line per seed, with the reference's interval as a band.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ablate import SETTINGS, mean, t_half_width

from episodic.cli import run_or_fail
from episodic.errors import check


def load(run: Path) -> dict[str, Any]:
    path = run / "result.json"
    check(path.is_file(), f"{path} does not exist; give run folders of benchmarks/omniglot_fewshot.py")
    result: dict[str, Any] = json.loads(path.read_text())
    return result


def verdict(m: float, h: float, ref: float, ref_h: float) -> str:
    """``above`` / ``below`` when the intervals ``m ± h`` and ``ref ± ref_h`` are apart, else ``overlaps``."""
    if m - h > ref + ref_h:
        return "above"
    if m + h < ref - ref_h:
        return "below"
    return "overlaps"


def report(runs: Sequence[dict[str, Any]], args: argparse.Namespace) -> str:
    head = "| seed | steps | train s | " + " | ".join(SETTINGS) + " |"
    lines = [head, "|" + "---|" * 3 + "---:|" * len(SETTINGS)]
    for r in runs:
        seed = r["config"].get("seed", "?")
        cells = [f"{r['fewshot'][s]['mean']:.1f} ± {r['fewshot'][s]['ci95']:.1f}" for s in SETTINGS]
        lines.append(f"| {seed} | {r['steps']} | {r['train_seconds']:.0f} | " + " | ".join(cells) + " |")
    means = [mean([r["fewshot"][s]["mean"] for r in runs]) for s in SETTINGS]
    halves = [t_half_width([r["fewshot"][s]["mean"] for r in runs]) for s in SETTINGS]
    lines.append(
        f"| mean of {len(runs)} (95% t interval) | | | "
        + " | ".join(f"**{m:.1f} ± {h:.1f}**" for m, h in zip(means, halves))
        + " |"
    )
    if args.against:
        ref_h = args.against_half or [0.0] * len(SETTINGS)
        ref = " | ".join(f"{m:.1f} ± {h:.1f}" for m, h in zip(args.against, ref_h))
        lines.append(f"| {args.against_name} | | | {ref} |")
        verdicts = [verdict(m, h, r, rh) for m, h, r, rh in zip(means, halves, args.against, ref_h)]
        lines.append(
            f"| against {args.against_name} | | | "
            + " | ".join(f"{m - r:+.1f} ({v})" for m, r, v in zip(means, args.against, verdicts))
            + " |"
        )
    if args.goal:
        lines.append(
            f"| to {args.goal_name} | | | " + " | ".join(f"{m - g:+.1f}" for m, g in zip(means, args.goal)) + " |"
        )
    machines = sorted({r.get("machine", "unknown") for r in runs})
    lines += ["", f"Machine: {'; '.join(machines)}. Command of the first run: `{runs[0]['command']}`."]
    return "\n".join(lines)


def plot(runs: Sequence[dict[str, Any]], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for r in runs:
        pts = r.get("curve", [])
        ax.plot(
            [p["seconds"] for p in pts],
            [p["5way1shot"]["mean"] for p in pts],
            marker="o",
            ms=3,
            label=f"seed {r['config'].get('seed', '?')}",
        )
    if args.against:
        m, h = args.against[0], (args.against_half or [0.0])[0]
        ax.axhspan(m - h, m + h, color="grey", alpha=0.25, label=f"{args.against_name} at its end (mean, 95% interval)")
    if args.goal:
        ax.axhline(args.goal[0], color="black", ls="--", lw=1, label=args.goal_name)
    ax.set_xlabel("training seconds")
    ax.set_ylabel("5-way 1-shot (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run folders (each with result.json)")
    ap.add_argument("--against", type=float, nargs=4, help="the reference's mean of the four settings")
    ap.add_argument("--against-half", type=float, nargs=4, help="half-widths of the reference's 95%% intervals")
    ap.add_argument("--against-name", default="reference")
    ap.add_argument("--goal", type=float, nargs=4, help="a goal's four figures (distance reported)")
    ap.add_argument("--goal-name", default="goal")
    ap.add_argument("--figure", type=Path, help="write the 5-way 1-shot curves here (PNG)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    runs = [load(r) for r in args.runs]
    print(report(runs, args))
    if args.figure:
        plot(runs, args)


if __name__ == "__main__":
    run_or_fail(main)
