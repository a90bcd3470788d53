"""Configuration: every schema refuses a wrong type, an out-of-range value and a misspelt key with one
``error:`` line and exit code 2 through the real entry points (in this process: the checks run before
Hydra starts any job), and no YAML file restates a default the schemas already hold."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import pytest
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from episodic.config import EVAL_PROTOCOLS, ROOTS, _components, params_schema, register
from helpers import ROOT

CONFIGS = ROOT / "episodic" / "configs"
PRIMITIVE = (int, float, bool)


def run_entry(module: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The entry point's ``main()`` on ``argv``: it must exit 2 with one ``error:`` line; that line."""
    import importlib

    main = importlib.import_module(module + (".__main__" if module == "episodic.eval" else "")).main
    old = sys.argv
    sys.argv = [module, *argv]
    try:
        with pytest.raises(SystemExit) as exit_:
            main()
    finally:
        sys.argv = old
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), (argv, err)
    return err[0]


def wrong_value(kind: Any) -> str:
    return {int: "abc", float: "fast", bool: "maybe"}[kind]


def schema_fields(schema: type) -> list[tuple[str, Any, Any]]:
    """(name, type, default) of a schema's primitive fields (``bool`` before ``int``)."""
    hints = {f.name: f.type for f in dataclasses.fields(schema)}
    out = []
    for f in dataclasses.fields(schema):
        t = hints[f.name]
        t = t if isinstance(t, type) else None
        if t in PRIMITIVE and f.default is not dataclasses.MISSING:
            out.append((f.name, t, f.default))
    return out


# ------------------------------------------------------------------------------ every component schema
COMPONENT_GROUPS = {
    "head": "head.params",
    "method": "method.params",
    "sampler": "sampler.params",
    "variant": "variant.{name}",
    "task": "task.{name}",
}


def component_cases() -> list[tuple[str, str, str, Any]]:
    """(group, option, key prefix, schema) for every registered head, pairing, sampler, variant and
    task augmentation."""
    register()
    cases = []
    for group, prefix in COMPONENT_GROUPS.items():
        for name in _components()[group][0].names():
            cases.append((group, name, prefix.format(name=name), params_schema(group, name)))
    return cases


def selection(group: str, name: str) -> list[str]:
    return {
        "head": [f"head={name}"],
        "method": [f"method={name}"],
        "sampler": [f"sampler={name}"],
        "variant": [f"variant={name}"],
        "task": [f"task.augment=[{name}]"],
    }[group]


@pytest.mark.parametrize(
    "group, name, prefix, schema", component_cases(), ids=lambda x: x if isinstance(x, str) else ""
)
def test_every_component_refuses_wrong_types_and_typos(
    group: str, name: str, prefix: str, schema: type, capsys: pytest.CaptureFixture[str]
) -> None:
    pick = selection(group, name) + (["method=moco"] if group == "variant" and name == "t_kernel" else [])
    if group == "variant":
        pick += ["head=contrastive"]
    for key, kind, _ in schema_fields(schema):
        bad = wrong_value(kind)
        line = run_entry("episodic.train", [*pick, f"{prefix}.{key}={bad}"], capsys)
        assert f"{prefix}.{key}='{bad}' is not allowed" in line, line
    fields = [f.name for f in dataclasses.fields(schema)]
    if fields:  # a misspelt key: did-you-mean and the keys allowed at that level
        typo = fields[0] + "x"
        line = run_entry("episodic.train", [*pick, f"{prefix}.{typo}=1"], capsys)
        assert f"unknown key {prefix}.{typo} (did you mean {prefix}.{fields[0]}?)" in line, line
        assert f"allowed at {prefix}: " in line, line
    else:  # no parameters at all
        line = run_entry("episodic.train", [*pick, f"+{prefix}.foo=1"], capsys)
        assert f"unknown key {prefix}.foo" in line, line


# ------------------------------------------------------------------------------ fixed schemas: the run
def test_every_run_key_refuses_a_wrong_type(capsys: pytest.CaptureFixture[str]) -> None:
    from episodic.config import LoaderConfig, LoopConfig, QuickEval, ScheduleConfig, TrainConfig

    for prefix, schema in (
        ("", TrainConfig),
        ("train.", LoopConfig),
        ("loader.", LoaderConfig),
        ("optim.schedule.", ScheduleConfig),
        ("eval.", QuickEval),
    ):
        for key, kind, _ in schema_fields(schema):
            bad = wrong_value(kind)
            line = run_entry("episodic.train", [f"{prefix}{key}={bad}"], capsys)
            assert f"{prefix}{key}='{bad}' is not allowed" in line, line


# out-of-range values, one or more per group, and what the line must say
OUT_OF_RANGE: list[tuple[str, list[str], str]] = [
    ("episodic.train", ["batch_size=1"], "batch_size=1 is not allowed"),
    ("episodic.train", ["batch_size=0"], "batch_size=0 is not allowed"),
    ("episodic.train", ["n_way=1"], "n_way=1 is not allowed"),
    ("episodic.train", ["n_supp=0"], "n_supp=0 is not allowed"),
    ("episodic.train", ["seed=-1"], "seed=-1 is not allowed"),
    ("episodic.train", ["memory_cap=0"], "memory_cap=0 is not allowed; use null or an integer >= 1"),
    ("episodic.train", ["eval.online_probe_lr=0"], "eval.online_probe_lr=0.0 is not allowed"),
    ("episodic.train", ["device=tpu"], "device='tpu' is not allowed"),
    ("episodic.train", ["precision=fp8"], "precision='fp8' is not allowed"),
    ("episodic.train", ["sync_bn=maybe"], "sync_bn='maybe' is not allowed"),
    ("episodic.train", ["train.steps=-5"], "train.steps=-5 is not allowed"),
    ("episodic.train", ["train.log_every=0"], "train.log_every=0 is not allowed"),
    ("episodic.train", ["train.keep_last=-1"], "train.keep_last=-1 is not allowed"),
    ("episodic.train", ["train.max_skips=-1"], "train.max_skips=-1 is not allowed"),
    ("episodic.train", ["loader.workers=-1"], "loader.workers=-1 is not allowed"),
    ("episodic.train", ["loader.augment=gpu"], "loader.augment='gpu' is not allowed"),
    ("episodic.train", ["optim.optimizer.lr=0"], "optim.optimizer.lr=0.0 is not allowed"),
    ("episodic.train", ["optim.optimizer.weight_decay=-1"], "optim.optimizer.weight_decay=-1.0 is not allowed"),
    ("episodic.train", ["optim.optimizer.momentum=1.5"], "optim.optimizer.momentum=1.5 is not allowed"),
    ("episodic.train", ["optim=lars", "optim.optimizer.eta=0"], "optim.optimizer.eta=0.0 is not allowed"),
    ("episodic.train", ["optim=adam", "optim.optimizer.betas=[1.5,0.9]"], "optim.optimizer.betas=[1.5, 0.9]"),
    ("episodic.train", ["optim.accu_iter=0"], "optim.accu_iter=0 is not allowed"),
    ("episodic.train", ["optim.schedule.warmup_steps=-5"], "optim.schedule.warmup_steps=-5 is not allowed"),
    ("episodic.train", ["optim.schedule.final_ratio=2"], "optim.schedule.final_ratio=2.0 is not allowed"),
    ("episodic.train", ["backbone.params.width=0"], "backbone.params.width=0 is not allowed"),
    ("episodic.train", ["backbone=resnet_tiny", "backbone.params.blocks=0"], "backbone.params.blocks=0 is not allowed"),
    ("episodic.train", ["backbone.projector.out_dim=0"], "backbone.projector.out_dim=0 is not allowed"),
    ("episodic.train", ["backbone.params.depth=8"], "backbone=conv4 cannot embed 1x32x32 views"),
    ("episodic.train", ["data.params.image_size=0"], "data.params.image_size=0 is not allowed"),
    ("episodic.train", ["data.augment.hflip=2"], "augment.hflip is a probability in [0, 1]"),
    ("episodic.train", ["head=contrastive", "head.params.temperature=0"], "head.params.temperature=0.0 is not allowed"),
    ("episodic.train", ["head=protonet", "head.params.metric=dot"], "head.params.metric='dot' is not allowed"),
    ("episodic.train", ["head.params.lam=0"], "head.params.lam=0.0 is not allowed"),
    ("episodic.train", ["head=svm", "head.params.C=0"], "head.params.C=0.0 is not allowed"),
    ("episodic.train", ["method=moco", "method.params.momentum=1.5"], "method.params.momentum=1.5 is not allowed"),
    ("episodic.train", ["method=moco", "method.params.queue_size=-1"], "method.params.queue_size=-1 is not allowed"),
    ("episodic.train", ["variant=debiased", "variant.debiased.tau_plus=1"], "variant.debiased.tau_plus=1.0 is not"),
    ("episodic.train", ["variant=soft_neighbors", "variant.soft_neighbors.k=-1"], "variant.soft_neighbors.k=-1"),
    ("episodic.train", ["task.augment=[rotate]", "task.rotate.p=2"], "task.rotate.p must be a probability in [0, 1]"),
    ("episodic.train", ["task.augment=[spin]"], "task.augment lists ['spin']; allowed: "),
    ("episodic.train", ["task.scope=world"], "task.scope='world' is not allowed"),
    ("episodic.train", ["sampler=psco"], "sampler=psco takes its 4 shots per class from the momentum queue"),
    ("episodic.train", ["sampler=psco", "method=moco", "task.augment=[rotate]"], "sampler=psco chooses the shots"),
    ("episodic.train", ["sampler=psco", "method=moco", "sampler.params.epsilon=0"], "sampler.params.epsilon=0.0"),
    ("episodic.train", ["eval.fewshot.ways=1"], "eval.fewshot.ways=1 is not allowed"),
    ("episodic.train", ["eval.knn_k=0"], "eval.knn_k=0 is not allowed"),
    ("episodic.train", ["eval=linear"], "eval=linear is a protocol of python -m episodic.eval"),
    ("episodic.eval", ["eval=linear", "checkpoint=x.pt", "eval.lr=-1"], "eval.lr=-1.0 is not allowed"),
    ("episodic.eval", ["eval=semi", "checkpoint=x.pt", "eval.fractions=[1.5]"], "eval.fractions=[1.5] is not"),
    ("episodic.eval", ["eval=fewshot", "checkpoint=x.pt", "eval.ways=1"], "eval.ways=1 is not allowed"),
    ("episodic.eval", ["eval=knn", "checkpoint=x.pt", "eval.temperature=0"], "eval.temperature=0.0 is not"),
    ("episodic.eval", ["eval=knn", "checkpoint=x.pt", "device=tpu"], "device='tpu' is not allowed"),
    ("episodic.export", ["checkpoint=x.pt", "out=y.pt", "num_classes=0"], "num_classes=0 is not allowed"),
    ("episodic.export", ["checkpoint=x.pt", "out=y.pt", "fc=maybe"], "fc='maybe' is not allowed"),
]


@pytest.mark.parametrize("module, argv, message", OUT_OF_RANGE, ids=[" ".join(c[1]) for c in OUT_OF_RANGE])
def test_out_of_range_values_are_one_line(
    module: str, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    line = run_entry(module, argv, capsys)
    assert message in line, line


WRONG_TYPES = [
    ("episodic.train", ["batch_size=abc"], "batch_size='abc' is not allowed; use an integer"),
    ("episodic.train", ["batch_size=null"], "batch_size=null is not allowed"),
    ("episodic.train", ["batch_size=32.5"], "batch_size='32.5' is not allowed; use an integer"),
    ("episodic.train", ["seed=1.5"], "seed='1.5' is not allowed; use an integer"),
    ("episodic.train", ["train.steps=ten"], "train.steps='ten' is not allowed; use an integer"),
    ("episodic.train", ["optim.optimizer.lr=fast"], "optim.optimizer.lr='fast' is not allowed; use a number"),
    ("episodic.train", ["variant=debiased", "variant.debiased.tau_plus=high"], "variant.debiased.tau_plus='high'"),
    ("episodic.eval", ["eval=linear", "checkpoint=x.pt", "eval.lr=fast"], "eval.lr='fast' is not allowed"),
    ("episodic.export", ["checkpoint=x.pt", "out=y.pt", "num_classes=many"], "num_classes='many' is not allowed"),
    ("episodic.train", ["+train.stpes=5"], "unknown key train.stpes (did you mean train.steps?); allowed at train:"),
    ("episodic.train", ["train.stpes=5"], "unknown key train.stpes (did you mean train.steps?)"),
    ("episodic.train", ["n_quey=1"], "unknown key n_quey (did you mean n_query?); allowed at the top level:"),
    (
        "episodic.eval",
        ["eval=fewshot", "checkpoint=x.pt", "eval.wayz=3"],
        "unknown key eval.wayz (did you mean eval.ways?)",
    ),
    ("episodic.export", ["checkpoint=x.pt", "out=y.pt", "+fcc=none"], "unknown key fcc (did you mean fc?)"),
    ("episodic.export", ["checkpoint=x.pt"], "out is required"),
]


@pytest.mark.parametrize("module, argv, message", WRONG_TYPES, ids=[" ".join(c[1]) for c in WRONG_TYPES])
def test_wrong_types_and_typos_are_one_line(
    module: str, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    line = run_entry(module, argv, capsys)
    assert message in line, line


def test_eval_protocol_and_root_schemas_are_registered() -> None:
    register()
    repo = ConfigStore.instance().repo
    assert {f"{n}.yaml" for n in EVAL_PROTOCOLS} <= set(repo["eval"])
    assert {f"{n}_schema.yaml" for n in ROOTS} <= set(repo)


# ------------------------------------------------------------------------------ one place for defaults
def _leaves(node: Any, path: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        return [leaf for k, v in node.items() for leaf in _leaves(v, f"{path}{k}.")]
    return [(path[:-1], node)]


@pytest.mark.parametrize(
    "path",
    sorted(p for g in ("data", "backbone", "optim") for p in (CONFIGS / g).glob("*.yaml")),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_no_yaml_file_restates_a_default(path: Path) -> None:
    """A YAML option starts from its schema and writes only what differs, so a default lives in one place."""
    register()
    raw = OmegaConf.to_container(OmegaConf.load(path))
    assert isinstance(raw, dict)
    (base,) = [d for d in raw.pop("defaults") if d != "_self_"]
    group, name = base.removeprefix("/schema/").removesuffix("@_here_").split("/")
    schema = OmegaConf.structured(ConfigStore.instance().repo["schema"][group][f"{name}.yaml"].node)
    for key, value in _leaves(raw):
        default = OmegaConf.select(schema, key, throw_on_missing=False)
        default = OmegaConf.to_container(default) if OmegaConf.is_config(default) else default
        assert default != value, f"{path.relative_to(CONFIGS)}: {key}={value!r} restates the schema default"


def test_generated_groups_have_no_yaml() -> None:
    """Heads, pairings, samplers and variants take their defaults from their constructors alone."""
    for group in ("head", "method", "sampler"):
        assert not list((CONFIGS / group).glob("*.yaml")), group
    assert [p.name for p in (CONFIGS / "variant").glob("*.yaml")] == ["none.yaml"]
