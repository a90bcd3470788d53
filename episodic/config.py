"""Configuration schemas: the one place where every key, its type, its default and its range live.

Two kinds of schema, both registered in Hydra's ConfigStore by :func:`register` and merged under the
YAML files, so OmegaConf checks every value's type as it is composed or overridden:

* **components** (heads, pairings, samplers, variants, task augmentations, backbones, datasets,
  optimisers) have no hand-written schema: their constructor's signature *is* the schema
  (:func:`signature_schema`): the keyword names are the keys, the annotations the types, the defaults the
  defaults, and the constructor checks the ranges. Heads, pairings, samplers and variants need no YAML at
  all (``head=r2d2`` is generated); backbone, data and optimiser options are YAML files whose
  ``defaults`` start from ``/schema/<group>/<name>`` and override only what differs;
* **the run itself** (``n_supp``, ``batch_size``, ``train.*``, ``loader.*``, ``optim`` schedule,
  ``eval.*``, the evaluation and export roots) is the dataclasses below; each checks its ranges in
  ``__post_init__``.

:func:`validate` runs after composition and before any data is read: unknown keys (including ones
added with ``+``), every ``__post_init__`` check, and every component built once on the meta device
(its constructor checks, a variant against its head, a pairing against its head, the optimiser and
its schedule). :func:`describe` turns OmegaConf's and Hydra's exceptions into one line naming the key,
the value and what is allowed.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import functools
import inspect
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from episodic.errors import EpisodicError, check


def as_dict(node: Any) -> dict[str, Any]:
    """A config mapping (or ``None``) as a plain ``dict`` with resolved interpolations."""
    if node is None:
        return {}
    if isinstance(node, DictConfig):
        container = OmegaConf.to_container(node, resolve=True)
        assert isinstance(container, dict)
        return {str(k): v for k, v in container.items()}
    return dict(node)


# ------------------------------------------------------------------------------------- generated schemas
_PRIMITIVE = (int, float, bool, str)


def schema_type(annotation: Any) -> Any:
    """A constructor annotation as a type OmegaConf can check (``Any`` where it cannot)."""
    if annotation in _PRIMITIVE or annotation is Any:
        return annotation
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            inner = schema_type(rest[0])
            return inner | None if len(rest) < len(args) else inner
        return Any
    if origin in (list, tuple, typing.Sequence, collections.abc.Sequence):
        elems = [a for a in args if a is not Ellipsis]
        elem = elems[0] if elems and all(e == elems[0] for e in elems) and elems[0] in _PRIMITIVE else Any
        return list[elem]  # type: ignore[valid-type]  # built at run time, for OmegaConf
    if origin is dict:
        return dict[str, Any]
    return Any


def _default(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return field(default_factory=functools.partial(list, value))
    if isinstance(value, dict):
        return field(default_factory=functools.partial(dict, value))
    return field(default=value)


def signature_schema(fn: Callable[..., Any], name: str, skip: tuple[str, ...] = ()) -> type:
    """A dataclass whose fields are ``fn``'s keyword parameters (a class: its constructor's), minus ``skip``:
    same names, types as OmegaConf can check them, same defaults (none: mandatory, ``???``)."""
    target = fn.__init__ if isinstance(fn, type) else fn  # type: ignore[misc]  # a class's constructor
    hints = typing.get_type_hints(target)
    fields = []
    for p in inspect.signature(fn).parameters.values():
        if p.name in skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = MISSING if p.default is p.empty else p.default
        fields.append((p.name, schema_type(hints.get(p.name, Any)), _default(default)))
    return dataclasses.make_dataclass(name, fields)


def named_node(kind: str, name: str, params: type, **extra: tuple[Any, Any]) -> type:
    """``{name: <name>, params: <params schema>, **extra}``: a component's config node."""
    fields: list[tuple[str, Any, Any]] = [
        ("name", str, field(default=name)),
        ("params", params, field(default_factory=params)),
    ]
    fields += [(k, t, d) for k, (t, d) in extra.items()]
    return dataclasses.make_dataclass(f"{kind}_{name}", fields)


# ------------------------------------------------------------------------------------- the run
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")
SWITCH = ("auto", "true", "false")


def switch(value: Any, key: str) -> str:
    """``auto`` / ``true`` / ``false`` (booleans and their spellings accepted), lower case."""
    text = str(value).lower()
    check(text in SWITCH, f"{key}={value!r} is not allowed; use auto, true or false")
    return text


@dataclass
class LoaderConfig:
    """Training batches (episodic/data/loader.py)."""

    augment: str = "device"  # device | worker | pil: where the views are augmented
    workers: int = 0  # loader worker processes (0: in the training process)
    pin_memory: str = "auto"  # auto: pinned when training on CUDA | true | false
    persistent_workers: bool = True
    prefetch: int = 2  # batches prefetched per worker

    def __post_init__(self) -> None:
        check(
            self.augment in ("device", "worker", "pil"),
            f"loader.augment={self.augment!r} is not allowed; use device, worker or pil",
        )
        check(self.workers >= 0, f"loader.workers={self.workers} is not allowed; use an integer >= 0")
        check(self.prefetch >= 1, f"loader.prefetch={self.prefetch} is not allowed; use an integer >= 1")
        self.pin_memory = switch(self.pin_memory, "loader.pin_memory")


@dataclass
class LoopConfig:
    """The training loop (``train.*``)."""

    steps: int = 150
    log_every: int = 10  # history, TensorBoard scalars and the progress bar every N steps
    ckpt_every: int = 100  # checkpoints/step_N.pt every N steps (0: only checkpoints/last.pt at the end)
    hist_every: int = 100  # score histograms every N steps (0: off)
    keep_last: int = 2  # numbered checkpoints kept (older ones deleted); 0 keeps all
    skip_nonfinite: bool = False  # a non-finite loss stops the run naming the last good checkpoint; true: skip
    max_skips: int = 5  # with skip_nonfinite: more consecutive skipped steps than this stop the run
    find_unused_parameters: bool = False  # DDP: true when some trainable parameter gets no gradient
    progress: bool = True
    compile: bool = False  # torch.compile the model's forward (docs/performance.md)

    def __post_init__(self) -> None:
        check(self.steps >= 1, f"train.steps={self.steps} is not allowed; use an integer >= 1")
        check(self.log_every >= 1, f"train.log_every={self.log_every} is not allowed; use an integer >= 1")
        for key in ("ckpt_every", "hist_every", "keep_last", "max_skips"):
            value = getattr(self, key)
            check(value >= 0, f"train.{key}={value} is not allowed; use an integer >= 0")


@dataclass
class ScheduleConfig:
    """Per-step learning-rate schedule: linear warm-up, then cosine decay (or constant)."""

    schedule: str = "cosine"  # cosine | constant
    warmup_steps: int = 0
    final_ratio: float = 0.0  # cosine: the last step's lr as a share of the base lr

    def __post_init__(self) -> None:
        check(
            self.schedule in ("cosine", "constant"),
            f"optim.schedule.schedule={self.schedule!r} is not allowed; use cosine or constant",
        )
        check(
            self.warmup_steps >= 0,
            f"optim.schedule.warmup_steps={self.warmup_steps} is not allowed; use an integer >= 0",
        )
        check(
            0.0 <= self.final_ratio <= 1.0,
            f"optim.schedule.final_ratio={self.final_ratio} is not allowed; use a value in [0, 1]",
        )


@dataclass
class FewshotQuick:
    """Few-shot episodes of the end-of-run evaluation."""

    ways: int = 5
    shots: list[int] = field(default_factory=lambda: [1, 5])
    queries: int = 15
    episodes: int = 600
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.ways >= 2, f"eval.fewshot.ways={self.ways} is not allowed; use an integer >= 2")
        check(
            len(self.shots) > 0 and all(int(s) >= 1 for s in self.shots),
            f"eval.fewshot.shots={list(self.shots)} is not allowed; use a list of integers >= 1",
        )
        check(self.queries >= 1, f"eval.fewshot.queries={self.queries} is not allowed; use an integer >= 1")
        check(self.episodes >= 2, f"eval.fewshot.episodes={self.episodes} is not allowed; use an integer >= 2")


@dataclass
class QuickEval:
    """``eval=quick``: what training evaluates during and after the run (trained vs random init)."""

    linear: bool = True  # linear probe train -> test (when the test classes are training classes)
    baseline: bool = True  # also evaluate the random-init encoder of the same architecture and seed
    fewshot: FewshotQuick = field(default_factory=FewshotQuick)
    knn_every: int = 10  # kNN monitor every N epochs (or steps) and at the last step; 0: off
    knn_unit: str = "epochs"  # epochs | steps
    knn_k: int = 200
    knn_t: float = 0.1
    online_probe: bool = True  # a linear probe trained alongside on detached features (labelled data only)
    online_probe_lr: float = 0.1  # its SGD learning rate (docs/evaluation.md: not the offline linear probe)
    plots: bool = True  # accuracy curve, score histograms, embedding map (PNG and TensorBoard)
    plot_points: int = 1000  # images in the embedding map

    def __post_init__(self) -> None:
        check(self.knn_every >= 0, f"eval.knn_every={self.knn_every} is not allowed; use 0 (off) or an integer >= 1")
        check(
            self.knn_unit in ("epochs", "steps"), f"eval.knn_unit={self.knn_unit!r} is not allowed; use epochs or steps"
        )
        check(self.knn_k >= 1, f"eval.knn_k={self.knn_k} is not allowed; use an integer >= 1")
        check(self.knn_t > 0, f"eval.knn_t={self.knn_t} is not allowed; use a value > 0")
        check(self.online_probe_lr > 0, f"eval.online_probe_lr={self.online_probe_lr} is not allowed; use a value > 0")
        check(self.plot_points >= 2, f"eval.plot_points={self.plot_points} is not allowed; use an integer >= 2")


@dataclass
class TrainConfig:
    """The root of ``python -m episodic.train``; the groups (``data``, ``head``, ...) are their own schemas."""

    data: Any = MISSING
    backbone: Any = MISSING
    head: Any = MISSING
    method: Any = MISSING
    sampler: Any = MISSING
    variant: dict[str, Any] = field(default_factory=dict)  # one key per variant (configs: variant=[a,b])
    task: Any = MISSING
    optim: Any = MISSING
    eval: Any = MISSING
    n_supp: int = 1  # views of each image in the support set (shots)
    n_query: int = 1  # views of each image in the query set
    n_way: int | None = None  # classes per episode; null: the whole batch is one episode
    batch_size: int = 256  # distinct images per step (global: split over processes and micro-batches)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "32"  # 32 | bf16 | fp16: autocast on CUDA; CPU runs train in float32
    channels_last: bool = True  # NHWC memory format for the backbone
    sync_bn: str = "auto"  # auto: SyncBatchNorm when several CUDA processes train | true | false
    resume: str | None = None  # null | auto | a checkpoint .pt or a run directory
    # at most this many entries in any memory (MoCo's queue_size, soft neighbours' bank_size); null: as set.
    # A short run fills a smaller memory: +scale=cpu_smoke caps it (docs/recipes.md)
    memory_cap: int | None = None
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    train: LoopConfig = field(default_factory=LoopConfig)

    def __post_init__(self) -> None:
        for key in ("n_supp", "n_query"):
            check(getattr(self, key) >= 1, f"{key}={getattr(self, key)} is not allowed; use an integer >= 1")
        check(
            self.n_way is None or self.n_way >= 2,
            f"n_way={self.n_way} is not allowed; use an integer >= 2 or null (the whole batch)",
        )
        check(
            self.batch_size >= 2,
            f"batch_size={self.batch_size} is not allowed; an episode needs at least 2 images (classes)",
        )
        check(self.seed >= 0, f"seed={self.seed} is not allowed; use an integer >= 0")
        check(
            self.memory_cap is None or self.memory_cap >= 1,
            f"memory_cap={self.memory_cap} is not allowed; use null or an integer >= 1",
        )
        check(
            DEVICE.fullmatch(self.device) is not None,
            f"device={self.device!r} is not allowed; use auto, cpu, cuda, cuda:N or mps",
        )
        check(
            self.precision.lower() in ("32", "fp32", "bf16", "fp16"),
            f"precision={self.precision!r} is not allowed; use 32, bf16 or fp16",
        )
        self.sync_bn = switch(self.sync_bn, "sync_bn")


@dataclass
class OptimConfig:
    """``optim=sgd|adam|lars``: the optimiser (its own schema), accumulation and the schedule."""

    optimizer: Any = MISSING
    accu_iter: int = 1  # micro-batches per optimizer step (gradient accumulation)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        check(self.accu_iter >= 1, f"optim.accu_iter={self.accu_iter} is not allowed; use an integer >= 1")


# ------------------------------------------------------------------------------------- evaluation, export
@dataclass
class LinearEval:
    """``python -m episodic.eval eval=linear``: a linear probe on the frozen backbone.

    The recipe is picked by dataset (``recipe: auto`` -> ``recipes[<data>]`` or ``recipes.default``); any
    non-null top-level key below overrides the recipe's value.
    """

    protocol: str = "linear"
    recipe: str = "auto"
    train_split: str = "train"  # the probe is fitted on this split ...
    test_split: str = "test"  # ... and its top-1 accuracy reported on this one
    baseline: bool = True
    cache: bool = True  # features computed once, cached under <run dir>/eval_cache
    seed: int = 0
    optimizer: str | None = None  # lbfgs | sgd
    aug: str | None = None  # none (cached features) | crop_flip | resized_crop
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    max_iter: int | None = None  # L-BFGS iterations
    recipes: dict[str, Any] = field(default_factory=lambda: dict(LINEAR_RECIPES))

    def __post_init__(self) -> None:
        check(
            self.optimizer in (None, "lbfgs", "sgd"),
            f"eval.optimizer={self.optimizer!r} is not allowed; use lbfgs or sgd",
        )
        check(
            self.aug in (None, "none", "crop_flip", "resized_crop"),
            f"eval.aug={self.aug!r} is not allowed; use none, crop_flip or resized_crop",
        )
        for key in ("steps", "batch_size", "max_iter"):
            v = getattr(self, key)
            check(v is None or v >= 1, f"eval.{key}={v} is not allowed; use null or an integer >= 1")
        check(self.lr is None or self.lr > 0, f"eval.lr={self.lr} is not allowed; use null or a value > 0")
        check(
            self.momentum is None or 0 <= self.momentum < 1,
            f"eval.momentum={self.momentum} is not allowed; use null or a value in [0, 1)",
        )
        check(
            self.weight_decay is None or self.weight_decay >= 0,
            f"eval.weight_decay={self.weight_decay} is not allowed; use null or a value >= 0",
        )


_CIFAR_PROBE = {
    "optimizer": "sgd",
    "aug": "none",
    "steps": 80000,
    "batch_size": 1024,
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 1.0e-4,
}
LINEAR_RECIPES: dict[str, Any] = {
    # small data (digits, your npz/imagefolder): cached standardised features, L-BFGS (the SGD settings
    # apply with eval.optimizer=sgd)
    "default": {
        "optimizer": "lbfgs",
        "aug": "none",
        "weight_decay": 1.0e-4,
        "max_iter": 500,
        "steps": 1000,
        "batch_size": 256,
        "lr": 0.1,
        "momentum": 0.9,
    },
    # metacontrastive cifar_eval.yaml: batch 1024, lr 0.1, wd 1e-4, 80,000 steps (it trains on crop_flip views)
    "cifar10": _CIFAR_PROBE,
    "cifar10_npz": _CIFAR_PROBE,
    "cifar100": _CIFAR_PROBE,
    # metacontrastive imagenet_eval.yaml: batch 4096, lr 1.6, wd 0, 28,080 steps (about 90 epochs)
    "imagenet": {
        "optimizer": "sgd",
        "aug": "resized_crop",
        "steps": 28080,
        "batch_size": 4096,
        "lr": 1.6,
        "momentum": 0.9,
        "weight_decay": 0.0,
    },
}


@dataclass
class SemiEval:
    """``eval=semi``: fine-tune encoder + linear layer on class-balanced label subsets.

    Reference (ImageNet, SimCLR subsets): 1% -> lr 0.05, 3,000 steps; 10% -> lr 0.1, 60,000 steps;
    batch 240 = about 56 / 112 passes over the labelled subset.
    """

    protocol: str = "semi"
    fractions: list[float] = field(default_factory=lambda: [0.01, 0.1])  # share of the labelled train split
    lr: Any = field(default_factory=lambda: [0.05, 0.1])  # one per fraction, or one value for all
    epochs: Any = field(default_factory=lambda: [56, 112])  # passes over the subset, one per fraction or one
    steps: int | None = None  # overrides epochs: this many steps for every fraction
    batch_size: int = 240
    momentum: float = 0.9
    weight_decay: float = 0.0
    aug: str = "resized_crop"  # resized_crop | crop_flip | none
    train_split: str = "train"
    test_split: str = "test"
    seed: int = 0  # fixes the labelled subsets (saved under <run dir>/semi/) and the batch order
    baseline: bool = False  # also fine-tune the random-init encoder
    cache: bool = True

    def __post_init__(self) -> None:
        bad = [f for f in self.fractions if not 0 < float(f) <= 1]
        check(
            not bad and len(self.fractions) > 0,
            f"eval.fractions={list(self.fractions)} is not allowed; use shares in (0, 1], e.g. [0.01, 0.1]",
        )
        n = len(self.fractions)
        for key, kind in (("lr", float), ("epochs", float)):
            value = getattr(self, key)
            values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
            try:
                ok = all(kind(v) > 0 for v in values) and len(values) in (1, n)
            except (TypeError, ValueError):
                ok = False
            check(ok, f"eval.{key}={value!r} is not allowed; use one number > 0 or {n} (one per fraction)")
        check(self.steps is None or self.steps >= 1, f"eval.steps={self.steps} is not allowed; use null or >= 1")
        check(self.batch_size >= 1, f"eval.batch_size={self.batch_size} is not allowed; use an integer >= 1")
        check(0 <= self.momentum < 1, f"eval.momentum={self.momentum} is not allowed; use a value in [0, 1)")
        check(self.weight_decay >= 0, f"eval.weight_decay={self.weight_decay} is not allowed; use a value >= 0")
        check(
            self.aug in ("none", "crop_flip", "resized_crop"),
            f"eval.aug={self.aug!r} is not allowed; use none, crop_flip or resized_crop",
        )


@dataclass
class FewshotEval:
    """``eval=fewshot``: N-way K-shot episodes on held-out classes, several heads on frozen features.

    Mean and 95% CI = 1.96 std / sqrt(episodes); the same seeded episodes for every head and encoder.
    """

    protocol: str = "fewshot"
    split: str = "auto"  # auto: data.fewshot_classes if set, else the test split; or train|test|both|...
    classes: list[int] | None = None  # only these class indices (auto uses data.fewshot_classes)
    heads: list[str] = field(default_factory=lambda: ["protonet", "r2d2", "svm", "logreg"])
    ways: int = 5
    shots: list[int] = field(default_factory=lambda: [1, 5])
    queries: int = 15  # per class
    episodes: int = 1000  # 600-2,000 in the literature (MetaOptNet: 1,000)
    seed: int = 0
    chunk: int = 100  # episodes scored per batch
    baseline: bool = True
    cache: bool = True
    # heads on frozen features: no learnable scale (accuracy ignores logit scaling)
    head_params: dict[str, Any] = field(
        default_factory=lambda: {
            "protonet": {"temperature": 1.0, "normalize": True, "metric": "euclidean", "learn_scale": False},
            "r2d2": {"lam": 1.0, "scale": 1.0, "learn_scale": False, "normalize": True},
            "svm": {"C": 0.1, "normalize": True, "scale": 1.0, "learn_scale": False, "warm_start": False},
            "logreg": {"C": 1.0, "normalize": True, "max_iter": 100},
        }
    )

    def __post_init__(self) -> None:
        check(self.ways >= 2, f"eval.ways={self.ways} is not allowed; use an integer >= 2")
        check(
            len(self.shots) > 0 and all(s >= 1 for s in self.shots),
            f"eval.shots={list(self.shots)} is not allowed; use a list of integers >= 1",
        )
        check(self.queries >= 1, f"eval.queries={self.queries} is not allowed; use an integer >= 1")
        check(self.episodes >= 2, f"eval.episodes={self.episodes} is not allowed; use an integer >= 2")
        check(self.chunk >= 1, f"eval.chunk={self.chunk} is not allowed; use an integer >= 1")
        check(len(self.heads) > 0, "eval.heads is empty; name at least one evaluation head")


@dataclass
class KnnEval:
    """``eval=knn``: weighted kNN on L2-normalised frozen features (memory bank: train split)."""

    protocol: str = "knn"
    k: Any = field(default_factory=lambda: [200])  # one neighbourhood size or a list of them
    temperature: float = 0.1
    train_split: str = "train"
    test_split: str = "test"
    baseline: bool = True
    cache: bool = True

    def __post_init__(self) -> None:
        ks = list(self.k) if isinstance(self.k, (list, tuple, ListConfig)) else [self.k]
        check(
            len(ks) > 0 and all(isinstance(k, int) and k >= 1 for k in ks),
            f"eval.k={self.k!r} is not allowed; use an integer >= 1 or a list of them",
        )
        check(self.temperature > 0, f"eval.temperature={self.temperature} is not allowed; use a value > 0")


@dataclass
class EvaluateConfig:
    """The root of ``python -m episodic.eval``."""

    eval: Any = MISSING
    data: Any = None  # null: the checkpoint's own data config
    backbone: Any = None  # optional check: refuse a checkpoint that holds another backbone
    checkpoint: str = MISSING  # the .pt file of a run
    results: str | None = None  # results file; null: results.json of the checkpoint's run directory
    device: str = "auto"

    def __post_init__(self) -> None:
        check(
            DEVICE.fullmatch(self.device) is not None,
            f"device={self.device!r} is not allowed; use auto, cpu, cuda, cuda:N or mps",
        )


@dataclass
class ExportConfig:
    """The root of ``python -m episodic.export``."""

    backbone: Any = None  # optional check: refuse a checkpoint that holds another backbone
    checkpoint: str = MISSING  # the .pt file of a run
    out: str = MISSING  # where to write the plain state dict
    fc: str = "zeros"  # zeros: an all-zero fc for a strict torchvision load; none: leave it out
    num_classes: int = 1000  # outputs of that fc
    overwrite: bool = False  # replace an existing out file (never a checkpoint)

    def __post_init__(self) -> None:
        check(self.fc in ("zeros", "none"), f"fc={self.fc!r} is not allowed; use zeros or none")
        check(self.num_classes >= 1, f"num_classes={self.num_classes} is not allowed; use an integer >= 1")


EVAL_PROTOCOLS: dict[str, type] = {
    "quick": QuickEval,
    "linear": LinearEval,
    "semi": SemiEval,
    "fewshot": FewshotEval,
    "knn": KnnEval,
}
ROOTS: dict[str, type] = {"train": TrainConfig, "evaluate": EvaluateConfig, "export": ExportConfig}


# ------------------------------------------------------------------------------------- registration
def _components() -> dict[str, tuple[Any, tuple[str, ...]]]:
    """group -> (registry, constructor parameters that do not come from the config)."""
    from episodic.data.datasets import DATASETS
    from episodic.heads.base import HEADS
    from episodic.heads.variants import VARIANTS
    from episodic.methods import METHODS
    from episodic.models.backbones import BACKBONES
    from episodic.optim import OPTIMIZERS
    from episodic.tasks.augment import TASK_AUGMENTS
    from episodic.tasks.samplers import SAMPLERS

    return {
        "head": (HEADS, ()),
        "method": (METHODS, ("encoder",)),
        "sampler": (SAMPLERS, ("n_supp", "n_query", "n_way")),
        "variant": (VARIANTS, ("dim",)),
        "backbone": (BACKBONES, ("in_channels",)),
        "data": (DATASETS, ()),
        "optim": (OPTIMIZERS, ("groups", "lr")),
        "task": (TASK_AUGMENTS, ("ctx",)),
    }


def params_schema(group: str, name: str) -> type:
    """The parameter schema of component ``name`` of ``group`` (its constructor's signature)."""
    registry, skip = _components()[group]
    return signature_schema(registry.get(name), f"{group}_{name}_params", skip)


def task_schema() -> type:
    """``task``: the scope, the list of augmentations and one parameter node per registered augmentation."""
    from episodic.tasks.augment import TASK_AUGMENTS

    fields: list[tuple[str, Any, Any]] = [
        ("scope", str, field(default="global")),
        ("augment", list[str], field(default_factory=list)),
    ]
    for name in TASK_AUGMENTS.names():
        schema = params_schema("task", name)
        fields.append((name, schema, field(default_factory=schema)))

    def post_init(self: Any) -> None:
        check(self.scope in ("global", "local"), f"task.scope={self.scope!r} is not allowed; use global or local")
        unknown = [a for a in self.augment if a not in TASK_AUGMENTS]
        check(not unknown, f"task.augment lists {unknown}; allowed: {', '.join(TASK_AUGMENTS.names())}")
        dup = sorted({a for a in self.augment if list(self.augment).count(a) > 1})
        check(not dup, f"task.augment lists {dup} more than once; list each augmentation once")

    return dataclasses.make_dataclass("TaskConfig", fields, namespace={"__post_init__": post_init})


_REGISTERED = False


def register() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent): the roots, the generated component options
    (``head=...``, ``method=...``, ``sampler=...``, ``variant=...``, ``task=default``, ``eval=...``) and the
    bases the YAML options start from (``/schema/backbone/<name>``, ``/schema/data/<name>``,
    ``/schema/optim/<name>``)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from hydra.core.config_store import ConfigStore

    from episodic.models.projector import Projector

    cs = ConfigStore.instance()
    for root, schema in ROOTS.items():
        cs.store(name=f"{root}_schema", node=schema)
    comps = _components()
    for group in ("head", "method", "sampler"):
        for name in comps[group][0].names():
            cs.store(group=group, name=name, node=named_node(group, name, params_schema(group, name)))
    for name in comps["variant"][0].names():
        cs.store(group="variant", name=name, node=params_schema("variant", name), package=f"variant.{name}")
    cs.store(group="task", name="default", node=task_schema())
    for name, schema in EVAL_PROTOCOLS.items():
        cs.store(group="eval", name=name, node=schema)
    projector = signature_schema(Projector, "projector_params", ("in_dim",))
    for name in comps["backbone"][0].names():
        cs.store(
            group="schema/backbone",
            name=name,
            node=named_node(
                "backbone",
                name,
                params_schema("backbone", name),
                projector=(projector, field(default_factory=projector)),
            ),
        )
    from episodic.data.augment import AugmentConfig

    for name in comps["data"][0].names():
        cs.store(
            group="schema/data",
            name=name,
            node=named_node(
                "data",
                name,
                params_schema("data", name),
                channels=(int, field(default=3)),
                ssl_classes=(list[int] | None, field(default=None)),
                fewshot_classes=(list[int] | None, field(default=None)),
                fewshot_split=(str, field(default="both")),
                augment=(AugmentConfig, field(default_factory=AugmentConfig)),
            ),
        )
    for name in comps["optim"][0].names():
        opt = dataclasses.make_dataclass(
            f"optimizer_{name}",
            [
                ("name", str, field(default=name)),
                ("lr", float, field(default=MISSING)),
                ("weight_decay", float, field(default=0.0)),
                *[(f.name, f.type, f) for f in dataclasses.fields(params_schema("optim", name))],
            ],
        )
        cs.store(group="schema/optim", name=name, node=OptimConfig(optimizer=opt))
    _REGISTERED = True


# ------------------------------------------------------------------------------------- validation
def _object_type(node: Any) -> Any:
    t = OmegaConf.get_type(node)
    return t if t is not None and dataclasses.is_dataclass(t) else None


def unknown_keys(node: Any, path: str = "") -> None:
    """Refuse a key that no schema declares (``+train.stpes=5`` adds one past struct mode)."""
    if isinstance(node, DictConfig):
        schema = _object_type(node)
        if schema is not None:
            allowed = [f.name for f in dataclasses.fields(schema)]
            for key in node:
                if key not in allowed:
                    raise EpisodicError(unknown_key_message(f"{path}{key!s}", allowed))
        for key in node:
            if not OmegaConf.is_missing(node, key):
                unknown_keys(node._get_node(key), f"{path}{key!s}.")


def unknown_key_message(key: str, allowed: list[str]) -> str:
    parent, _, leaf = key.rpartition(".")
    hint = difflib.get_close_matches(leaf, allowed, n=1)
    maybe = f" (did you mean {parent + '.' if parent else ''}{hint[0]}?)" if hint else ""
    where = f"at {parent}" if parent else "at the top level"
    return f"unknown key {key}{maybe}; allowed {where}: {', '.join(sorted(allowed))}"


def to_object(cfg: DictConfig) -> Any:
    """Every schema node of ``cfg`` as its dataclass (running each ``__post_init__`` range check)."""
    try:
        return OmegaConf.to_object(cfg)
    except EpisodicError:
        raise
    except Exception as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, EpisodicError):
            raise EpisodicError(str(cause)) from None
        raise EpisodicError(describe(e)) from None


def validate(cfg: DictConfig) -> None:
    """Check a composed config before any work: keys, types, ranges (see the module docstring)."""
    unknown_keys(cfg)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise EpisodicError(f"{missing[0]} is required (???); set {missing[0]}=...")
    to_object(cfg)


# ------------------------------------------------------------------------------------- one-line messages
_TYPE_WORDS = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false", "String": "a string"}


def describe(error: BaseException) -> str:
    """One line for an OmegaConf or Hydra error: the key, the value and what is allowed."""
    err: BaseException | None = error
    while err is not None and not hasattr(err, "full_key") and err.__cause__ is not None:
        err = err.__cause__
    text = str(err or error).strip()
    key = getattr(err, "full_key", None) or ""
    first = text.splitlines()[0] if text else type(error).__name__
    m = re.match(r"Value '(.*?)' (?:of type '\w+' )?could not be converted to (\w+)", first)
    if m and key:
        return f"{key}={m.group(1)!r} is not allowed; use {_TYPE_WORDS.get(m.group(2), m.group(2))}"
    m = re.match(r"Value '(.*?)' is not a valid (\w+)", first)
    if m and key:
        word = {"bool": "true or false"}.get(m.group(2), f"a {m.group(2)}")
        return f"{key}={m.group(1)!r} is not allowed; use {word}"
    m = re.match(r"Invalid value '(.*?)', expected one of \[(.*)\]", first)
    if m and key:
        return f"{key}={m.group(1)!r} is not allowed; use one of {m.group(2)}"
    if (
        "is not Optional" in first
        or "Non optional field cannot be assigned None" in first
        or ("field '" in first and "not Optional" in first)
    ) and key:
        return f"{key}=null is not allowed; give a value"
    m = re.match(r"Key '(.+)' (?:not in|is not in) '?(\w+)'?", first)
    if m and key:
        return unknown_key_message(key, _allowed_at(err))
    m = re.match(r"Could not override '(.+?)'", first)
    if m:
        return f"cannot set {m.group(1)}: {' '.join(text.splitlines()[1:2]) or first}"
    if "Missing mandatory value" in first and key:
        return f"{key} is required (???); set {key}=..."
    return first


def _allowed_at(err: Any) -> list[str]:
    """The keys of the node an error happened in (its schema's fields, else its keys)."""
    node = getattr(err, "object_type", None)
    if node is not None and dataclasses.is_dataclass(node):
        return [f.name for f in dataclasses.fields(node)]
    parent = getattr(err, "parent_node", None)
    if isinstance(parent, DictConfig):
        return [str(k) for k in parent]
    return []


__all__ = [
    "EVAL_PROTOCOLS",
    "ROOTS",
    "EvaluateConfig",
    "ExportConfig",
    "LoaderConfig",
    "LoopConfig",
    "OptimConfig",
    "QuickEval",
    "ScheduleConfig",
    "TrainConfig",
    "describe",
    "params_schema",
    "register",
    "signature_schema",
    "to_object",
    "unknown_keys",
    "validate",
]
