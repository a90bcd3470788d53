"""Loss variants that compose with heads through config (``variant=debiased``, ``variant=[a,b]``).

Each variant is one module with its formula in the docstring:

* ``debiased`` (DCL, Chuang et al. 2020): the negative term corrected for same-class negatives;
* ``t_kernel`` (t-SimCLR / t-MoCo-v2, Hu et al. 2023): Student-t similarity kernel;
* ``soft_neighbors`` (SNCLR, Ge et al. 2023): bank neighbours as softly weighted positives;
* ``feature_transform`` (FT, Zhu et al. 2021): extrapolated positives, interpolated negatives.

:func:`attach_variants` builds them from the ``variant`` config node (one key per variant, its
parameters as values), validates each against the head and the encoder pairing, and attaches them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from episodic.errors import check
from episodic.heads.base import Head
from episodic.heads.variants.base import VARIANTS, Pairing, Variant
from episodic.registry import unknown_keywords


def attach_variants(
    head: Head, variants: Mapping[str, Any] | None, method: Pairing | None = None, dim: int | None = None
) -> Head:
    """Build the variants named in ``variants`` (name -> params), validate and attach them to ``head``.

    ``dim`` is the embedding width, passed to the variants whose constructor takes it (memory banks).
    """
    for name, params in (variants or {}).items():
        cls = VARIANTS.get(name)
        width = {"dim": dim} if "dim" in unknown_keywords(cls, {})[1] else {}
        v = VARIANTS.build(name, **width, **dict(params or {}))
        v.validate(head, method)
        for attached in head.active_variants:
            other = attached.name
            check(
                other not in v.conflicts and name not in attached.conflicts,
                f"variant={name} cannot be combined with variant={other}; use one of them",
            )
        head.variants[name] = v
    return head


__all__ = ["VARIANTS", "Pairing", "Variant", "attach_variants"]
