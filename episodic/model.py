"""The model of one training step, and its data path top to bottom.

:meth:`EpisodicModel.forward` takes this process's augmented views ``[V, B, C, H, W]`` and returns
the step's loss together with the logits it scored and the labels they are scored against::

    views --sampler--> episode of images --task augmentations--> episode(s) of images
          --pairing's encoders--> episode(s) of embeddings (+ the episode of a sampler's pseudo-shots)
          --gathered across processes as the head
          declares--> head (+ the pairing's queue as extra classes) --> loss, logits, query labels
          (+ auxiliary task losses);  the pairing's state (queue) follows the batch

Everything that trains lives here as a submodule, so the optimizer, checkpoints and a DDP wrapper
see it: the sampler (a pseudo-labelling sampler's state), the pairing (encoders, predictor, momentum
copies, queue), the head (and its variants' banks) and the task augmentations' modules (the rotation
classifier). Momentum encoders move after the optimizer step (``Method.after_step``), not here.

:func:`build_model` builds it from a config, initialised from ``cfg.seed``: the same seed gives the
same weights, which is how evaluation rebuilds a run's random-init twin.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from episodic.config import as_dict
from episodic.heads.base import HEADS, Head
from episodic.heads.variants import attach_variants
from episodic.methods import METHODS, Method
from episodic.models import Encoder, build_encoder
from episodic.tasks.augment import TaskContext, TaskPipeline, build_task_pipeline
from episodic.tasks.samplers import SAMPLERS, Sampler
from episodic.tasks.scope import ScopePlan, plan_scope


@dataclass
class StepOutput:
    """What one forward returns.

    Attributes:
        loss: scalar training loss (head or pairing loss plus auxiliary task losses).
        logits: ``[E, Nq, n_way]`` the query scores of the first scored episode.
        query_labels: ``[E, Nq]`` the labels of exactly those queries (offset across processes when
            the episode spans them), for accuracy and score histograms.
        extras: the head's named diagnostics (TensorBoard).
    """

    loss: Tensor
    logits: Tensor
    query_labels: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)


class EpisodicModel(nn.Module):
    """An episode sampler, an encoder pairing, a head and task augmentations, over a process layout."""

    def __init__(
        self,
        sampler: Sampler,
        method: Method,
        head: Head,
        task: TaskPipeline | None = None,
        scope: ScopePlan | None = None,
    ) -> None:
        super().__init__()
        method.validate_head(head)
        self.task = task if task is not None else TaskPipeline()
        sampler.validate(method, [a.stage for a in self.task.stages])
        self.sampler, self.method, self.head = sampler, method, head
        self.scope = scope if scope is not None else ScopePlan.one_process()
        if not method.trains_head:  # e.g. BYOL: the loss never reaches the head's parameters
            head.requires_grad_(False)

    @property
    def encoder(self) -> Encoder:
        return self.method.encoder

    @property
    def backbone(self) -> nn.Module:
        """The trained feature extractor (what evaluation and export use)."""
        return self.method.encoder.backbone

    def forward(
        self, views: Tensor, generator: torch.Generator | None = None, step: int = 0, total_steps: int = 1
    ) -> StepOutput:
        """One step's loss on this process's views ``[V, B, ...]``; ``generator`` draws the task
        augmentations, ``step`` of ``total_steps`` schedules their weights."""
        episode = self.sampler(views, self.method, self.scope)  # classes, support and query examples
        episode, aux = self.task(episode, generator, step, total_steps)  # whole-episode transforms
        local = self.method.embed(episode, self.head.transform_embeddings)  # which encoder embeds what
        if local[0].pseudo_support is not None:  # a sampler's pseudo-shots: the same queries, scored again
            local.append(local[0].pseudo_episode())
        gathered = self.head.gathers if self.method.gathers else "none"
        scored = [self.scope.gather(e, gathered) for e in local]  # episodes spanning processes
        out = self.method.score(scored, self.head)  # the head's classifier scores the queries
        self.method.update(local[0], self.scope)  # queue
        extra = self.task.aux_loss(self.method.encoder, aux)  # e.g. rotation prediction
        loss = out.loss if extra is None else out.loss + extra
        return StepOutput(loss, out.logits, scored[0].query_labels, out.extras)


MEMORY_KEYS = ("queue_size", "bank_size")  # the parameters that size a pairing's or a variant's memory


def capped(params: dict[str, Any], cap: int | None) -> dict[str, Any]:
    """``params`` with every memory size (:data:`MEMORY_KEYS`) at most ``cap`` (``memory_cap``)."""
    if cap is None:
        return params
    return {k: min(v, int(cap)) if k in MEMORY_KEYS and isinstance(v, int) else v for k, v in params.items()}


def build_model(cfg: DictConfig, scope: ScopePlan | None = None) -> EpisodicModel:
    """Sampler, encoder, pairing, head, variants and task augmentations from the config, initialised
    from ``cfg.seed``; ``scope`` is the process layout (default: one process on the whole batch)."""
    if scope is None:
        scope = plan_scope(
            str(cfg.task.get("scope", "global")),
            cfg.n_way,
            int(cfg.batch_size),
            1,
            0,
            int(cfg.optim.get("accu_iter", 1)),
        )
    torch.manual_seed(cfg.seed)
    sampler_cfg = cfg.get("sampler") or {"name": "views"}
    sampler = SAMPLERS.build(
        sampler_cfg["name"],
        n_supp=cfg.n_supp,
        n_query=cfg.n_query,
        n_way=scope.sampler_way,
        **as_dict(sampler_cfg.get("params")),
    )
    encoder = build_encoder(
        cfg.backbone.name,
        cfg.data.channels,
        as_dict(cfg.backbone.get("params")),
        as_dict(cfg.backbone.get("projector")),
    )
    cap = cfg.get("memory_cap")
    method = METHODS.build(cfg.method.name, encoder=encoder, **capped(as_dict(cfg.method.get("params")), cap))
    head = HEADS.build(cfg.head.name, **as_dict(cfg.head.get("params")))
    variants = {name: capped(dict(p or {}), cap) for name, p in as_dict(cfg.get("variant")).items()}
    attach_variants(head, variants, method, encoder.projector.out_dim)
    aug = as_dict(cfg.data.get("augment"))
    ctx = TaskContext(embed_dim=encoder.projector.out_dim, mean=aug.get("mean"), std=aug.get("std"))
    return EpisodicModel(sampler, method, head, build_task_pipeline(as_dict(cfg.get("task")), ctx), scope)


__all__ = ["EpisodicModel", "StepOutput", "build_model"]
