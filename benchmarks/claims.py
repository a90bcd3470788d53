"""The seed papers' claims as paired ablations on unsupervised few-shot Omniglot, into ``docs/results.md``.

    python benchmarks/claims.py --steps 600 --seeds 0 1 2 --jobs 8          # every arm, then the report
    python benchmarks/claims.py --steps 600 --seeds 0 1 2 --arms r2d2 svm   # some arms only
    python benchmarks/claims.py --steps 600 --seeds 0 1 2 --report-only     # rewrite the report

Each claim compares a system with its own baseline ("arms", :data:`ARMS`) at the same budget and on the
same seeds, so each seed gives one paired difference; the verdict comes from the 95% Student-t interval
of those differences at 5-way 1-shot ("held": above 0, or within ``--margin`` points for an "on par"
claim; "hurts": below 0; "inconclusive": it contains 0). Every arm runs ``benchmarks/omniglot_fewshot.py``
(Conv-4, the Vinyals splits, ProtoNet-cosine on frozen features, 2,000 episodes) in its own process with
``--curve`` points for the accuracy-against-step figure. Resumable: a run whose ``result.json`` exists is
skipped. Every arm is first tried for one step on a tiny digits episode; an arm the framework refuses is
listed with its one-line reason instead of failing the grid. The report keeps the hand-written section
between ``<!-- findings -->`` and ``<!-- /findings -->`` of the existing document (the explanations of
the results), and regenerates everything else from the runs.

Arms scaled to Omniglot at this budget (the same in both arms of a claim): the MoCo pairings keep
``memory_cap=4096`` queue entries (the 19,280 training images would otherwise sit in a 65,536 queue
three times over, each image's own stale keys acting as its negatives) and a key-encoder momentum of
0.99 (at 0.999 more than half of the key encoder is still its random initialisation after 600 steps).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablate import (
    LABELS,
    SETTINGS,
    UMTRA,
    acc,
    compare,
    fmt,
    grid_arguments,
    launch_run,
    mean,
    preflight_overrides,
    t_half_width,
)

HEADS = ("contrastive", "protonet", "r2d2", "svm")
TRICKS = {"rotation": "task.augment=[rotate]", "rotation loss": "task.augment=[rotation_loss]"}
TRICKS["query mixing"] = "task.augment=[query_mix]"
MOCO = ["method=moco", "head=contrastive", "memory_cap=4096", "method.params.momentum=0.99"]
# SNCLR's pairing (configs/experiment/snclr.yaml): MoCo-v3 style, no queue, a predictor, symmetric
SNCLR = [*MOCO, "method.params.queue_size=0", "method.params.predictor_hidden=512", "method.params.symmetric=true"]
BYOL = ["method=byol", "head=protonet"]

ARMS: dict[str, list[str]] = {
    **{h: [f"head={h}"] for h in HEADS},
    **{f"{h} + {t}": [f"head={h}", o] for h in HEADS for t, o in TRICKS.items()},
    "byol": BYOL,
    "byol + rotation": [*BYOL, TRICKS["rotation"]],
    "contrastive + debiased": ["head=contrastive", "variant=debiased"],
    "contrastive + debiased (tau+ 0.01)": ["head=contrastive", "variant=debiased", "variant.debiased.tau_plus=0.01"],
    "contrastive + t_kernel": ["head=contrastive", "variant=t_kernel"],
    "moco v2": MOCO,
    "moco v2 + t_kernel": [*MOCO, "variant=t_kernel"],
    "moco v2 + feature_transform": [*MOCO, "variant=feature_transform"],
    "snclr pairing": SNCLR,
    "snclr pairing + soft_neighbors": [*SNCLR, "variant=soft_neighbors"],
}


@dataclass(frozen=True)
class Claim:
    """``arm`` against ``baseline``: ``kind`` "helps" (the difference is above 0) or "similar" (on par)."""

    paper: str
    arm: str
    baseline: str
    kind: str = "helps"


CLAIMS = [
    *[
        Claim("MetaContrastive: meta-learning heads on par with contrastive", h, "contrastive", "similar")
        for h in HEADS[1:]
    ],
    *[Claim(f"MetaContrastive: {t} helps", f"{h} + {t}", h) for t in TRICKS for h in HEADS],
    Claim("MetaContrastive: task rotation helps BYOL", "byol + rotation", "byol"),
    Claim("DCL: debiased negatives help", "contrastive + debiased", "contrastive"),
    Claim("DCL: debiased negatives help", "contrastive + debiased (tau+ 0.01)", "contrastive"),
    Claim("t-SimCLR: Student-t kernel helps", "contrastive + t_kernel", "contrastive"),
    Claim("t-MoCo-v2: Student-t kernel helps", "moco v2 + t_kernel", "moco v2"),
    Claim("FT: feature transformation helps", "moco v2 + feature_transform", "moco v2"),
    Claim("SNCLR: soft neighbours help", "snclr pairing + soft_neighbors", "snclr pairing"),
]

# the figure: one panel per family of arms
PANELS = {
    "heads": list(HEADS),
    **{f"{h}: task tricks": [h, *(f"{h} + {t}" for t in TRICKS)] for h in HEADS},
    "BYOL": ["byol", "byol + rotation"],
    "DCL, t-SimCLR": [
        "contrastive",
        "contrastive + debiased",
        "contrastive + debiased (tau+ 0.01)",
        "contrastive + t_kernel",
    ],
    "MoCo v2: t-MoCo, FT": ["moco v2", "moco v2 + t_kernel", "moco v2 + feature_transform"],
    "SNCLR": ["snclr pairing", "snclr pairing + soft_neighbors"],
}
FINDINGS = re.compile(r"<!-- findings -->.*?<!-- /findings -->", re.S)


def slug(arm: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", arm.lower()).strip("-")


def run_dir(out: Path, arm: str, seed: int) -> Path:
    return out / f"{slug(arm)}__seed{seed}"


def load(out: Path, arm: str, seeds: Sequence[int]) -> dict[int, dict[str, Any]]:
    runs = {}
    for s in seeds:
        p = run_dir(out, arm, s) / "result.json"
        if p.exists():
            runs[s] = json.loads(p.read_text())
    return runs


# ------------------------------------------------------------------------------------------- report
def plot_curves(path: Path, runs: dict[str, dict[int, dict[str, Any]]]) -> bool:
    """5-way 1-shot against training steps, mean ± 95% interval over seeds, one panel per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {t: [a for a in arms if runs.get(a)] for t, arms in PANELS.items()}
    panels = {t: arms for t, arms in panels.items() if arms}
    if not panels:
        return False
    cols = min(5, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False, sharey=True)
    for ax, (title, arms) in zip(axes.flat, panels.items()):
        for arm in arms:
            n = min(len(r.get("curve", [])) for r in runs[arm].values())
            xs, ys, es = [], [], []
            for i in range(n):
                pts = [r["curve"][i] for r in runs[arm].values()]
                v = [p["5way1shot"]["mean"] for p in pts]
                h = t_half_width(v)
                xs.append(mean([p["step"] for p in pts])), ys.append(mean(v)), es.append(0 if math.isnan(h) else h)
            ax.errorbar(xs, ys, yerr=es, marker="o", ms=3, capsize=2, label=arm)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training steps", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("5-way 1-shot (%)", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def report(args: argparse.Namespace, arms: Sequence[str], skipped: dict[str, str], out: Path) -> str:
    runs = {a: load(out, a, args.seeds) for a in arms}
    budget = f"{args.steps} steps" if args.steps else f"{args.seconds:g} s of training"
    machines: dict[str, list[str]] = {}
    for a, rs in runs.items():
        for seed, r in rs.items():
            machines.setdefault(r.get("machine", "not recorded"), []).append(f"{a} seed {seed}")
    ranked = sorted(machines.items(), key=lambda m: -len(m[1]))
    machine = "; ".join(
        f"{m}: {len(w)} run{'' if len(w) == 1 else 's'}" + ("" if i == 0 else f" ({', '.join(w)})")
        for i, (m, w) in enumerate(ranked)
    )
    lines = [
        "# The seed papers' claims on unsupervised few-shot Omniglot",
        "",
        "Produced by (every number below comes from a run this command made):",
        "",
        "```",
        display_command(args),
        "```",
        "",
        f"Protocol: train without labels on the Vinyals train characters for {budget} per run (Conv-4, "
        "`benchmarks/omniglot_fewshot.py`'s defaults plus each arm's overrides); test on the 1,692 classes "
        "of the Vinyals test split with ProtoNet (cosine) on frozen features, 15 queries per class, "
        f"{args.episodes} episodes per setting. Cells: mean ± 95% interval over seeds "
        f"{', '.join(map(str, args.seeds))} (Student t). Extra overrides for every run: "
        f"{' '.join(f'`{e}`' for e in args.extra) or 'none'}." + (f" Machine: {machine}." if machine else ""),
        "",
        "## Claims",
        "",
        f'5-way 1-shot, paired over seeds. "held": the 95% interval of the difference lies above 0 (for "on par": '
        f'the mean difference is within ±{args.margin:g} points); "hurts": below 0; "inconclusive": it '
        "contains 0.",
        "",
        "| claim | arm vs baseline | verdict | difference [95% interval] |",
        "|---|---|---|---|",
    ]
    for c in CLAIMS:
        if runs.get(c.arm) and runs.get(c.baseline):
            verdict, nums = compare(acc(runs[c.arm]), acc(runs[c.baseline]), args.margin, c.kind)
            lines.append(f"| {c.paper} | {c.arm} vs {c.baseline} | {verdict} | {nums} |")
    lines += [
        "",
        "## Every arm",
        "",
        "| arm | overrides | seeds | steps | train s | " + " | ".join(LABELS[s] for s in SETTINGS) + " |",
        "|---|---|---:|---:|---:|" + "---:|" * len(SETTINGS),
    ]
    baseline: dict[int, dict[str, Any]] = {}
    for a in arms:
        if not runs[a]:
            continue
        for s, r in runs[a].items():
            baseline.setdefault(s, r)
        rs = runs[a].values()
        lines.append(
            f"| {a} | {' '.join(f'`{o}`' for o in ARMS[a])} | {len(rs)} | {mean([r['steps'] for r in rs]):.0f} | "
            f"{mean([r['train_seconds'] for r in rs]):.0f} | "
            + " | ".join(fmt(list(acc(runs[a], k).values())) for k in SETTINGS)
            + " |"
        )
    if baseline:
        lines.append(
            f"| random init (same seeds) | | {len(baseline)} | 0 | 0 | "
            + " | ".join(fmt(list(acc(baseline, k, "random_init").values())) for k in SETTINGS)
            + " |"
        )
    lines += ["", f"UMTRA (published, not run here): {' / '.join(str(UMTRA[k]) for k in SETTINGS)}.", ""]
    png = Path(args.doc).with_name(Path(args.doc).stem + "_curves.png")
    if plot_curves(png, runs):
        lines += [
            "## Accuracy against training steps",
            "",
            "5-way 1-shot measured during each run (500 episodes per point; the last point is the final "
            f"{args.episodes}-episode evaluation), mean ± 95% interval over seeds.",
            "",
            f"![5-way 1-shot accuracy against training steps]({png.name})",
            "",
        ]
    incomplete = [a for a in arms if a not in skipped and len(runs[a]) < len(args.seeds)]
    if skipped or incomplete:
        lines += ["## Not run", ""]
        lines += [f"- {a}: skipped, {why}" for a, why in skipped.items()]
        for a in incomplete:
            failed = [s for s in args.seeds if (run_dir(out, a, s) / "failed.txt").exists()]
            note = f"; failed: seeds {failed} (see {out.name}/<run>/log.txt)" if failed else ""
            lines.append(f"- {a}: {len(runs[a])} of {len(args.seeds)} seeds so far{note}")
        lines.append("")
    doc = Path(args.doc)
    old = FINDINGS.search(doc.read_text()) if doc.exists() else None
    lines += ["## Findings", "", old.group(0) if old else "<!-- findings -->\n<!-- /findings -->", ""]
    text = "\n".join(lines)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    return text


def display_command(args: argparse.Namespace) -> str:
    """The options that decide the numbers (not how many runs are made now, nor how many at a time)."""
    budget = f"--steps {args.steps}" if args.steps else f"--seconds {args.seconds:g}"
    parts = ["python benchmarks/claims.py", budget, "--seeds", *map(str, args.seeds)]
    parts += [f"--episodes {args.episodes}", f"--curve {args.curve}"]
    if args.out != "runs/claims":
        parts.append(f"--out {args.out}")
    return " ".join([*parts, *(["--", *args.extra] if args.extra else [])])


# ------------------------------------------------------------------------------------------- main
def run(todo: tuple[str, int], args: argparse.Namespace, out: Path) -> bool:
    arm, seed = todo
    return launch_run(run_dir(out, arm, seed), [*ARMS[arm], f"seed={seed}"], 1.0, args.curve > 1, args, out)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="step budget of every run")
    ap.add_argument("--seconds", type=float, default=None, help="wall-clock training budget of every run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), help="the arms to run (default: all)")
    ap.add_argument("--curve", type=int, default=4, help="5-way 1-shot at this many points of each run")
    grid_arguments(ap, out="runs/claims", doc="docs/results.md")
    args = ap.parse_args(argv)
    if (args.steps is None) == (args.seconds is None):
        ap.error("give one budget: --steps N or --seconds S")
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        ap.error(f"unknown arm(s) {unknown}; allowed: {list(ARMS)}")
    args.cpu_seconds = None  # launch_run's budget options
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skipped_file = out / "skipped.json"
    skipped: dict[str, str] = json.loads(skipped_file.read_text()) if skipped_file.exists() else {}
    if not args.report_only:
        skipped = {}
        for a in args.arms:
            why = preflight_overrides(ARMS[a], args.extra)
            if why:
                skipped[a] = why
                print(f"[claims] skip {a}: {why}", flush=True)
        skipped_file.write_text(json.dumps(skipped, indent=1))
    # seed by seed, so a grid cut short has the most complete pairs
    todo = [(a, s) for s in args.seeds for a in args.arms if a not in skipped]
    todo = [(a, s) for a, s in todo if not (run_dir(out, a, s) / "result.json").exists()]
    print(f"[claims] {len(todo)} runs to make", flush=True)
    if args.dry_run:
        for a, s in todo:
            print(f"  {run_dir(out, a, s).name}: {' '.join(ARMS[a])} seed={s}")
        return
    if not args.report_only:
        todo = todo if args.max_runs is None else todo[: args.max_runs]
        if args.jobs > 1 and not args.threads:
            args.threads = max(1, (os.cpu_count() or 1) // args.jobs)
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # each run is its own process
            list(pool.map(lambda t: run(t, args, out), todo))
    print(report(args, [a for a in ARMS if a in args.arms], skipped, out))


if __name__ == "__main__":
    main()
