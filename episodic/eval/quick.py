"""End-of-run evaluation: linear probe and few-shot episodes, trained vs randomly initialised encoder.

Writes ``results.json`` in the run directory::

    {"linear": {"trained": a, "random_init": b},
     "fewshot": {"5way1shot": {"trained": {"mean": m, "ci95": c}, "random_init": {...}}, ...}}

The random-init baseline is an encoder of the same architecture built from the same seed, i.e.
exactly the trained encoder's starting point.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from episodic.data.datasets import ArrayDataset, Splits
from episodic.errors import EpisodicError
from episodic.eval.features import extract_features, labelled
from episodic.eval.fewshot import fewshot_accuracy, fewshot_source, sample_episodes
from episodic.eval.linear import linear_probe
from episodic.heads.protonet import ProtoNetHead


def fewshot_set(data: Splits, cfg: DictConfig) -> ArrayDataset:
    """Labeled images of the few-shot classes (``data.fewshot_classes`` from ``data.fewshot_split``)."""
    return fewshot_source(data, cfg.data)


def check_quick_eval(data: Splits, cfg: DictConfig) -> None:
    """The end-of-run few-shot episodes can be drawn from this data: checked before training, so that a
    setting the data cannot meet ends the run before its work, not after it."""
    fs, ev = fewshot_set(data, cfg), cfg.eval.fewshot
    for shot in ev.shots:
        try:
            sample_episodes(fs.labels, int(ev.ways), int(shot), int(ev.queries), 2)
        except EpisodicError as e:
            raise EpisodicError(f"eval.fewshot (end of run): {e}") from None


def evaluate_encoder(backbone: nn.Module, data: Splits, cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    """Linear-probe accuracy and few-shot accuracies (%) of one frozen backbone."""
    ev = cfg.eval
    norm = dict(mean=cfg.data.augment.get("mean"), std=cfg.data.augment.get("std"))
    out: dict[str, Any] = {}
    train, test = labelled(data.train), labelled(data.test)
    # a linear probe needs the test classes among the training classes (not so for Omniglot's splits)
    if ev.linear and bool(torch.isin(test.labels, train.labels).all()):
        ftr = extract_features(backbone, train.images, device=device, **norm)
        fte = extract_features(backbone, test.images, device=device, **norm)
        out["linear"] = linear_probe(ftr, train.labels, fte, test.labels)
    fs = fewshot_set(data, cfg)
    feats = extract_features(backbone, fs.images, device=device, **norm)
    head = ProtoNetHead(temperature=1.0, metric="cosine")
    out["fewshot"] = {}
    for shot in ev.fewshot.shots:
        r = fewshot_accuracy(
            feats, fs.labels, head, ev.fewshot.ways, shot, ev.fewshot.queries, ev.fewshot.episodes, seed=ev.fewshot.seed
        )
        out["fewshot"][f"{ev.fewshot.ways}way{shot}shot"] = r.as_dict()
    return out


def quick_eval(
    trained: nn.Module,
    random_init: nn.Module,
    data: Splits,
    cfg: DictConfig,
    device: torch.device,
    run_dir: Path,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate both backbones, write ``results.json`` (with ``extra``: what monitors measured during
    training), return the results dict."""
    a = evaluate_encoder(trained, data, cfg, device)
    b = evaluate_encoder(random_init, data, cfg, device) if cfg.eval.baseline else None
    res: dict[str, Any] = dict(extra or {})
    if "linear" in a:
        res["linear"] = {"trained": a["linear"], "random_init": b["linear"] if b else None}
    res["fewshot"] = {k: {"trained": v, "random_init": b["fewshot"][k] if b else None} for k, v in a["fewshot"].items()}
    path = run_dir / "results.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**old, **res}, indent=2))
    return res


def format_table(res: dict[str, Any], title: str = "") -> str:
    """A plain-text table of ``res`` (trained vs random init)."""
    from episodic.eval.report import format_rows

    rows = []
    if "linear" in res:
        rows.append(("linear probe", res["linear"]["trained"], res["linear"]["random_init"]))
    rows += [(k, v["trained"], v["random_init"]) for k, v in res["fewshot"].items()]
    table = format_rows(rows, title)
    online = res.get("online_probe", {}).get("test_acc")
    if online is not None:  # not a row of the table: no random-init twin, and another protocol
        table += f"\nonline linear probe (trained alongside, not the offline probe above): test {online:.1f}%"
    return table
