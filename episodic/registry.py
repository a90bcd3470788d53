"""Name -> class registries for heads, backbones, datasets and task augmentations.

A component registers itself with a decorator in its own module; every module of a registered
package is imported on first lookup, so adding a head is one file plus one config::

    HEADS = Registry("head", "episodic.heads")

    @HEADS.register("r2d2")
    class R2D2Head(Head): ...

Unknown names raise :class:`~episodic.errors.EpisodicError` listing what is allowed.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
from typing import Any, Callable, Generic, TypeVar

from episodic.errors import EpisodicError

T = TypeVar("T")


class Registry(Generic[T]):
    """A small registry: ``register`` decorator, ``get`` with did-you-mean, ``names``."""

    def __init__(self, kind: str, package: str | None = None) -> None:
        self.kind = kind
        self.package = package
        self._items: dict[str, T] = {}
        self._loaded = package is None

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise RuntimeError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        pkg = importlib.import_module(self.package)  # type: ignore[arg-type]
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def get(self, name: str) -> T:
        self._load()
        if name not in self._items:
            hint = difflib.get_close_matches(name, self._items, n=1)
            maybe = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise EpisodicError(
                f"unknown {self.kind} {name!r}{maybe}; allowed: {', '.join(self.names())}"
            )
        return self._items[name]

    def build(self, name: str, **kwargs: Any) -> Any:
        """``get(name)(**kwargs)``; a keyword the class does not take is one line naming it and the allowed ones."""
        cls = self.get(name)
        unknown, allowed = unknown_keywords(cls, kwargs)
        if unknown:
            raise EpisodicError(f"{self.kind} {name!r} has no parameter {', '.join(map(repr, unknown))}; "
                                f"allowed: {', '.join(allowed)}")
        return cls(**kwargs)  # type: ignore[operator]


def unknown_keywords(fn: Callable[..., Any], kwargs: Any, skip: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """``(unknown, allowed)``: the keys of ``kwargs`` that ``fn`` (a class: its constructor) does not take, sorted,
    and the keyword names it does take, minus ``skip``; nothing is unknown when ``fn`` takes ``**kwargs``."""
    params = inspect.signature(fn).parameters.values()
    allowed = [p.name for p in params
               if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in skip]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return [], allowed
    return sorted(set(kwargs) - set(allowed)), allowed
