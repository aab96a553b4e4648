"""The arms of the bandit: subsets of a model's modules."""
from __future__ import annotations

import itertools
from typing import Iterable, Sequence

from optima.errors import ConfigError


class ArmSpace:
    """Arms over modules `names`. By default every non-empty subset (`2^M - 1`),
    ordered by size then by module order; or an explicit list of subsets.

    >>> ArmSpace(["image", "text"]).labels()
    ['image', 'text', 'image+text']
    """

    def __init__(self, names: Sequence[str], subsets: Iterable[Iterable[str]] | None = None):
        self.names = tuple(names)
        if len(set(self.names)) != len(self.names) or not self.names:
            raise ConfigError(f"module names must be unique and non-empty, got {list(self.names)}")
        if subsets is None:
            subsets = [c for k in range(1, len(self.names) + 1)
                       for c in itertools.combinations(self.names, k)]
        arms: list[tuple[str, ...]] = []
        for subset in subsets:
            subset = [subset] if isinstance(subset, str) else list(subset)
            unknown = [m for m in subset if m not in self.names]
            if unknown:
                raise ConfigError(f"arm {subset} names unknown module(s) {unknown}; "
                                  f"valid modules: {', '.join(self.names)}")
            if not subset:
                raise ConfigError("an arm must contain at least one module")
            arm = tuple(m for m in self.names if m in subset)  # canonical order
            if arm in arms:
                raise ConfigError(f"arm {list(arm)} is listed twice")
            arms.append(arm)
        if not arms:
            raise ConfigError("no arm is listed; list at least one (a list of module names), or leave it unbound "
                              "for every non-empty subset of the modules")
        self.arms: tuple[tuple[str, ...], ...] = tuple(arms)

    def __len__(self) -> int:
        return len(self.arms)

    def __getitem__(self, k: int) -> tuple[str, ...]:
        return self.arms[k]

    def label(self, k: int) -> str:
        return "+".join(self.arms[k])

    def labels(self) -> list[str]:
        return [self.label(k) for k in range(len(self))]

    def index(self, modules: Iterable[str]) -> int:
        wanted = tuple(m for m in self.names if m in set(modules))
        try:
            return self.arms.index(wanted)
        except ValueError:
            raise ConfigError(f"{list(modules)} is not an arm; arms: {', '.join(self.labels())}") from None
