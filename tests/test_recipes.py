"""Recipes (configs/experiment): published settings at full scale, and every recipe trains in its
``+scale=cpu_smoke`` form."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from episodic.engine import Trainer
from episodic.train import train
from helpers import ROOT, make_cfg

# the settings omniglot_moco and omniglot_psco share; omniglot_moco adds the milder affine map (chosen on val)
OMNIGLOT_MOCO_QUEUE = {
    "data.name": "omniglot",
    "sampler.name": "views",
    "method.name": "moco",
    "method.params.momentum": 0.99,
    "method.params.queue_size": 4096,
    "head.name": "contrastive",
    "head.params.temperature": 0.2,
    "head.params.symmetric": False,
    "task.augment": ["query_mix"],
    "n_supp": 1,
    "n_query": 1,
}
OMNIGLOT_MOCO = {
    **OMNIGLOT_MOCO_QUEUE,
    "data.augment.degrees": 10.0,
    "data.augment.shear": 10.0,
    "data.augment.translate": 0.07,
}
# what each recipe must compose to at full scale (the sources are in each file's header and the README)
PUBLISHED: dict[str, dict[str, object]] = {
    "metacontrastive_simclr": {
        "data.name": "cifar10",
        "backbone.name": "resnet50",
        "backbone.params.cifar_stem": True,
        "head.name": "contrastive",
        "head.params.temperature": 0.5,
        "method.name": "simclr",
        "batch_size": 1024,
        "optim.optimizer.name": "lars",
        "optim.optimizer.lr": 4.0,
        "optim.optimizer.weight_decay": 1e-6,
        "train.steps": 48000,
        "variant": {},
    },
    "metacontrastive_protonet": {
        "head.name": "protonet",
        "head.params.temperature": 0.5,
        "batch_size": 1024,
        "optim.optimizer.lr": 4.0,
        "train.steps": 48000,
    },
    "metacontrastive_r2d2": {
        "head.name": "r2d2",
        "head.params.lam": 5.0,
        "head.params.learn_scale": False,
        "batch_size": 1024,
        "train.steps": 48000,
    },
    "metacontrastive_byol": {
        "method.name": "byol",
        "backbone.name": "resnet18",
        "backbone.params.cifar_stem": True,
        "task.augment": ["rotate"],
        "task.rotate.p": 0.25,
        "method.params.momentum": 0.99,
    },
    "dcl": {
        "data.name": "stl10",
        "data.augment.size": 32,
        "backbone.params.cifar_stem": True,
        "backbone.projector.hidden_dim": 512,
        "head.params.temperature": 0.5,
        "head.params.symmetric": True,
        "variant.debiased.tau_plus": 0.1,
        "batch_size": 256,
        "optim.optimizer.name": "adam",
        "optim.optimizer.lr": 1e-3,
        "optim.optimizer.weight_decay": 1e-6,
        "optim.schedule.schedule": "constant",
        "train.steps": 400 * (105000 // 256),
    },
    "t_moco_v2": {
        "data.name": "imagefolder",
        "data.augment.size": 224,
        "backbone.name": "resnet50",
        "method.name": "moco",
        "method.params.queue_size": 65536,
        "method.params.momentum": 0.999,
        "head.params.temperature": 0.2,
        "head.params.symmetric": False,
        "variant.t_kernel.dof": 5,
        "variant.t_kernel.standardize": "bn",
        "batch_size": 256,
        "optim.optimizer.lr": 0.03,
        "optim.optimizer.weight_decay": 1e-4,
        "train.steps": 200 * 5004,
    },
    "t_simclr": {"method.name": "simclr", "variant.t_kernel.dof": 5, "variant.t_kernel.standardize": "bn"},
    "snclr": {
        "data.name": "cifar10",
        "backbone.name": "resnet18",
        "method.params.queue_size": 0,
        "method.params.symmetric": True,
        "method.params.momentum": 0.99,
        "variant.soft_neighbors.k": 5,
        "variant.soft_neighbors.bank_size": 4096,
        "head.params.temperature": 0.2,
        "batch_size": 256,
        "train.steps": 200 * (50000 // 256),
    },
    "ft_moco": {
        "method.name": "moco",
        "method.params.queue_size": 65536,
        "head.params.temperature": 0.2,
        "variant.feature_transform.alpha_pos": 2.0,
        "variant.feature_transform.alpha_neg": 1.6,
        "optim.optimizer.lr": 0.03,
        "batch_size": 256,
        "train.steps": 200 * 5004,
    },
    # this project's Omniglot recipe (tuned on the Vinyals val split, README "Omniglot")
    "omniglot_unsup": {
        "data.name": "omniglot",
        "backbone.name": "conv4",
        "head.name": "contrastive",
        "head.params.temperature": 0.1,
        "method.name": "simclr",
        "task.augment": ["rotate"],
        "data.augment.degrees": 10.0,
        "data.augment.shear": 10.0,
        "data.augment.translate": 0.07,
        "data.augment.affine_p": 0.8,
        "n_supp": 1,
        "n_query": 2,
        "batch_size": 256,
        "variant": {},
        "train.steps": 2860,
    },
    # MoCo's queue with the default episodes on Omniglot (the best row of the val table, docs/benchmarks.md)
    "omniglot_moco": OMNIGLOT_MOCO,
    # PsCo's pseudo-shots on Omniglot (chosen on the val split, docs/benchmarks.md): the shared settings and the sampler
    "omniglot_psco": {**OMNIGLOT_MOCO_QUEUE, "sampler.name": "psco", "sampler.params.shots": 4},
}
RECIPES = sorted(PUBLISHED)
FAST = ["train.steps=2", "eval.fewshot.episodes=10", "eval.linear=false", "eval.baseline=false"]


def test_every_recipe_is_listed_and_documented() -> None:
    assert sorted(p.stem for p in (ROOT / "episodic" / "configs" / "experiment").glob("*.yaml")) == RECIPES
    doc = (ROOT / "docs" / "recipes.md").read_text()
    for name in RECIPES:
        assert f"+experiment={name}" in doc, name


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_has_the_published_settings(name: str) -> None:
    cfg = make_cfg(f"+experiment={name}")
    for key, value in PUBLISHED[name].items():
        got = OmegaConf.select(cfg, key)
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        assert got == value, f"{name}: {key} = {got!r}, expected {value!r}"


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_smoke_trains(tmp_path: Path, name: str) -> None:
    cfg = make_cfg(f"+experiment={name}", "+scale=cpu_smoke", *FAST)
    assert cfg.data.name == "digits" and cfg.backbone.name == "conv4"
    trainer = Trainer(cfg, tmp_path)
    trainer.fit()
    assert [r["step"] for r in trainer.history][-1] == 2
    assert all(math.isfinite(r["loss"]) for r in trainer.history)


def test_recipe_smoke_end_to_end_writes_results(tmp_path: Path) -> None:
    res = train(make_cfg("+experiment=t_moco_v2", "+scale=cpu_smoke", *FAST), tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["fewshot"]["5way1shot"]["trained"] == res["fewshot"]["5way1shot"]["trained"]
    assert 0 <= saved["fewshot"]["5way1shot"]["trained"]["mean"] <= 100


def test_memory_cap_bounds_every_memory() -> None:
    """memory_cap bounds MoCo's queue and the soft-neighbour bank of the built model, nothing else."""
    from episodic.model import build_model, capped

    assert capped({"queue_size": 65536, "momentum": 0.999}, 1024) == {"queue_size": 1024, "momentum": 0.999}
    assert capped({"queue_size": 512}, 1024) == {"queue_size": 512}
    assert capped({"queue_size": 65536}, None) == {"queue_size": 65536}
    model = build_model(make_cfg("+experiment=snclr", "+scale=cpu_smoke", "method.params.queue_size=4096"))
    assert model.method.queue_size == 1024
    assert len(model.head.variants["soft_neighbors"].bank.rows) == 1024


@pytest.mark.slow
def test_smoke_scale_learns(tmp_path: Path) -> None:
    """The smoke form of a recipe is a real, if small, run: metacontrastive_r2d2 at +scale=cpu_smoke (600
    steps) ends above its random-init twin at 5-way 1-shot with non-overlapping 95% intervals (80 vs 54 on
    seed 0; every recipe and three seeds: benchmarks/smoke_recipes.py, docs/recipes.md)."""
    res = train(make_cfg("+experiment=metacontrastive_r2d2", "+scale=cpu_smoke", "eval.linear=false"), tmp_path)
    one = res["fewshot"]["5way1shot"]
    assert one["trained"]["mean"] - one["trained"]["ci95"] > one["random_init"]["mean"] + one["random_init"]["ci95"]
