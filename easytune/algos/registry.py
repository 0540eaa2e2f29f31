"""Variants registered by name (as google/tunix's function registry): the RL loop looks up its
advantage estimator, policy loss, KL placement and algorithm by the name a flag gives, so a new
variant is registered where it is defined and the code that runs it does not change."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

Variant = TypeVar("Variant")


class Registry(Generic[Variant]):
    """Name -> variant of one kind. `kind` is what a name selects, as errors say it (`--algo`,
    `advantage estimator`). A name is registered once: a second registration is a bug (two
    definitions, one silently lost), not an override."""

    def __init__(self, kind: str):
        self.kind = kind
        self._variants: dict[str, Variant] = {}

    def add(self, name: str, variant: Variant) -> Variant:
        if name in self._variants:
            raise ValueError(f"{self.kind} {name!r} is registered twice.")
        self._variants[name] = variant
        return variant

    def get(self, name: str) -> Variant:
        if name not in self._variants:
            raise ValueError(f"unknown {self.kind} {name!r}; use one of {', '.join(self)}.")
        return self._variants[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._variants)
