"""Name -> class registries for heads, variants, pairings, samplers, task augmentations and the rest.

A component registers itself with a decorator in its own module; every module of a registered
package is imported on first lookup, so adding a head is one file plus one config::

    HEADS = Registry("head", "episodic.heads")

    @HEADS.register("r2d2")
    class R2D2Head(Head): ...

A registered class gets its registry name as the class attribute ``name`` (``R2D2Head.name ==
"r2d2"``), so messages and checks say ``head=r2d2`` without a second table. A registry may
``extend`` another: it knows its own entries and, behind them, every entry of the other (the
evaluation heads are the training heads plus ``logreg``). Unknown names raise
:class:`~episodic.errors.EpisodicError` listing what is allowed.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from episodic.errors import EpisodicError

T = TypeVar("T")


class Registry(Generic[T]):
    """A small registry: ``register`` decorator, ``get`` with did-you-mean, ``names``, ``build``."""

    def __init__(self, kind: str, package: str | None = None, extends: Registry[Any] | None = None) -> None:
        self.kind = kind
        self.package = package
        self.extends = extends
        self._items: dict[str, T] = {}
        self._loaded = package is None

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise RuntimeError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            if isinstance(obj, type):
                obj.name = name  # type: ignore[attr-defined]  # T is any registered class
            return obj

        return deco

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        assert self.package is not None  # _loaded starts True without one
        pkg = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")

    def _all(self) -> dict[str, T]:
        self._load()
        return {**(self.extends._all() if self.extends is not None else {}), **self._items}

    def __contains__(self, name: object) -> bool:
        return name in self._all()

    def names(self) -> list[str]:
        return sorted(self._all())

    def get(self, name: str) -> T:
        items = self._all()
        if name not in items:
            hint = difflib.get_close_matches(str(name), items, n=1)
            maybe = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise EpisodicError(f"unknown {self.kind} {name!r}{maybe}; allowed: {', '.join(sorted(items))}")
        return items[name]

    def build(self, name: str, **kwargs: Any) -> Any:
        """``get(name)(**kwargs)``; a keyword the class does not take is one line naming it and the allowed ones."""
        cls: Any = self.get(name)
        unknown, allowed = unknown_keywords(cls, kwargs)
        if unknown:
            raise EpisodicError(
                f"{self.kind} {name!r} has no parameter {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}"
            )
        return cls(**kwargs)


def unknown_keywords(fn: Callable[..., Any], kwargs: Any, skip: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """``(unknown, allowed)``: the keys of ``kwargs`` that ``fn`` (a class: its constructor) does not take, sorted,
    and the keyword names it does take, minus ``skip``; nothing is unknown when ``fn`` takes ``**kwargs``."""
    params = inspect.signature(fn).parameters.values()
    allowed = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in skip]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return [], allowed
    return sorted(set(kwargs) - set(allowed)), allowed
