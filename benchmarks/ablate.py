"""The heads x task rotation x variants grid on unsupervised few-shot Omniglot, into ``docs/results_60steps.md``.

    python benchmarks/ablate.py --steps 400 --seeds 0 1 2               # the whole grid, then the report
    python benchmarks/ablate.py --steps 400 --seeds 0 1 2 --max-runs 6  # the next 6 missing runs only
    python benchmarks/ablate.py --steps 400 --seeds 0 1 2 --report-only # rewrite the report from what exists

The grid: heads {contrastive, protonet, r2d2, svm} x task rotation {off, on} x variants {none, debiased,
t_kernel} x seeds, every run at the same budget (``--steps``, ``--seconds`` and/or ``--cpu-seconds``, as in
``benchmarks/omniglot_fewshot.py``, which runs each cell in its own process), plus the base configuration
of every head (rotation off, no variant) at the fractions ``--budgets`` of the budget for the plot (or,
with ``--curve K`` and no ``--budgets``, the 5-way 1-shot accuracy that each base run measures at K points
of its own budget: no extra runs). Extra Hydra overrides after ``--`` go to every run (e.g.
``-- n_query=3 batch_size=128``). ``--jobs N`` runs N cells at a time, each on ``cores / N`` threads
(small Conv4 steps use two cores poorly, so two one-thread runs finish the grid sooner than one at a time).

Incremental and resumable: a run whose ``OUT/<run>/result.json`` exists is skipped, so the grid can be
run in pieces (``--max-runs``) and an interrupted grid continues where it stopped. Before running, every
(head, rotation, variant) combination is tried for one step on a tiny digits episode; combinations
whose pieces do not exist yet (no config, unknown registry name) or that the framework refuses are
skipped and listed in the report with the one-line reason.

The report: the exact command at the top; a table of the mean and 95% interval over seeds
(Student t, ``n - 1`` degrees of freedom) of every setting; the claims of the seed papers at this scale,
each decided from paired differences over seeds ("helps": the interval of the 5-way 1-shot difference
lies above 0; "hurts": below; "inconclusive": it contains 0; "~": the mean difference is within
``--margin`` points); and ``docs/results_budget.png``, 5-way 1-shot accuracy against the budget per head.
Every number comes from a ``result.json`` this script's runs wrote.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "omniglot_fewshot.py"
SETTINGS = ["5way1shot", "5way5shot", "20way1shot", "20way5shot"]
LABELS = {
    "5way1shot": "5-way 1-shot",
    "5way5shot": "5-way 5-shot",
    "20way1shot": "20-way 1-shot",
    "20way5shot": "20-way 5-shot",
}
UMTRA = {"5way1shot": 83.8, "5way5shot": 95.4, "20way1shot": 74.3, "20way5shot": 92.1}
ROTATION = "task.augment=[rotate]"
VARIANTS = {"none": [], "debiased": ["variant=debiased"], "t_kernel": ["variant=t_kernel"]}
PREFLIGHT = [
    "data=digits",
    "backbone=conv4",
    "backbone.params.width=8",
    "backbone.projector.hidden_dim=16",
    "backbone.projector.out_dim=8",
    "batch_size=16",
    "train.steps=2",
    "train.progress=false",
    "device=cpu",
]


@dataclass(frozen=True)
class Cell:
    """One configuration of the grid (every seed of it shares the same overrides)."""

    head: str
    rotation: bool
    variant: str

    @property
    def tag(self) -> str:
        return f"{self.head}__rot-{'on' if self.rotation else 'off'}__var-{self.variant}"

    @property
    def label(self) -> str:
        parts = [self.head, "rotation" if self.rotation else "", "" if self.variant == "none" else self.variant]
        return " + ".join(p for p in parts if p)

    def overrides(self, rotation: str) -> list[str]:
        return [f"head={self.head}", *([rotation] if self.rotation else []), *VARIANTS[self.variant]]


# ------------------------------------------------------------------------------------------- statistics
def t_half_width(values: Sequence[float]) -> float:
    """Half-width of the 95% Student-t interval of the mean (nan for fewer than two values)."""
    n = len(values)
    if n < 2:
        return float("nan")
    from scipy.stats import t

    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def fmt(values: Sequence[float]) -> str:
    if not values:
        return "-"
    h = t_half_width(values)
    return f"{mean(values):.1f} ± {h:.1f}" if not math.isnan(h) else f"{mean(values):.1f} (1 seed)"


def compare(a: dict[int, float], b: dict[int, float], margin: float, kind: str) -> tuple[str, str]:
    """Verdict and numbers for ``a`` vs ``b`` (per-seed accuracies), paired over their common seeds."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return "not enough seeds", f"{len(seeds)} common seed(s)"
    d = [a[s] - b[s] for s in seeds]
    m, h = mean(d), t_half_width(d)
    nums = f"{m:+.1f} [{m - h:+.1f}, {m + h:+.1f}] points, n={len(seeds)}"
    if kind == "similar":
        return ("held" if abs(m) <= margin else f"did not hold ({'better' if m > 0 else 'worse'})"), nums
    if m - h > 0:
        return "held", nums
    if m + h < 0:
        return "did not hold (hurts)", nums
    return "inconclusive", nums


# ------------------------------------------------------------------------------------------- running
def run_dir(out: Path, cell: Cell, seed: int, fraction: float) -> Path:
    suffix = "" if fraction == 1.0 else f"__budget-{fraction:g}"
    return out / f"{cell.tag}__seed{seed}{suffix}"


def preflight(cell: Cell, rotation: str, extra: Sequence[str]) -> str | None:
    """``None`` if ``cell`` trains for one step on a tiny digits episode, else the one-line reason."""
    from episodic.cli import group_options

    if f"{cell.head}" not in group_options("head"):
        return f"no head {cell.head!r}"
    if cell.variant != "none" and cell.variant not in group_options("variant"):
        return f"no variant {cell.variant!r}"
    return preflight_overrides(cell.overrides(rotation), extra)


def preflight_overrides(overrides: Sequence[str], extra: Sequence[str]) -> str | None:
    """``None`` if ``overrides`` train for one step on a tiny digits episode, else the one-line reason."""
    import tempfile

    from episodic.cli import compose_config
    from episodic.config import validate
    from episodic.engine import Trainer, check_config
    from episodic.errors import EpisodicError

    overrides = [*PREFLIGHT, *overrides, *[e for e in extra if not e.startswith("data")]]
    try:
        cfg = compose_config("train", overrides)
        validate(cfg)
        check_config(cfg)
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(cfg, tmp)
            trainer.train_step(trainer.train_set.images[: cfg.batch_size])
    except EpisodicError as e:
        return str(e).strip().splitlines()[0]
    return None


def launch(cell: Cell, seed: int, fraction: float, args: argparse.Namespace, out: Path) -> bool:
    """Run one cell in its own process; ``True`` when its ``result.json`` was written."""
    curve = args.curve > 1 and fraction == 1.0 and not cell.rotation and cell.variant == "none"
    overrides = [*cell.overrides(args.rotation_override), f"seed={seed}"]
    return launch_run(run_dir(out, cell, seed, fraction), overrides, fraction, curve, args, out)


def launch_run(
    rd: Path, overrides: Sequence[str], fraction: float, curve: bool, args: argparse.Namespace, out: Path
) -> bool:
    """``benchmarks/omniglot_fewshot.py`` into ``rd`` at ``fraction`` of the budget in its own process
    (``args``: the budget, episodes, threads and extra overrides); ``True`` when ``result.json`` was written."""
    rd.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        str(BENCH),
        "--out",
        str(rd),
        "--name",
        rd.name,
        "--episodes",
        str(args.episodes),
        "--random-init-cache",
        str(out / "random_init"),
    ]
    if args.steps is not None:
        cmd += ["--steps", str(max(1, round(args.steps * fraction)))]
    if args.seconds is not None:
        cmd += ["--seconds", str(args.seconds * fraction)]
    if args.cpu_seconds is not None:
        cmd += ["--cpu-seconds", str(args.cpu_seconds * fraction)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if curve:
        cmd += ["--curve", str(args.curve)]
    cmd += [*overrides, *args.extra]
    print(f"[run] {rd.name}: {' '.join(shlex.quote(c) for c in cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    with open(rd / "log.txt", "w") as log:
        p = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    ok = p.returncode == 0 and (rd / "result.json").exists()
    if not ok:
        tail = (rd / "log.txt").read_text().strip().splitlines()[-1:] or ["(no output)"]
        (rd / "failed.txt").write_text(f"exit {p.returncode}: {tail[0]}\n")
        print(f"[run]   failed (exit {p.returncode}): {tail[0]}", flush=True)
    else:
        (rd / "failed.txt").unlink(missing_ok=True)
        r = json.loads((rd / "result.json").read_text())
        print(
            f"[run]   {r['steps']} steps, {r['train_seconds']:.0f} s train, "
            f"{time.perf_counter() - t0:.0f} s total: 5w1s {r['fewshot']['5way1shot']['mean']:.1f}",
            flush=True,
        )
    return ok


# ------------------------------------------------------------------------------------------- report
def load(out: Path, cell: Cell, seeds: Sequence[int], fraction: float) -> dict[int, dict[str, Any]]:
    res = {}
    for s in seeds:
        p = run_dir(out, cell, s, fraction) / "result.json"
        if p.exists():
            res[s] = json.loads(p.read_text())
    return res


def acc(runs: dict[int, dict[str, Any]], setting: str = "5way1shot", field: str = "fewshot") -> dict[int, float]:
    return {s: r[field][setting]["mean"] for s, r in runs.items()}


def display_command(argv: Sequence[str]) -> str:
    """The invocation without the options that only decide how much runs now and how many at a time
    (``--max-runs``, ``--jobs``, ``--report-only``, ``--dry-run``: the same report either way)."""
    keep, skip = [], 0
    for a in argv:
        if skip:
            skip -= 1
            continue
        if a in ("--max-runs", "--jobs"):
            skip = 1
            continue
        if a in ("--report-only", "--dry-run") or a.startswith(("--max-runs=", "--jobs=")):
            continue
        keep.append(a)
    return " ".join(["python", "benchmarks/ablate.py", *(shlex.quote(a) for a in keep)])


def curve_points(runs: dict[int, dict[str, Any]], field: str) -> tuple[list[float], list[float], list[float]]:
    """Mean budget used, mean and 95% interval over seeds of 5-way 1-shot at each point of the runs' curves."""
    key = {"training steps": "step", "training seconds": "seconds"}.get(field, "step")
    n = min((len(r.get("curve", [])) for r in runs.values()), default=0)
    xs, ys, es = [], [], []
    for i in range(n):
        pts = [r["curve"][i] for r in runs.values()]
        v = [p["5way1shot"]["mean"] for p in pts]
        h = t_half_width(v)
        xs.append(mean([p[key] for p in pts])), ys.append(mean(v)), es.append(0.0 if math.isnan(h) else h)
    return xs, ys, es


def plot(
    path: Path, out: Path, heads: Sequence[str], seeds: Sequence[int], fractions: Sequence[float], budget_label: str
) -> bool:
    """5-way 1-shot against the budget per head: separate runs at ``fractions`` of it, or in-run curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for head in heads:
        xs, ys, es = [], [], []
        # no separate budget runs: the curves the full runs measured on the way
        curves = len(fractions) == 1
        if curves:
            xs, ys, es = curve_points(load(out, Cell(head, False, "none"), seeds, 1.0), budget_label)
        for f in [] if curves else sorted(fractions):
            runs = load(out, Cell(head, False, "none"), seeds, f)
            if not runs:
                continue
            field = {
                "training steps": "steps",
                "training seconds": "train_seconds",
                "training CPU seconds": "train_cpu_seconds",
            }[budget_label]
            steps = [r[field] for r in runs.values()]
            v = list(acc(runs).values())
            h = t_half_width(v)
            xs.append(mean(steps)), ys.append(mean(v)), es.append(0.0 if math.isnan(h) else h)
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=head)
            drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.axhline(UMTRA["5way1shot"], color="gray", ls="--", lw=1, label="UMTRA (published)")
    ax.set_xlabel(budget_label)
    ax.set_ylabel("5-way 1-shot accuracy (%)")
    ax.set_title("Unsupervised few-shot Omniglot, mean ± 95% CI over seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def report(
    args: argparse.Namespace, cells: Sequence[Cell], skipped: dict[Cell, str], out: Path, argv: Sequence[str]
) -> str:
    budget = " and ".join(
        x
        for x in [
            f"{args.steps} steps" if args.steps else "",
            f"{args.seconds:g} s of training" if args.seconds else "",
            f"{args.cpu_seconds:g} CPU s of training" if args.cpu_seconds else "",
        ]
        if x
    )
    evaluated = "the 423 Vinyals test characters x 4 rotations (1,692 classes)"
    for cell in cells:
        any_run = next(iter(load(out, cell, args.seeds, 1.0).values()), None)
        if any_run is not None:
            ev, bb = any_run["eval"], any_run["config"]["backbone"]["name"]
            evaluated = f"the {ev['classes']} classes of the Vinyals {ev['split']} split ({bb} backbone)"
            break
    lines = [
        "# Unsupervised few-shot Omniglot: heads, task rotation and variants",
        "",
        "Produced by (every number below comes from a run this command made):",
        "",
        "```",
        display_command(argv),
        "```",
        "",
        f"Protocol: train without labels on the Vinyals train characters, budget {budget} per run "
        f"(whichever ends first); test on {evaluated}, "
        f"ProtoNet (cosine) on frozen features, 15 queries per class, {args.episodes} episodes per setting. "
        f"Cells: mean ± 95% interval over seeds (Student t); seeds {', '.join(map(str, args.seeds))}. "
        f"Extra overrides for every run: {' '.join(f'`{e}`' for e in args.extra) or 'none'}.",
        "",
        "| configuration | seeds | steps | train s | "
        + " | ".join(LABELS[s] for s in SETTINGS)
        + " | beats UMTRA on all 4 |",
        "|---|---:|---:|---:|" + "---:|" * len(SETTINGS) + "---|",
    ]
    all_runs: dict[Cell, dict[int, dict[str, Any]]] = {}
    baseline: dict[int, dict[str, Any]] = {}
    for cell in cells:
        runs = load(out, cell, args.seeds, 1.0)
        all_runs[cell] = runs
        if not runs:
            continue
        for s, r in runs.items():
            baseline.setdefault(s, r)
        means = {k: mean(list(acc(runs, k).values())) for k in SETTINGS}
        beats = "yes" if all(means[k] > UMTRA[k] for k in SETTINGS) else "no"
        lines.append(
            f"| {cell.label} | {len(runs)} | {mean([r['steps'] for r in runs.values()]):.0f} | "
            f"{mean([r['train_seconds'] for r in runs.values()]):.0f} | "
            + " | ".join(fmt(list(acc(runs, k).values())) for k in SETTINGS)
            + f" | {beats} |"
        )
    if baseline:
        lines.append(
            f"| random init (same seeds) | {len(baseline)} | 0 | 0 | "
            + " | ".join(fmt(list(acc(baseline, k, "random_init").values())) for k in SETTINGS)
            + " | no |"
        )
    lines += [
        "",
        f"UMTRA's published accuracies ({' / '.join(str(UMTRA[k]) for k in SETTINGS)}, not run here) "
        "are the bar of the last column.",
        "",
    ]

    lines += [
        "## The seed papers' claims at this scale",
        "",
        f'5-way 1-shot, paired over seeds; "~" holds when the mean difference is within ±{args.margin:g} '
        'points, "helps" when the 95% interval of the difference lies above 0.',
        "",
        "| claim | comparison | verdict | difference [95% interval] |",
        "|---|---|---|---|",
    ]

    def row(claim: str, a: Cell, b: Cell, kind: str) -> None:
        if not all_runs.get(a) or not all_runs.get(b):
            return
        verdict, nums = compare(acc(all_runs[a]), acc(all_runs[b]), args.margin, kind)
        lines.append(f"| {claim} | {a.label} vs {b.label} | {verdict} | {nums} |")

    heads = sorted({c.head for c in cells}, key=[c.head for c in cells].index)
    for h in ("r2d2", "protonet"):
        base = Cell("contrastive", False, "none")
        row("R2D2/ProtoNet ~ contrastive", Cell(h, False, "none"), base, "similar")
    for h in heads:
        for v in VARIANTS:
            row("task rotation helps", Cell(h, True, v), Cell(h, False, v), "helps")
    for name, v in (("debiased helps", "debiased"), ("t-kernel helps", "t_kernel")):
        for h in heads:
            for rot in (False, True):
                row(name, Cell(h, rot, v), Cell(h, rot, "none"), "helps")
    lines.append("")

    png = Path(args.doc).with_name(Path(args.doc).stem + "_budget.png")
    label = "training steps" if args.steps else "training seconds" if args.seconds else "training CPU seconds"
    fractions = ", ".join(f"{f:g}" for f in sorted({*args.budgets, 1.0}))
    if plot(png, out, heads, args.seeds, sorted({*args.budgets, 1.0}), label):
        how = (
            f"at {fractions} of the budget, each point its own run (cosine schedule over that budget)"
            if args.budgets
            else "during its run (500 episodes per point, the last point is the final "
            f"{args.episodes}-episode evaluation)"
        )
        lines += [
            "## Accuracy against budget",
            "",
            f"Base configuration of each head (no rotation, no variant), 5-way 1-shot {how}.",
            "",
            f"![5-way 1-shot accuracy against the budget]({png.name})",
            "",
        ]
    missing = list(skipped.items())
    incomplete = [c for c in cells if c not in skipped and len(all_runs.get(c, {})) < len(args.seeds)]
    if missing or incomplete:
        lines += ["## Not run", ""]
        lines += [f"- {c.label}: skipped, {why}" for c, why in missing]
        for c in incomplete:
            have = sorted(all_runs.get(c, {}))
            failed = [s for s in args.seeds if (run_dir(out, c, s, 1.0) / "failed.txt").exists()]
            note = f"; failed: seeds {failed} (see {out.name}/<run>/log.txt)" if failed else ""
            lines.append(f"- {c.label}: {len(have)} of {len(args.seeds)} seeds so far{note}")
        lines.append("")
    text = "\n".join(lines)
    doc = Path(args.doc)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    return text


# ------------------------------------------------------------------------------------------- main
def grid_arguments(ap: argparse.ArgumentParser, out: str, doc: str) -> None:
    """The options of a resumable grid of runs: how many at a time, evaluation, where, and the overrides."""
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (each on cores / jobs threads)")
    ap.add_argument("--episodes", type=int, default=2000)
    ap.add_argument("--margin", type=float, default=1.0, help="points within which two settings count as on par")
    ap.add_argument("--out", default=out)
    ap.add_argument("--doc", default=doc)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the report from existing results")
    ap.add_argument("--dry-run", action="store_true", help="list the runs that would be made")
    ap.add_argument("extra", nargs="*", help="Hydra overrides for every run (after --)")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="step budget of every run")
    ap.add_argument("--seconds", type=float, default=None, help="wall-clock training budget of every run")
    ap.add_argument("--cpu-seconds", type=float, default=None, help="process CPU-time training budget of every run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--heads", nargs="+", default=["contrastive", "protonet", "r2d2", "svm"])
    ap.add_argument("--rotation", nargs="+", default=["off", "on"], choices=["off", "on"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--rotation-override", default=ROTATION, help="the override that turns task rotation on")
    ap.add_argument(
        "--budgets",
        type=float,
        nargs="*",
        default=[0.25, 0.5],
        help="extra budget fractions for the base configuration of every head (the plot)",
    )
    ap.add_argument(
        "--curve",
        type=int,
        default=0,
        help="base runs evaluate 5-way 1-shot at this many points of their budget (the plot)",
    )
    grid_arguments(ap, out="runs/ablate", doc="docs/results_60steps.md")
    args = ap.parse_args(argv)
    if args.steps is None and args.seconds is None and args.cpu_seconds is None:
        ap.error("give a budget: --steps N, --seconds S and/or --cpu-seconds C")
    if any(not 0 < f <= 1 for f in args.budgets):
        ap.error(f"--budgets are fractions of the budget in (0, 1], got {args.budgets}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out = Path(args.out)
    cells = [Cell(h, r == "on", v) for r in args.rotation for v in args.variants for h in args.heads]
    skipped: dict[Cell, str] = {}
    if not args.report_only:
        for c in cells:
            why = preflight(c, args.rotation_override, args.extra)
            if why:
                skipped[c] = why
                print(f"[ablate] skip {c.label}: {why}", flush=True)
    else:
        prev = out / "skipped.json"
        if prev.exists():
            known = {c.tag: c for c in cells}
            skipped = {known[t]: why for t, why in json.loads(prev.read_text()).items() if t in known}
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        (out / "skipped.json").write_text(json.dumps({c.tag: why for c, why in skipped.items()}, indent=1))
    # seed by seed; within a seed the base cells (no variant) first, so a grid cut short still has
    # the most seeds where the head and rotation claims are decided
    todo = [
        (c, s, 1.0) for s in args.seeds for c in sorted(cells, key=lambda c: c.variant != "none") if c not in skipped
    ]
    todo += [
        (Cell(h, False, "none"), s, f)
        for f in sorted(set(args.budgets) - {1.0})
        for s in args.seeds
        for h in args.heads
        if Cell(h, False, "none") not in skipped
    ]
    todo = [t for t in todo if not (run_dir(out, *t) / "result.json").exists()]
    print(f"[ablate] {len(todo)} runs to make", flush=True)
    if args.dry_run:
        for c, s, f in todo:
            print(f"  {run_dir(out, c, s, f).name}")
        return
    if not args.report_only:
        if args.max_runs is not None and len(todo) > args.max_runs:
            print(f"[ablate] making {args.max_runs} of them (--max-runs); run again to continue", flush=True)
            todo = todo[: args.max_runs]
        if args.jobs > 1 and not args.threads:
            args.threads = max(1, (os.cpu_count() or 1) // args.jobs)
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # each run is its own process
            list(pool.map(lambda t: launch(*t, args, out), todo))
    print(report(args, cells, skipped, out, argv))


if __name__ == "__main__":
    main()
