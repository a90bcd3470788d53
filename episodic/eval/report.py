"""Results of ``python -m episodic.eval``: appended to the run's ``results.json`` and printed as a table.

``results.json`` keeps the end-of-run keys (``linear``, ``fewshot``) written by training and gains
a list ``evaluations``; each protocol run appends one record::

    {"protocol": "fewshot", "checkpoint": "...", "step": 300, "data": "digits",
     "time": "2025-01-01T12:00:00", "settings": {...the eval config...}, "results": {...}}

The file is rewritten atomically (temporary file + rename), so an interrupted write never leaves
half a file.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any


def append_result(path: str | Path, record: dict[str, Any]) -> dict[str, Any]:
    """Append ``record`` to ``evaluations`` in the JSON file ``path`` (created if missing); the new content."""
    path = Path(path)
    old = json.loads(path.read_text()) if path.is_file() and path.stat().st_size else {}
    old.setdefault("evaluations", []).append({"time": datetime.datetime.now().isoformat(timespec="seconds"), **record})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(old, indent=2))
    os.replace(tmp, path)
    return old


def result_rows(protocol: str, res: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(metric, trained, random_init)`` rows of one protocol's results."""
    if protocol == "linear":
        s = res.get("settings", {})
        return [(f"linear probe ({s.get('optimizer')}, aug {s.get('aug')})", res["trained"], res["random_init"])]
    if protocol == "semi":
        return [
            (f"{name} labels ({r['labels']} images, {r['steps']} steps)", r["trained"], r["random_init"])
            for name, r in res.items()
        ]
    if protocol == "knn":
        return [
            (f"kNN k={k[1:]} T={res['temperature']:g}", r["trained"], r["random_init"])
            for k, r in res.items()
            if k != "temperature"
        ]
    if protocol == "fewshot":
        return [(f"{head} {key}", r["trained"], r["random_init"]) for head, by in res.items() for key, r in by.items()]
    raise KeyError(protocol)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, dict):
        return f"{v['mean']:.1f} ± {v['ci95']:.1f}"
    return f"{v:.1f}"


def format_rows(rows: list[tuple[str, Any, Any]], title: str = "") -> str:
    """A plain-text table: metric, trained, random init."""
    w = max([len(r[0]) for r in rows] + [len("metric (%)")])
    lines = [title] if title else []
    lines.append(f"{'metric (%)':<{w}}  {'trained':>13}  {'random init':>13}")
    lines += [f"{n:<{w}}  {_cell(a):>13}  {_cell(b):>13}" for n, a, b in rows]
    return "\n".join(lines)
