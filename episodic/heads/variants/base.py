"""The variant contract: a small module that changes one stage of a head.

A variant attaches to a head (``head.variants[name]``) and overrides the hooks of the stage it
changes; every other hook is the identity (see :mod:`episodic.heads.base` for where heads call
them). ``check(head, method)`` runs once when the model is built and refuses, with one
:class:`~episodic.errors.EpisodicError` line, a head or encoder pairing where the variant has no
meaning.

Hooks:

* ``prepare(z)``: each encoder pass's embeddings; ``replaces_l2``: the head skips L2 normalisation;
* kernel heads: ``add_columns(pairs)``, ``transform_geometry(geo, pairs)`` (training only),
  ``kernel(energy)`` (with ``replaces_kernel``);
* ridge heads: ``augment_support(support, targets)``, ``transform_queries(...)`` (training only),
  ``gram(a, c)`` (with ``replaces_kernel``);
* every head: ``loss(logits, targets, valid, min_logit)`` (with ``replaces_loss``).
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from episodic.errors import check
from episodic.heads.base import HEADS, Geometry, Head, Pairs
from episodic.registry import Registry

VARIANTS: Registry[type[Variant]] = Registry("variant", "episodic.heads.variants")


def registered_name(registry: Registry[Any], obj: Any) -> str:
    """The name under which ``obj``'s class is registered in ``registry`` (its class name if none)."""
    for name in registry.names():
        if registry.get(name) is type(obj):
            return name
    return type(obj).__name__


def head_name(head: Head) -> str:
    """The registry name of ``head``'s class (``head=...`` in configs and messages)."""
    return registered_name(HEADS, head)


def method_name(method: Any) -> str:
    """The registry name of ``method``'s class (``method=...`` in configs and messages)."""
    from episodic.methods import METHODS

    return registered_name(METHODS, method)


class Variant(nn.Module):
    """Base class: every hook is the identity; subclasses override the stage they change."""

    name: ClassVar[str] = ""
    replaces_l2: ClassVar[bool] = False
    replaces_kernel: ClassVar[bool] = False
    replaces_loss: ClassVar[bool] = False
    #: variants this one cannot be combined with, by name
    conflicts: ClassVar[tuple[str, ...]] = ()

    def check(self, head: Head, method: Any = None) -> None:
        """Refuse a head or pairing where this variant has no meaning (default: one without negatives)."""
        if method is not None:
            check(getattr(method, "negatives", True),
                  f"variant={self.name} acts on negatives, but method={method_name(method)} has none; "
                  "use method=simclr or method=moco")

    def refuse(self, head: Head, why: str) -> None:
        check(False, f"variant={self.name} does not apply to head={head_name(head)}: {why}")

    # ------------------------------------------------------------- embeddings
    def prepare(self, z: Tensor) -> Tensor:
        return z

    # ------------------------------------------------------------- kernel heads
    def add_columns(self, pairs: Pairs) -> Pairs:
        return pairs

    def transform_geometry(self, geo: Geometry, pairs: Pairs) -> Geometry:
        return geo

    def kernel(self, energy: Tensor) -> Tensor | None:
        return None

    # ------------------------------------------------------------- ridge heads
    def augment_support(self, support: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        return support, targets

    def transform_queries(self, query: Tensor, support: Tensor, support_targets: Tensor,
                          query_soft: Tensor) -> Tensor:
        return query

    def gram(self, a: Tensor, c: Tensor) -> Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------- every head
    def loss(self, logits: Tensor, targets: Tensor, valid: Tensor | None,
             min_logit: float | None) -> tuple[Tensor, dict[str, Tensor]] | None:
        return None
