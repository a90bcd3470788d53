"""The variant contract: a small module that changes one stage of a head.

A variant attaches to a head (``head.variants[name]``) and overrides the hooks of the stage it
changes; every other hook is the identity (see :mod:`episodic.heads.base` for where heads call
them). Where it applies is declared, not tested on classes: ``applies_to`` lists the head
``scoring`` kinds it has a meaning for, ``needs_negatives`` whether the encoder pairing must have
negatives; :meth:`Variant.validate` (run once when the model is built) refuses anything else with
one :class:`~episodic.errors.EpisodicError` line.

Hooks:

* ``transform_embeddings(z)``: each encoder pass's embeddings; ``replaces_l2``: the head skips L2
  normalisation;
* kernel heads: ``add_columns(pairs)``, ``transform_geometry(geo, pairs)`` (training only),
  ``log_kernel(energy)`` (with ``replaces_kernel``);
* ridge heads: ``augment_support(support, targets)``, ``transform_queries(...)`` (training only),
  ``gram(a, c)`` (with ``replaces_kernel``);
* every head: ``loss(logits, targets, valid, min_logit)`` (with ``replaces_loss``).
"""

from __future__ import annotations

from typing import ClassVar, Protocol

from torch import Tensor, nn

from episodic.errors import check
from episodic.heads.base import Geometry, Head, Pairs, Scoring
from episodic.registry import Registry

VARIANTS: Registry[type[Variant]] = Registry("variant", "episodic.heads.variants")


class Pairing(Protocol):
    """What a variant may ask of the encoder pairing (:class:`episodic.methods.Method` declares it)."""

    name: ClassVar[str]
    negatives: ClassVar[bool]
    queue_size: int


class Variant(nn.Module):
    """Base class: every hook is the identity; subclasses override the stage they change."""

    name: ClassVar[str] = ""  # the registry name, set by ``VARIANTS.register``
    replaces_l2: bool = False  # t_kernel decides per instance
    replaces_kernel: ClassVar[bool] = False
    replaces_loss: ClassVar[bool] = False
    #: the head ``scoring`` kinds this variant has a meaning for, and why others are refused
    applies_to: ClassVar[tuple[Scoring, ...]] = ("scores", "kernel", "ridge", "qp")
    refusal: ClassVar[str] = ""
    #: whether the pairing must have negatives (BYOL has none)
    needs_negatives: ClassVar[bool] = True
    #: variants this one cannot be combined with, by name
    conflicts: ClassVar[tuple[str, ...]] = ()

    def validate(self, head: Head, method: Pairing | None = None) -> None:
        """Refuse a head or pairing where this variant has no meaning (one line naming both)."""
        check(
            head.scoring in self.applies_to, f"variant={self.name} does not apply to head={head.name}: {self.refusal}"
        )
        if method is not None and self.needs_negatives:
            check(
                method.negatives,
                f"variant={self.name} acts on negatives, but method={method.name} has "
                "none; use method=simclr or method=moco",
            )

    # ------------------------------------------------------------- embeddings
    def transform_embeddings(self, z: Tensor) -> Tensor:
        return z

    # ------------------------------------------------------------- kernel heads
    def add_columns(self, pairs: Pairs) -> Pairs:
        return pairs

    def transform_geometry(self, geo: Geometry, pairs: Pairs) -> Geometry:
        return geo

    def log_kernel(self, energy: Tensor) -> Tensor | None:
        return None

    # ------------------------------------------------------------- ridge heads
    def augment_support(self, support: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        return support, targets

    def transform_queries(self, query: Tensor, support: Tensor, support_targets: Tensor, query_soft: Tensor) -> Tensor:
        return query

    def gram(self, a: Tensor, c: Tensor) -> Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------- every head
    def loss(
        self, logits: Tensor, targets: Tensor, valid: Tensor | None, min_logit: float | None
    ) -> tuple[Tensor, dict[str, Tensor]] | None:
        return None
